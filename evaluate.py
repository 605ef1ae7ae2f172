"""Evaluate trained document memories: cross-entropy of each document under every DocRep.

For every trained document, the mean cross-entropy of its segments is measured under its own DocRep,
under each other document's DocRep, with the memory attached but no DocRep (every entry selected),
with the memory off (the base LM). A memory that has learned its documents gives the lowest CE under
the document's own DocRep.

Example:
    matrix = ce_matrix(memory_lm, data, batch_size=16)
    write_metrics(run_dir / "metrics.json", matrix, documents)
"""

import json
from pathlib import Path

import torch

from hook_lm import MemoryLM
from segment_data import SegmentData, batch_cross_entropy


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
    DocRep j. `no_docrep` and `memory_off` are (num_documents,).
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
    """Turn a CE matrix into the JSON-ready per-document table of metrics.json."""
    table = []
    ce = matrix["docrep"]
    for label, document in enumerate(documents):
        others = {str(j): float(ce[label, j]) for j in range(ce.shape[1]) if j != label}
        own = float(ce[label, label])
        table.append({
            "label": label,
            "document_index": document.index,
            "title": document.title,
            "ce_own": own,
            "ce_other": others,
            "ce_best_other": min(others.values(), default=float("nan")),
            "ce_no_docrep": float(matrix["no_docrep"][label]),
            "ce_memory_off": float(matrix["memory_off"][label]),
            # identified: the own DocRep gives a lower CE than every other DocRep
            "identified": bool(own < min(others.values(), default=float("inf"))),
            "own_below_memory_off": bool(own < float(matrix["memory_off"][label])),
        })
    return {
        "documents": table,
        "identification_accuracy": sum(row["identified"] for row in table) / max(len(table), 1),
    }


def write_metrics(path: Path, matrix: dict[str, torch.Tensor], documents) -> dict:
    """Write metrics.json and return its content."""
    metrics = metrics_from_matrix(matrix, documents)
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def format_ce_table(metrics: dict) -> str:
    """Return the per-document CE table as Markdown."""
    lines = ["| label | document | CE own | best other CE | CE no DocRep | CE memory off |",
             "|---|---|---|---|---|---|"]
    for row in metrics["documents"]:
        lines.append(f"| {row['label']} | {row['title'][:40]} | {row['ce_own']:.3f} | "
                     f"{row['ce_best_other']:.3f} | {row['ce_no_docrep']:.3f} | {row['ce_memory_off']:.3f} |")
    return "\n".join(lines)
