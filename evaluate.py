"""Evaluate trained document memories and write metrics, figures and report.md into the run folder.

For every trained document, the mean cross-entropy of its segments is measured under its own DocRep,
under each other document's DocRep, with the memory attached but no DocRep (every entry selected),
and with the memory off (the base LM). A memory that has learned its documents gives the lowest CE
under the document's own DocRep. On top of the CE matrix the evaluation scores recall in greedy
generation with ROUGE, measures the document selections (L0, L2, pairwise distance), draws the
perplexity landscape over DocRep space (key_dim 2) and lists the logit-lens tokens of each memory.
Training runs it at its end; this command runs it again on a saved run folder and rewrites the
same files.

Example:
    python evaluate.py outputs/smollm2/135m/run_000 --eval_new_tokens 32
"""

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import torch

import figures
import foundations
import landscape
import memory_metrics
import recall
import report
import wikitext
from checkpoint import CHECKPOINT_NAME, load_memory, read_checkpoint
from config import GuidanceConfig, OneLineErrorParser
from errors import InputError
from hook_lm import MemoryLM
from segment_data import SegmentData, batch_cross_entropy

logger = logging.getLogger("evaluate")

EVALUATION_PREFIX = "eval_"
# Evaluation options that must be at least 1; the others must be finite and >= 0.

@torch.no_grad()
def segment_ce(memory_lm: MemoryLM, data: SegmentData, batch_size: int, docrep: torch.Tensor | None,
               memory_on: bool = True) -> torch.Tensor:
    """Return every segment's CE (num_segments,) under one DocRep (key_dim,) for all segments."""
    values = []
    for batch in data.batches(range(len(data)), batch_size):
        batch = batch.to(memory_lm.memory_device)
        docreps = None if docrep is None else docrep.expand(batch.input_ids.shape[0], -1)
        values.append(batch_cross_entropy(memory_lm, batch, docreps, memory_on).float().cpu())
    return torch.cat(values)


def per_document_mean(values: torch.Tensor, labels: list[int], num_documents: int) -> torch.Tensor:
    """Average per-segment values into per-document values (num_documents,)."""
    labels_tensor = torch.tensor(labels)
    sums = torch.zeros(num_documents).index_add_(0, labels_tensor, values)
    counts = torch.bincount(labels_tensor, minlength=num_documents).clamp(min=1)
    return sums / counts


@torch.no_grad()
def ce_matrix(memory_lm: MemoryLM, data: SegmentData, batch_size: int) -> dict[str, torch.Tensor]:
    """Return per-document mean CE under each DocRep, without DocRep and with the memory off.

    `docrep` is (num_documents, num_documents): row d is document d's segments, column j is
    DocRep j. `no_docrep` and `memory_off` are (num_documents,). The memory off is the base LM.
    """
    docreps = memory_lm.memory.docreps
    num_documents = docreps.shape[0]
    columns = [
        per_document_mean(segment_ce(memory_lm, data, batch_size, docrep), data.labels, num_documents)
        for docrep in docreps
    ]
    no_docrep = segment_ce(memory_lm, data, batch_size, None)
    memory_off = segment_ce(memory_lm, data, batch_size, None, memory_on=False)
    return {
        "docrep": torch.stack(columns, dim=1),
        "no_docrep": per_document_mean(no_docrep, data.labels, num_documents),
        "memory_off": per_document_mean(memory_off, data.labels, num_documents),
    }


def metrics_from_matrix(matrix: dict[str, torch.Tensor], documents) -> dict:
    """Turn a CE matrix into the JSON-ready per-document table, accuracy and mean margin."""
    table = []
    ce = matrix["docrep"]
    margins = memory_metrics.ce_margins(ce)
    for label, document in enumerate(documents):
        others = {str(j): float(ce[label, j]) for j in range(ce.shape[1]) if j != label}
        own = float(ce[label, label])
        table.append({
            "label": label,
            "document_index": document.index,
            "title": document.title,
            "ce_own": own,
            "ce_other": others,
            "ce_best_other": min(others.values(), default=math.nan),
            "ce_margin": margins[label],
            "ce_no_docrep": float(matrix["no_docrep"][label]),
            "ce_memory_off": float(matrix["memory_off"][label]),
            # identified: the own DocRep gives a lower CE than every other DocRep
            "identified": bool(own < min(others.values(), default=math.inf)),
            "own_below_memory_off": bool(own < float(matrix["memory_off"][label])),
        })
    return {
        "documents": table,
        "identification_accuracy": memory_metrics.identification_accuracy(ce),
        "mean_margin": memory_metrics.mean_margin(ce),
        "ce_matrix": {name: values.tolist() for name, values in matrix.items()},
    }


