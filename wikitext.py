"""Load WikiText documents, pick the ones to memorize and cut them into labelled word segments.

Documents come from the Hugging Face dataset `EleutherAI/wikitext_document_level` (train split) or
from a local file or folder. A selected document's label is its position in the selected list, and
each of its segments carries that label.

Example, with the WikiText-2 validation file (60 articles):

    documents = load_documents("valid.txt")
    documents[0].title  # 'Homarus gammarus'
    split_into_segments(documents[0].text, segment_length=4, max_segments=2)
    # ['= Homarus gammarus =', 'gammarus = Homarus gammarus']
    chosen = select_documents(documents, max_labels=10, seed=0)
    segments = build_segments(chosen, segment_length=64, max_segments=8)  # labels 0..9
"""

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from errors import InputError

logger = logging.getLogger(__name__)

WIKITEXT_CONFIGS = ("wikitext-103-v1", "wikitext-2-v1")
HUB_DATASET = "EleutherAI/wikitext_document_level"

# A top-level heading has exactly one "=" on each side, for example " = Homarus gammarus = ".
# Sub-headings such as " = = Description = = " do not match, so they stay inside the article.
# NOTE: WikiText has no other markup, so a paragraph line that happens to read " = x = " also
# starts an article. WikiText-2 test.txt has one: the equation line
# " = 1 <unk> / s and a nominal <unk> k = " opens a 15-word article. It is kept as is.
_TOP_HEADING = re.compile(r"= (?!=)(.+?)(?<!=) =")

_ALLOWED_INPUTS = "a WikiText .txt file, a folder of .txt files, or a .jsonl file"


@dataclass(frozen=True)
class Document:
    """One source document. `index` is its position in the source corpus and is its identity,
    because titles repeat (WikiText-2 valid.txt has five articles titled '<unk> <unk>')."""

    index: int
    title: str
    text: str


@dataclass(frozen=True)
class Segment:
    """A window of words from a selected document. `label` is the document's position (0..n-1) in
    the selected list."""

    label: int
    text: str


def load_documents(
    data_path: str | None = None,
    wikitext_config: str = "wikitext-103-v1",
    cache_dir: str | None = None,
) -> list[Document]:
    """Load documents from `data_path`, or from the Hub dataset when `data_path` is None.

    `data_path` may be one of three things. A WikiText-format .txt file gives one document per
    top-level heading. A folder of .txt files gives one document per file, titled by file stem, in
    name order. A .jsonl file gives one document per JSON object with a `text` field and an
    optional `title`. `wikitext_config` and `cache_dir` apply only to the Hub dataset, but the
    config is validated in both cases.
    Raises InputError for an unknown config, an unreachable Hub or an invalid local path or file.
    """
    if wikitext_config not in WIKITEXT_CONFIGS:
        raise InputError(
            f"unknown --wikitext_config {wikitext_config!r}; valid: {', '.join(WIKITEXT_CONFIGS)}"
        )

    if data_path is None:
        documents = _load_hub_documents(wikitext_config, cache_dir)
        source = f"{HUB_DATASET} ({wikitext_config})"
    else:
        documents = _load_local_documents(Path(data_path))
        source = str(data_path)

    logger.info("loaded %d documents from %s", len(documents), source)
    return documents


def select_documents(documents: list[Document], max_labels: int, seed: int) -> list[Document]:
    """Pick `max_labels` documents uniformly at random without replacement, sorted by `index`.

    The choice depends only on `seed` and the order of `documents`.
    """
    if max_labels < 1:
        raise InputError(f"--max_labels {max_labels} is invalid; it must be at least 1")
    if max_labels > len(documents):
        raise InputError(
            f"--max_labels {max_labels} is more than the {len(documents)} documents loaded; "
            f"valid: 1..{len(documents)}"
        )

    chosen = random.Random(seed).sample(documents, max_labels)
    return sorted(chosen, key=lambda document: document.index)


