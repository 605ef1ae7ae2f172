"""Tokenised segments, left-padded batches, and the activation cache of the memory's block.

The LM is frozen and the memory sits on the output of one block, so the block's output for a segment
is the same at every epoch. `SegmentData.build_activation_cache` computes it once per segment (no
grad, stored on the CPU without padding); training then runs only the blocks above the memory.

Example:
    data = SegmentData.from_segments(segments, tokenizer, max_length=256)
    data.build_activation_cache(memory_lm, batch_size=16)
    for batch in data.batches(range(len(data)), batch_size=16): ...
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hook_lm import MemoryLM
from utils import head_sequence_cross_entropy, sequence_cross_entropy

logger = logging.getLogger(__name__)


def available_memory_bytes() -> int:
    """Return the memory available to new allocations, from /proc/meminfo or sysconf."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    # NOTE: outside Linux this counts free pages only, so it underestimates what the OS can release
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Batch:
    """Left-padded segments; `hidden_states` is set when the activation cache is on."""

    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq), 1 on real tokens
    labels: torch.Tensor  # (batch,) document label of each segment
    hidden_states: torch.Tensor | None = None  # (batch, seq, hidden) output of the memory's block

    def to(self, device: torch.device) -> "Batch":
        hidden_states = None if self.hidden_states is None else self.hidden_states.to(device)
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     hidden_states)


class SegmentData:
    """Token ids and document labels of every segment, plus the optional activation cache."""

    def __init__(self, token_ids: list[torch.Tensor], labels: list[int], pad_token_id: int):
        self.token_ids = token_ids
        self.labels = labels
        self.pad_token_id = pad_token_id
        self.hidden_states: list[torch.Tensor] | None = None

    @classmethod
    def from_segments(cls, segments, tokenizer, max_length: int) -> "SegmentData":
        """Tokenise `wikitext.Segment`s, truncated to `max_length` tokens."""
        token_ids = []
        for segment in segments:
            ids = tokenizer(segment.text, truncation=True, max_length=max_length)["input_ids"]
            token_ids.append(torch.tensor(ids, dtype=torch.long))
        return cls(token_ids, [segment.label for segment in segments], tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    def collate(self, indices) -> Batch:
        """Left-pad the segments at `indices` into one batch."""
        indices = [int(index) for index in indices]
        seq_len = max(len(self.token_ids[index]) for index in indices)
        input_ids = torch.full((len(indices), seq_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), seq_len), dtype=torch.long)
        for row, index in enumerate(indices):
            ids = self.token_ids[index]
            input_ids[row, seq_len - len(ids):] = ids
            attention_mask[row, seq_len - len(ids):] = 1
        labels = torch.tensor([self.labels[index] for index in indices], dtype=torch.long)
        hidden_states = None
        if self.hidden_states is not None:
            first = self.hidden_states[indices[0]]
            hidden_states = first.new_zeros((len(indices), seq_len, first.shape[-1]))
            for row, index in enumerate(indices):
                cached = self.hidden_states[index]
                hidden_states[row, seq_len - len(cached):] = cached
        return Batch(input_ids, attention_mask, labels, hidden_states)

    def batches(self, order, batch_size: int):
        """Yield batches of `batch_size` segments in the given order of indices."""
        order = [int(index) for index in order]
        for start in range(0, len(order), batch_size):
            yield self.collate(order[start:start + batch_size])

    def cache_bytes(self, hidden_size: int, dtype: torch.dtype) -> int:
        """Return the size in bytes that the activation cache needs."""
        return self.num_tokens * hidden_size * torch.empty((), dtype=dtype).element_size()

    @torch.no_grad()
    def build_activation_cache(self, memory_lm: MemoryLM, batch_size: int, device: torch.device,
                               dtype: torch.dtype = torch.float32) -> None:
        """Store the memory block's output for every segment on the CPU, without padding."""
        hidden_states: list[torch.Tensor] = [torch.empty(0)] * len(self)
        for start in range(0, len(self), batch_size):
            indices = list(range(start, min(start + batch_size, len(self))))
            batch = self.collate(indices).to(device)
            block_output = memory_lm.block_hidden_states(batch.input_ids, batch.attention_mask)
            for row, index in enumerate(indices):
                length = len(self.token_ids[index])
                hidden_states[index] = block_output[row, -length:].to("cpu", dtype).clone()
        self.hidden_states = hidden_states


def batch_cross_entropy(memory_lm: MemoryLM, batch: Batch, docreps: torch.Tensor | None,
                        memory_on: bool = True) -> torch.Tensor:
    """Return each segment's mean cross-entropy (batch,) under `docreps` (batch, key_dim).

    Uses the activation cache when the batch carries hidden states, else the full hooked model.
    `docreps` may have twice the batch's rows: the batch is then run twice in one forward, first
    half with the first DocReps, second half with the rest (own and negative DocReps together).
    """
    repeats = 1 if docreps is None else docreps.shape[0] // batch.input_ids.shape[0]
    input_ids = batch.input_ids.repeat(repeats, 1)
    attention_mask = batch.attention_mask.repeat(repeats, 1)
    if batch.hidden_states is not None:
        hidden_states = batch.hidden_states.repeat(repeats, 1, 1)
        final_hidden = memory_lm.final_hidden_from_block(hidden_states, attention_mask, docreps, memory_on)
    else:
        final_hidden = memory_lm.final_hidden(input_ids, attention_mask, docreps, memory_on)
    input_ids = input_ids.to(final_hidden.device)
    attention_mask = attention_mask.to(final_hidden.device)
    if memory_lm.lm_head.bias is not None:
        return sequence_cross_entropy(memory_lm.lm_head(final_hidden), input_ids, attention_mask)
    # the fused head and cross-entropy never stores the (tokens, vocab) logits
    return head_sequence_cross_entropy(final_hidden, memory_lm.lm_head.weight, input_ids, attention_mask)
