"""Metrics of the document selections key_act(g(K)) and of a CE matrix, on plain tensors.

Selections are (num_documents, hook_memory_dim), one row per document. L0 counts the entries whose
absolute value is above a threshold, L1 and L2 are the usual norms of a row, and the pairwise
distance is the Euclidean distance between two documents' rows. A CE matrix is
(num_documents, num_documents): row d contains document d's mean CE under each DocRep.

Example:
    summary = selection_metrics(memory.document_selection(memory.docreps), threshold=0.01)
    accuracy = identification_accuracy(ce_matrix)
"""

import math

import torch


def l0_norms(selections: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return each row's number of entries with absolute value above `threshold`: (rows,)."""
    return (selections.abs() > threshold).sum(dim=1).to(torch.float64)


def l1_norms(selections: torch.Tensor) -> torch.Tensor:
    return selections.abs().sum(dim=1).to(torch.float64)


def l2_norms(selections: torch.Tensor) -> torch.Tensor:
    return selections.norm(dim=1).to(torch.float64)


def mean_pairwise_distance(selections: torch.Tensor) -> float:
    """Return the mean Euclidean distance over all pairs of distinct rows; NaN for fewer than 2 rows."""
    num_rows = selections.shape[0]
    if num_rows < 2:
        return math.nan
    distances = torch.cdist(selections[None].double(), selections[None].double())[0]
    first, second = torch.triu_indices(num_rows, num_rows, offset=1)
    return float(distances[first, second].mean())


def pearson_correlation(first: list[float], second: list[float]) -> float:
    """Return Pearson's r of two equally long sequences; NaN when either is constant or too short."""
    x = torch.tensor(first, dtype=torch.float64)
    y = torch.tensor(second, dtype=torch.float64)
    if x.numel() < 2 or x.numel() != y.numel():
        return math.nan
    x = x - x.mean()
    y = y - y.mean()
    denominator = float(x.norm() * y.norm())
    if denominator == 0.0:
        return math.nan
    return float((x * y).sum()) / denominator


def selection_metrics(selections: torch.Tensor, threshold: float) -> dict:
    """Return per-document L0/L1/L2 and the summary metrics of one set of document selections.

    `pairwise_distance_over_l2` divides the mean pairwise distance by the mean L2 norm, so that it
    compares how far apart the documents' selections are with how large they are.
    """
    selections = selections.detach().cpu().to(torch.float64)
    l0 = l0_norms(selections, threshold)
    l1 = l1_norms(selections)
    l2 = l2_norms(selections)
    pairwise = mean_pairwise_distance(selections)
    mean_l2 = float(l2.mean())
    return {
        "threshold": threshold,
        "l0": l0.tolist(),
        "l1": l1.tolist(),
        "l2": l2.tolist(),
        "mean_l0": float(l0.mean()),
        "mean_l1": float(l1.mean()),
        "mean_l2": mean_l2,
        "mean_pairwise_distance": pairwise,
        "pairwise_distance_over_l2": pairwise / mean_l2 if mean_l2 > 0 else math.nan,
    }


def size_length_correlations(metrics: dict, lengths: dict[str, list[int]]) -> dict:
    """Return Pearson's r between each memory size (L0, L1) and each length list in `lengths`."""
    return {
        f"{size}_vs_{name}": pearson_correlation(metrics[size], [float(value) for value in values])
        for size in ("l0", "l1")
        for name, values in lengths.items()
    }


def identification_accuracy(ce: torch.Tensor) -> float:
    """Return the fraction of rows whose smallest CE is on the diagonal (the own DocRep).

    A tie with another DocRep counts as not identified, because the own DocRep is not the only best.
    """
    num_documents = ce.shape[0]
    if num_documents == 0:
        return math.nan
    identified = [bool(ce[row, row] < best_other_ce(ce, row)) for row in range(num_documents)]
    return sum(identified) / num_documents


def best_other_ce(ce: torch.Tensor, row: int) -> float:
    """Return the lowest CE of row `row` over the other documents' DocReps; inf when there is none."""
    others = [float(ce[row, column]) for column in range(ce.shape[1]) if column != row]
    return min(others, default=math.inf)


def ce_margins(ce: torch.Tensor) -> list[float]:
    """Return, per document, the best other CE minus the own CE; positive means identified."""
    return [best_other_ce(ce, row) - float(ce[row, row]) for row in range(ce.shape[0])]


def mean_margin(ce: torch.Tensor) -> float:
    """Return the mean of `ce_margins`; NaN without documents, inf with a single document."""
    margins = ce_margins(ce)
    return sum(margins) / len(margins) if margins else math.nan