def write_json(path: Path, content) -> None:
    """Write `content` as indented JSON; NaN and infinity become null, which JSON lacks."""
    Path(path).write_text(json.dumps(_finite_or_none(content), indent=2) + "\n", encoding="utf-8")


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def write_metrics(path: Path, matrix: dict[str, torch.Tensor], documents) -> dict:
    """Write metrics.json with the CE matrix metrics only, and return its content."""
    metrics = metrics_from_matrix(matrix, documents)
    write_json(path, metrics)
    return metrics


def format_ce_table(metrics: dict) -> str:
    """Return the per-document CE table as Markdown."""
    lines = ["| label | document | CE own | best other CE | CE no DocRep | CE memory off |",
             "|---|---|---|---|---|---|"]
    for row in metrics["documents"]:
        lines.append(f"| {row['label']} | {row['title'][:40]} | {row['ce_own']:.3f} | "
                     f"{row['ce_best_other']:.3f} | {row['ce_no_docrep']:.3f} | {row['ce_memory_off']:.3f} |")
    return "\n".join(lines)


def memory_section(memory_lm: MemoryLM, data: SegmentData, documents, tokenizer, threshold: float) -> dict:
    """Return the document-selection metrics and their correlations with document lengths."""
    memory = memory_lm.memory
    with torch.no_grad():
        selections = memory.document_selection(memory.docreps).float().cpu()
    metrics = memory_metrics.selection_metrics(selections, threshold)
    trained_tokens = [0] * len(documents)
    for ids, label in zip(data.token_ids, data.labels):
        trained_tokens[label] += len(ids)
    document_tokens = [len(tokenizer(document.text, add_special_tokens=False)["input_ids"])
                       for document in documents]
    metrics["document_tokens"] = document_tokens
    metrics["trained_tokens"] = trained_tokens
    metrics["correlations"] = memory_metrics.size_length_correlations(
        metrics, {"document_tokens": document_tokens, "trained_tokens": trained_tokens})
    return metrics


def landscape_section(memory_lm: MemoryLM, data: SegmentData, config: GuidanceConfig, run_dir: Path,
                      documents) -> list[dict]:
    """Compute and draw the perplexity landscape of the first documents; empty unless key_dim is 2."""
    docreps = memory_lm.memory.docreps
    if docreps.shape[1] != 2 or config.eval_landscape_documents == 0:
        return []
    folder = run_dir / "landscape"
    folder.mkdir(exist_ok=True)
    xs, ys = landscape.landscape_axes(docreps, config.eval_landscape_points, config.eval_landscape_margin)
    entries = []
    for label in range(min(config.eval_landscape_documents, len(documents))):
        ce = landscape.landscape_ce(memory_lm, data, label, xs, ys, config.batch_size)
        path = folder / f"landscape_doc{label}.png"
        figures.draw_landscape(xs.numpy(), ys.numpy(), ce.exp().numpy(), docreps.cpu().numpy(), label,
                               documents[label].title, path)
        entries.append({"label": label, "figure": str(path.relative_to(run_dir)), "xs": xs.tolist(),
                        "ys": ys.tolist(), "ce": ce.tolist(), "min_perplexity": float(ce.min().exp())})
    write_json(folder / "landscape.json", entries)
    return entries


def run_evaluation(run_dir: Path, config: GuidanceConfig, memory_lm: MemoryLM, data: SegmentData,
                   documents, tokenizer, history: list[dict]) -> dict:
    """Evaluate a trained memory, write every evaluation file into `run_dir`, and return the metrics.

    The files are metrics.json, generations.json, logit_lens.json, landscape/, memory_selection.gif
    (from the saved frames) and report.md.
    """
    run_dir = Path(run_dir)
    frames = sorted((run_dir / "frames").glob("epoch_*.png"))
    if frames:
        figures.write_gif(frames, run_dir / "memory_selection.gif")

    metrics = metrics_from_matrix(ce_matrix(memory_lm, data, config.batch_size), documents)
    logger.info("per-document CE (nats):\n%s", format_ce_table(metrics))
    logger.info("identification accuracy %.3f, mean CE margin %.3f", metrics["identification_accuracy"],
                metrics["mean_margin"])

    segments = wikitext.build_segments(documents, config.segment_length, config.max_segements)
    prompts = recall.build_prompts(segments, tokenizer, config.eval_prompt_words, config.eval_new_tokens,
                                   config.eval_prompts_per_document)
    if not prompts:
        logger.warning("no segment is longer than --eval_prompt_words %d words; ROUGE is n/a",
                       config.eval_prompt_words)
    generations = recall.generate_and_score(memory_lm, tokenizer, prompts, config.eval_new_tokens,
                                            config.batch_size)
    write_json(run_dir / "generations.json", generations)
    metrics["rouge"] = generations["mean"]
    metrics["num_prompts"] = len(prompts)

    metrics["memory"] = memory_section(memory_lm, data, documents, tokenizer, config.eval_l0_threshold)
    lens = landscape.logit_lens(memory_lm, data, tokenizer, config.eval_top_k, config.batch_size)
    write_json(run_dir / "logit_lens.json", lens)
    landscapes = landscape_section(memory_lm, data, config, run_dir, documents)
    write_json(run_dir / "metrics.json", metrics)

    text = report.build_report(config, metrics, generations, lens, landscapes, history,
                               figure_names=report.existing_figures(run_dir))
    (run_dir / "report.md").write_text(text, encoding="utf-8")
    logger.info("wrote %s", run_dir / "report.md")
    return metrics