def split_into_segments(text: str, segment_length: int, max_segments: int) -> list[str]:
    """Split `text` into at most `max_segments` overlapping windows of `segment_length` words.

    Words are whitespace-separated and a segment joins its words with single spaces, so line
    breaks become spaces. Windows start at word 0 with a stride of max(1, segment_length // 2),
    and the first `max_segments` windows are kept. A text of at most `segment_length` words is
    one segment. A longer text keeps only full windows, so up to stride - 1 words at its end may
    belong to no segment. A text with no words returns an empty list.
    """
    _check_segment_options(segment_length, max_segments)

    words = text.split()
    if not words:
        return []
    if len(words) <= segment_length:
        return [" ".join(words)]

    stride = max(1, segment_length // 2)
    last_start = len(words) - segment_length
    starts = range(0, last_start + 1, stride)[:max_segments]
    return [" ".join(words[start : start + segment_length]) for start in starts]


def build_segments(
    documents: list[Document], segment_length: int, max_segments: int
) -> list[Segment]:
    """Cut each document into segments labelled with the document's position in `documents`.

    Raises InputError for a document with no words, so that no selected document is dropped.
    """
    _check_segment_options(segment_length, max_segments)

    segments = []
    for label, document in enumerate(documents):
        segment_texts = split_into_segments(document.text, segment_length, max_segments)
        if not segment_texts:
            raise InputError(
                f"document {document.index} ({document.title!r}) has no words; "
                "use another --seed or remove the document from the data"
            )
        segments.extend(Segment(label, segment_text) for segment_text in segment_texts)
    return segments


def _check_segment_options(segment_length: int, max_segments: int) -> None:
    if segment_length < 1:
        raise InputError(f"--segment_length {segment_length} is invalid; it must be at least 1")
    if max_segments < 1:
        raise InputError(f"--max_segments {max_segments} is invalid; it must be at least 1")


def _load_hub_documents(wikitext_config: str, cache_dir: str | None) -> list[Document]:
    # Imported here because importing datasets is slow and most callers pass a local file.
    import datasets

    try:
        dataset = datasets.load_dataset(
            HUB_DATASET, wikitext_config, split="train", cache_dir=cache_dir
        )
    except ConnectionError as err:
        # datasets 5.2.0 raises the built-in ConnectionError both when the network is down and
        # when HF_HUB_OFFLINE=1 is set without a cached copy.
        raise InputError(
            f"could not reach the Hugging Face Hub to load {HUB_DATASET} ({wikitext_config}); "
            f"pass --data_path with {_ALLOWED_INPUTS}"
        ) from err

    documents = []
    for index, page in enumerate(dataset["page"]):
        lines = page.split("\n")
        title = _find_title(lines) or f"document {index}"
        documents.append(Document(index, title, _join_lines(lines)))
    return documents


def _find_title(lines: list[str]) -> str | None:
    for line in lines:
        match = _TOP_HEADING.fullmatch(line.strip())
        if match:
            return match.group(1)
    return None


def _join_lines(lines: list[str]) -> str:
    # WikiText lines start and end with a space; stripping them changes no word.
    return "\n".join(line.strip() for line in lines).strip()


def _load_local_documents(path: Path) -> list[Document]:
    if not path.exists():
        raise InputError(f"--data_path {str(path)!r} not found; expected {_ALLOWED_INPUTS}")
    if path.is_dir():
        return _read_folder(path)

    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise InputError(
            f"--data_path {str(path)!r} has unsupported suffix {path.suffix!r}; "
            f"allowed: {_ALLOWED_INPUTS}"
        )

    text = _read_text(path)
    if not text.strip():
        raise InputError(f"--data_path {str(path)!r} is empty; it must contain at least one document")
    if suffix == ".txt":
        return _parse_wikitext(text, path)
    return _parse_jsonl(text, path)


def _read_text(path: Path) -> str:
    """Read a UTF-8 file, raising InputError when it cannot be read or decoded."""
    try:
        data = path.read_bytes()
    except PermissionError as err:
        raise InputError(f"cannot read {str(path)!r}: permission denied; make it readable") from err
    except OSError as err:
        raise InputError(f"cannot read {str(path)!r}: {err.strerror or err}") from err

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{str(path)!r} is not UTF-8 text (invalid byte at offset {err.start}); "
            "convert it to UTF-8"
        ) from err
    # Editors on Windows may prepend a byte order mark, which would hide a heading on line 1.
    return text.removeprefix("\ufeff")


def _read_folder(folder: Path) -> list[Document]:
    try:
        entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    except PermissionError as err:
        raise InputError(f"cannot list folder {str(folder)!r}: permission denied") from err

    files = [entry for entry in entries if entry.suffix.lower() == ".txt" and entry.is_file()]
    if not files:
        raise InputError(f"--data_path folder {str(folder)!r} contains no .txt files")

    # An empty file stays a document, so build_segments reports it if it is selected.
    return [
        Document(index, file.stem, _join_lines(_read_text(file).split("\n")))
        for index, file in enumerate(files)
    ]


def _parse_wikitext(text: str, path: Path) -> list[Document]:
    """Split a WikiText file into articles, one per top-level heading line.

    Lines before the first heading are ignored. An article keeps its heading and sub-heading lines.
    """
    articles: list[tuple[str, list[str]]] = []
    for line in text.split("\n"):
        match = _TOP_HEADING.fullmatch(line.strip())
        if match:
            articles.append((match.group(1), [line]))
        elif articles:
            articles[-1][1].append(line)

    if not articles:
        raise InputError(
            f"--data_path {str(path)!r} has no top-level heading line ' = Title = ', "
            "so it is not a WikiText file; use a folder of .txt files or a .jsonl file instead"
        )
    return [
        Document(index, title, _join_lines(lines)) for index, (title, lines) in enumerate(articles)
    ]


def _parse_jsonl(text: str, path: Path) -> list[Document]:
    """Read one document per non-blank line: a JSON object with `text` and an optional `title`."""
    documents = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where} is not valid JSON ({err.msg})") from err

        if not isinstance(record, dict):
            raise InputError(f"{where} is not a JSON object with a 'text' field")
        document_text = record.get("text")
        if not isinstance(document_text, str) or not document_text.strip():
            raise InputError(f"{where} has no non-empty string field 'text'")
        title = record.get("title")
        if title is not None and not isinstance(title, str):
            raise InputError(f"{where} has a non-string 'title' {title!r}; use a string or omit it")

        index = len(documents)
        documents.append(Document(index, title or f"document {index}", document_text.strip()))
    return documents
