"""Tests for wikitext.py: parsing the three input formats, document selection, segmentation and the
InputError messages. The real-data tests read WikiText-2 valid.txt and test.txt from the shared data
folder beside the checkout and skip when it is absent. Nothing here contacts the Hugging Face Hub.
"""

import json
import re
import sys
import types
from pathlib import Path

import pytest

from errors import InputError
from wikitext import (
    WIKITEXT_CONFIGS,
    Document,
    Segment,
    build_segments,
    load_documents,
    select_documents,
    split_into_segments,
)

# A top-level WikiText heading line after stripping, for example "= Homarus gammarus =".
TOP_HEADING = re.compile(r"= [^=](.*[^=])? =")

WIKITEXT_2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"

needs_wikitext_2 = pytest.mark.skipif(
    not (WIKITEXT_2 / "valid.txt").is_file() or not (WIKITEXT_2 / "test.txt").is_file(),
    reason=f"WikiText-2 valid.txt and test.txt not found in {WIKITEXT_2}",
)

# Hand-written WikiText: a preamble, sub-headings, a repeated title and an article with no body.
SMALL_WIKITEXT = """\
 preamble line that belongs to no article
 
 = First Article = 
 
 Alpha beta gamma . 
 
 = = Section One = = 
 
 Delta epsilon . 
 = = = Deeper = = = 
 Zeta . 
 
 = Same Title = 
 
 one two three 
 
 = Same Title = 
 
 four five six seven 
 
 = Empty Article = 
 
"""


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def make_documents(count: int) -> list[Document]:
    return [Document(index, f"title {index}", f"word{index} " * 3) for index in range(count)]


# --- WikiText format --------------------------------------------------------------------------


def test_wikitext_file_articles_and_titles(tmp_path):
    documents = load_documents(str(write_text(tmp_path / "small.txt", SMALL_WIKITEXT)))

    assert [document.index for document in documents] == [0, 1, 2, 3]
    assert [document.title for document in documents] == [
        "First Article",
        "Same Title",
        "Same Title",
        "Empty Article",
    ]


def test_wikitext_file_keeps_subheadings(tmp_path):
    documents = load_documents(str(write_text(tmp_path / "small.txt", SMALL_WIKITEXT)))
    first = documents[0]

    assert first.text == (
        "= First Article =\n\nAlpha beta gamma .\n\n= = Section One = =\n\n"
        "Delta epsilon .\n= = = Deeper = = =\nZeta ."
    )
    assert "preamble" not in " ".join(document.text for document in documents)


def test_wikitext_file_keeps_empty_article(tmp_path):
    documents = load_documents(str(write_text(tmp_path / "small.txt", SMALL_WIKITEXT)))

    assert documents[3] == Document(3, "Empty Article", "= Empty Article =")
    assert documents[2].text == "= Same Title =\n\nfour five six seven"