def rebuild_documents(run_dir: Path, config: GuidanceConfig) -> list:
    """Reload the corpus and pick the run's documents by their saved corpus indices."""
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("documents")
    if not saved:
        raise InputError(f"{run_dir / 'config.json'} lists no documents; it was not written by train_guidance.py")
    corpus = wikitext.load_documents(config.data_path, config.wikitext_config, config.data_cache_dir)
    documents = []
    for entry in sorted(saved, key=lambda item: item["label"]):
        index = entry["index"]
        if not 0 <= index < len(corpus) or corpus[index].title != entry["title"]:
            raise InputError(f"document {index} ({entry['title']!r}) of {run_dir} is not in "
                             f"{config.data_path or config.wikitext_config}; evaluate with the training data")
        documents.append(corpus[index])
    return documents


def load_saved_run(run_dir: Path, overrides: dict):
    """Rebuild config, documents, model, memory, data and history of a saved run folder."""
    for name in ("config.json", CHECKPOINT_NAME):
        if not (run_dir / name).is_file():
            raise InputError(f"{run_dir / name} not found; pass a run folder written by train_guidance.py")
    # replace() runs the config's validation on the overridden evaluation flags
    config = dataclasses.replace(GuidanceConfig.load(run_dir / "config.json"), **overrides)
    documents = rebuild_documents(run_dir, config)

    model, tokenizer = foundations.load_foundation(config.lm_name, config.lm_size, lm_path=config.lm_path,
                                                   cache_dir=config.lm_cache_dir, num_gpus=config.num_gpus)
    block = foundations.get_block(model, config.hook_memory_layer)
    memory = load_memory(run_dir / CHECKPOINT_NAME, device=next(block.parameters()).device)
    memory_lm = MemoryLM(model, memory, config.hook_memory_layer)

    segments = wikitext.build_segments(documents, config.segment_length, config.max_segements)
    data = SegmentData.from_segments(segments, tokenizer, config.max_length)
    if not config.no_activation_cache:
        data.build_activation_cache(memory_lm, config.batch_size, memory_lm.memory_device)
    _, metadata = read_checkpoint(run_dir / CHECKPOINT_NAME)
    history = json.loads(metadata["state"]).get("history", [])
    return config, documents, memory_lm, data, tokenizer, history


def build_parser() -> OneLineErrorParser:
    """Build the parser: a run folder, plus optional overrides of the evaluation flags."""
    parser = OneLineErrorParser(description="Evaluate a saved run folder and rewrite its report.md.")
    parser.add_argument("run_dir", type=Path, help="run folder with config.json and checkpoint.safetensors")
    for action in GuidanceConfig.build_parser()._actions:
        if action.dest.startswith(EVALUATION_PREFIX):
            parser.add_argument(*action.option_strings, dest=action.dest, type=action.type,
                                default=None, help=action.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    arguments = vars(build_parser().parse_args(argv))
    run_dir = arguments.pop("run_dir")
    overrides = {name: value for name, value in arguments.items() if value is not None}
    try:
        config, documents, memory_lm, data, tokenizer, history = load_saved_run(run_dir, overrides)
        autocast = torch.autocast(device_type=memory_lm.memory_device.type, dtype=torch.bfloat16,
                                  enabled=config.precision == "bf16" and memory_lm.memory_device.type == "cuda")
        with torch.no_grad(), autocast:
            run_evaluation(run_dir, config, memory_lm, data, documents, tokenizer, history)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
