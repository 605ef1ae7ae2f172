"""Probes of a trained memory beyond the CE matrix: perplexity landscape and logit lens.

The perplexity landscape evaluates a document's segments under every DocRep of a square grid that
covers all trained DocReps with a margin (2-dimensional DocReps only), so that a heatmap shows where
in DocRep space the document is remembered. The logit lens projects the memory's mean update on a
document's tokens through the LM's final norm and unembedding, and lists the tokens it pushes up.

Example:
    xs, ys = landscape_axes(memory.docreps, points=11, margin=0.5)
    ce = landscape_ce(memory_lm, data, label=0, xs=xs, ys=ys, batch_size=16)  # (11, 11)
"""

import torch

import foundations
from hook_lm import MemoryLM
from segment_data import SegmentData, batch_cross_entropy


def landscape_axes(docreps: torch.Tensor, points: int, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the grid's x and y coordinates (points,) spanning all DocReps plus `margin` each side."""
    low = docreps.detach().cpu().double().min(dim=0).values - margin
    high = docreps.detach().cpu().double().max(dim=0).values + margin
    return torch.linspace(low[0], high[0], points), torch.linspace(low[1], high[1], points)


@torch.no_grad()
def landscape_ce(memory_lm: MemoryLM, data: SegmentData, label: int, xs: torch.Tensor, ys: torch.Tensor,
                 batch_size: int) -> torch.Tensor:
    """Return the document's mean segment CE under each grid DocRep: (len(ys), len(xs)).

    Row i, column j is the DocRep (xs[j], ys[i]). Each forward pass carries the document's segments
    once per grid point, with about `batch_size` sequences in all.
    """
    indices = [index for index, segment_label in enumerate(data.labels) if segment_label == label]
    batch = data.collate(indices).to(memory_lm.memory_device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1).float()  # (points^2, 2)
    points_per_pass = max(1, batch_size // len(indices))
    values = []
    for start in range(0, grid.shape[0], points_per_pass):
        chunk = grid[start:start + points_per_pass].to(memory_lm.memory_device)
        # batch_cross_entropy repeats the batch once per block of len(indices) DocReps
        docreps = chunk.repeat_interleave(len(indices), dim=0)
        ce = batch_cross_entropy(memory_lm, batch, docreps).float().cpu()
        values.append(ce.view(chunk.shape[0], len(indices)).mean(dim=1))
    return torch.cat(values).view(len(ys), len(xs))


@torch.no_grad()
def mean_memory_updates(memory_lm: MemoryLM, data: SegmentData, batch_size: int) -> torch.Tensor:
    """Return each document's memory update under its own DocRep, averaged over its real tokens.

    The result is (num_documents, hidden_size), in the hooked block's output space.
    """
    memory = memory_lm.memory
    num_documents = memory.docreps.shape[0]
    sums = torch.zeros(num_documents, memory.settings["hidden_size"], dtype=torch.float64)
    counts = torch.zeros(num_documents, dtype=torch.float64)
    for batch in data.batches(range(len(data)), batch_size):
        batch = batch.to(memory_lm.memory_device)
        hidden_states = batch.hidden_states
        if hidden_states is None:
            hidden_states = memory_lm.block_hidden_states(batch.input_ids, batch.attention_mask)
        hidden_states = hidden_states.to(memory_lm.memory_device, next(memory.parameters()).dtype)
        update = memory(hidden_states, memory.docreps[batch.labels])  # (batch, seq, hidden)
        mask = batch.attention_mask[..., None].to(update.dtype)
        sums.index_add_(0, batch.labels.cpu(), (update * mask).sum(1).double().cpu())
        counts.index_add_(0, batch.labels.cpu(), mask.sum((1, 2)).double().cpu())
    return sums / counts.clamp(min=1)[:, None]


@torch.no_grad()
def logit_lens(memory_lm: MemoryLM, data: SegmentData, tokenizer, top_k: int, batch_size: int) -> list[dict]:
    """Return, per document, the `top_k` tokens whose logits the mean memory update raises most.

    The update is read as a hidden state: final norm, then the LM head, as in the logit lens. With
    the memory below the last block this ignores what the blocks above do with the update.
    """
    updates = mean_memory_updates(memory_lm, data, batch_size)
    norm = foundations.get_final_norm(memory_lm.model)
    head = memory_lm.lm_head
    weight = next(head.parameters())
    logits = head(norm(updates.to(weight.device, weight.dtype))).float().cpu()  # (documents, vocab)
    values, token_ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    table = []
    for label in range(logits.shape[0]):
        table.append({
            "label": label,
            "tokens": [{"id": int(token_id), "token": tokenizer.decode([int(token_id)]), "logit": float(value)}
                       for token_id, value in zip(token_ids[label], values[label])],
        })
    return table