def test_wikitext_file_with_crlf_and_bom(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes(b"\xef\xbb\xbf = Title = \r\n Body words . \r\n")

    documents = load_documents(str(path))

    assert documents == [Document(0, "Title", "= Title =\nBody words .")]


@needs_wikitext_2
def test_real_valid_file_documents():
    documents = load_documents(str(WIKITEXT_2 / "valid.txt"))
    titles = [document.title for document in documents]

    assert len(documents) == 60
    assert [document.index for document in documents] == list(range(60))
    assert titles[0] == "Homarus gammarus"
    assert titles.count("<unk> <unk>") == 5
    assert len(set(titles)) < len(titles)
    for document in documents:
        lines = document.text.split("\n")
        assert lines[0] == f"= {document.title} ="
        assert not any(TOP_HEADING.fullmatch(line) for line in lines[1:])


@needs_wikitext_2
def test_real_test_file_short_article():
    documents = load_documents(str(WIKITEXT_2 / "test.txt"))
    word_counts = [len(document.text.split()) for document in documents]
    shortest = documents[word_counts.index(min(word_counts))]

    assert len(documents) == 62
    # The shortest article is 15 words of body under an 11-word heading line.
    assert len(shortest.text.split()) == 26
    assert split_into_segments(shortest.text, 64, 8) == [" ".join(shortest.text.split())]


@needs_wikitext_2
def test_real_repeated_titles_stay_distinct():
    documents = load_documents(str(WIKITEXT_2 / "valid.txt"))

    chosen = select_documents(documents, max_labels=60, seed=0)
    segments = build_segments(chosen, segment_length=64, max_segments=2)

    unk_labels = {
        segment.label for segment in segments if chosen[segment.label].title == "<unk> <unk>"
    }
    assert len(unk_labels) == 5
    assert sorted({segment.label for segment in segments}) == list(range(60))


# --- folder and jsonl formats -----------------------------------------------------------------


def test_folder_of_txt_files(tmp_path):
    write_text(tmp_path / "b_second.txt", "second document\nwith two lines\n")
    write_text(tmp_path / "a_first.txt", "first document")
    write_text(tmp_path / "c_empty.txt", "")
    write_text(tmp_path / "notes.md", "ignored")
    (tmp_path / "folder.txt").mkdir()

    documents = load_documents(str(tmp_path))

    assert documents == [
        Document(0, "a_first", "first document"),
        Document(1, "b_second", "second document\nwith two lines"),
        Document(2, "c_empty", ""),
    ]


def test_jsonl_file(tmp_path):
    lines = [
        json.dumps({"text": " first text ", "title": "Named"}),
        "",
        "   ",
        json.dumps({"text": "second text"}),
        json.dumps({"text": "third text", "title": None}),
    ]
    path = write_text(tmp_path / "docs.jsonl", "\n".join(lines) + "\n")

    documents = load_documents(str(path))

    assert documents == [
        Document(0, "Named", "first text"),
        Document(1, "document 1", "second text"),
        Document(2, "document 2", "third text"),
    ]


# --- Hub loading, with a stand-in for the datasets package ------------------------------------


def install_fake_datasets(monkeypatch, load_dataset):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_pages_become_documents(monkeypatch):
    calls = []

    def load_dataset(path, name, split, cache_dir):
        calls.append((path, name, split, cache_dir))
        return {"page": [" = Page One = \n \n body text \n", " no heading here \n"]}

    install_fake_datasets(monkeypatch, load_dataset)

    documents = load_documents(None, "wikitext-2-v1", cache_dir="/tmp/cache")

    assert calls == [("EleutherAI/wikitext_document_level", "wikitext-2-v1", "train", "/tmp/cache")]
    assert documents == [
        Document(0, "Page One", "= Page One =\n\nbody text"),
        Document(1, "document 1", "no heading here"),
    ]


def test_hub_unreachable_raises_input_error(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'EleutherAI/wikitext_document_level' on the Hub")

    install_fake_datasets(monkeypatch, load_dataset)

    with pytest.raises(InputError) as caught:
        load_documents(None, "wikitext-103-v1")

    message = str(caught.value)
    assert "could not reach the Hugging Face Hub" in message
    assert "wikitext-103-v1" in message
    assert "--data_path" in message
    assert "\n" not in message
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_hub_other_errors_propagate(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise RuntimeError("corrupt cache")

    install_fake_datasets(monkeypatch, load_dataset)

    with pytest.raises(RuntimeError, match="corrupt cache"):
        load_documents(None, "wikitext-2-v1")


def test_unknown_config_lists_valid_ones():
    with pytest.raises(InputError) as caught:
        load_documents(None, "wikitext-3-v1")

    message = str(caught.value)
    assert "'wikitext-3-v1'" in message
    for config in WIKITEXT_CONFIGS:
        assert config in message


# --- selection ----------------------------------------------------------------------------------


def test_selection_deterministic_for_seed():
    documents = make_documents(60)

    first = select_documents(documents, max_labels=10, seed=7)
    second = select_documents(documents, max_labels=10, seed=7)

    assert first == second
    assert len(first) == 10
    assert len({document.index for document in first}) == 10


def test_selection_differs_across_seeds():
    documents = make_documents(60)

    indexes_seed_0 = [document.index for document in select_documents(documents, 10, seed=0)]
    indexes_seed_1 = [document.index for document in select_documents(documents, 10, seed=1)]

    assert indexes_seed_0 != indexes_seed_1


def test_selection_sorted_by_index():
    documents = list(reversed(make_documents(30)))

    indexes = [document.index for document in select_documents(documents, 12, seed=3)]

    assert indexes == sorted(indexes)


def test_same_title_documents_stay_two(tmp_path):
    documents = load_documents(str(write_text(tmp_path / "small.txt", SMALL_WIKITEXT)))
    with_words = [document for document in documents if document.title != "Empty Article"]

    chosen = select_documents(with_words, max_labels=3, seed=0)
    segments = build_segments(chosen, segment_length=10, max_segments=4)

    same_title = [document for document in chosen if document.title == "Same Title"]
    assert [document.index for document in same_title] == [1, 2]
    assert [segment for segment in segments if segment.label > 0] == [
        Segment(1, "= Same Title = one two three"),
        Segment(2, "= Same Title = four five six seven"),
    ]


@pytest.mark.parametrize("max_labels", [0, -3])
def test_selection_rejects_max_labels_below_one(max_labels):
    with pytest.raises(InputError, match=rf"--max_labels {max_labels} is invalid"):
        select_documents(make_documents(5), max_labels, seed=0)


def test_selection_rejects_more_labels_than_documents():
    with pytest.raises(InputError) as caught:
        select_documents(make_documents(60), max_labels=70, seed=0)

    assert str(caught.value) == (
        "--max_labels 70 is more than the 60 documents loaded; valid: 1..60"
    )


# --- segmentation -------------------------------------------------------------------------------


def numbered_words(count: int) -> str:
    return " ".join(f"w{number}" for number in range(count))


def test_segments_stride_half_length():
    segments = split_into_segments(numbered_words(10), segment_length=4, max_segments=100)

    assert segments == ["w0 w1 w2 w3", "w2 w3 w4 w5", "w4 w5 w6 w7", "w6 w7 w8 w9"]


def test_segments_drop_uncovered_tail():
    segments = split_into_segments(numbered_words(11), segment_length=4, max_segments=100)

    assert len(segments) == 4
    assert segments[-1] == "w6 w7 w8 w9"
    assert "w10" not in " ".join(segments)


def test_segments_odd_length_stride():
    segments = split_into_segments(numbered_words(9), segment_length=5, max_segments=100)

    assert segments == ["w0 w1 w2 w3 w4", "w2 w3 w4 w5 w6", "w4 w5 w6 w7 w8"]


def test_segments_length_one_stride_one():
    segments = split_into_segments(numbered_words(3), segment_length=1, max_segments=100)

    assert segments == ["w0", "w1", "w2"]


def test_segments_window_count_formula():
    # Full windows only: 1 + (words - length) // stride, when words > length.
    for word_count, length in [(100, 10), (101, 10), (257, 64), (1000, 33)]:
        stride = max(1, length // 2)
        segments = split_into_segments(numbered_words(word_count), length, max_segments=10_000)

        assert len(segments) == 1 + (word_count - length) // stride
        assert all(len(segment.split()) == length for segment in segments)


def test_short_text_is_one_segment():
    assert split_into_segments("a  b\nc", segment_length=4, max_segments=3) == ["a b c"]
    assert split_into_segments(numbered_words(4), segment_length=4, max_segments=3) == [
        "w0 w1 w2 w3"
    ]


def test_segments_capped_by_max_segments():
    segments = split_into_segments(numbered_words(10), segment_length=4, max_segments=2)

    assert segments == ["w0 w1 w2 w3", "w2 w3 w4 w5"]


def test_text_without_words_has_no_segments():
    assert split_into_segments(" \n\t ", segment_length=4, max_segments=2) == []


@pytest.mark.parametrize(
    ("segment_length", "max_segments", "expected"),
    [
        (0, 2, "--segment_length 0 is invalid"),
        (-1, 2, "--segment_length -1 is invalid"),
        (4, 0, "--max_segments 0 is invalid"),
    ],
)
def test_segment_options_rejected(segment_length, max_segments, expected):
    with pytest.raises(InputError, match=expected):
        split_into_segments("a b c", segment_length, max_segments)
    with pytest.raises(InputError, match=expected):
        build_segments([], segment_length, max_segments)


def test_build_segments_labels_by_position():
    documents = [
        Document(40, "later", numbered_words(6)),
        Document(7, "short", "only two"),
    ]

    segments = build_segments(documents, segment_length=4, max_segments=5)

    assert segments == [
        Segment(0, "w0 w1 w2 w3"),
        Segment(0, "w2 w3 w4 w5"),
        Segment(1, "only two"),
    ]


def test_build_segments_rejects_wordless_document():
    documents = [Document(3, "fine", "some words"), Document(12, "<unk> <unk>", "  \n ")]

    with pytest.raises(InputError) as caught:
        build_segments(documents, segment_length=4, max_segments=2)

    assert "document 12 ('<unk> <unk>') has no words" in str(caught.value)


# --- input errors -------------------------------------------------------------------------------


def load_error_message(path: Path) -> str:
    with pytest.raises(InputError) as caught:
        load_documents(str(path))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    message = load_error_message(tmp_path / "absent.txt")

    assert "absent.txt" in message
    assert "not found" in message


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_file(tmp_path, name):
    message = load_error_message(write_text(tmp_path / name, " \n\n"))

    assert name in message
    assert "is empty" in message


def test_folder_without_txt_files(tmp_path):
    write_text(tmp_path / "notes.md", "not a document")

    message = load_error_message(tmp_path)

    assert str(tmp_path) in message
    assert "contains no .txt files" in message


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_text(tmp_path / "locked.txt", " = Title = \n body \n")

    # chmod cannot make a file unreadable for root, so the read itself is made to fail.
    def read_bytes(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    message = load_error_message(path)

    assert "locked.txt" in message
    assert "permission denied" in message


def test_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b" = Caf\xe9 = \n")

    message = load_error_message(path)

    assert "latin1.txt" in message
    assert "is not UTF-8 text" in message
    assert "offset 6" in message


def test_wikitext_file_without_heading(tmp_path):
    message = load_error_message(write_text(tmp_path / "plain.txt", "just some prose\n"))

    assert "plain.txt" in message
    assert "no top-level heading line ' = Title = '" in message


def test_jsonl_invalid_json_names_line(tmp_path):
    path = write_text(tmp_path / "bad.jsonl", '{"text": "fine"}\n\n{"text": \n')

    message = load_error_message(path)

    assert "bad.jsonl" in message
    assert "line 3 is not valid JSON" in message


@pytest.mark.parametrize(
    "record",
    [{"title": "no text"}, {"text": ""}, {"text": "   "}, {"text": 5}],
)
def test_jsonl_record_without_text(tmp_path, record):
    path = write_text(tmp_path / "docs.jsonl", '{"text": "fine"}\n' + json.dumps(record) + "\n")

    message = load_error_message(path)

    assert "docs.jsonl" in message
    assert "line 2 has no non-empty string field 'text'" in message


def test_jsonl_line_not_object(tmp_path):
    message = load_error_message(write_text(tmp_path / "list.jsonl", '["text"]\n'))

    assert "line 1 is not a JSON object" in message


def test_jsonl_title_not_string(tmp_path):
    message = load_error_message(write_text(tmp_path / "t.jsonl", '{"text": "x", "title": 3}\n'))

    assert "line 1 has a non-string 'title' 3" in message


def test_unsupported_suffix(tmp_path):
    message = load_error_message(write_text(tmp_path / "table.csv", "a,b\n"))

    assert "table.csv" in message
    assert "'.csv'" in message
    assert "a WikiText .txt file, a folder of .txt files, or a .jsonl file" in message
