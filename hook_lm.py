"""Attach a document memory to one block of a frozen causal LM, and run the LM with or without it.

`MemoryHook` is a context manager around a forward hook on the block. Inside the `with`, the block's
output h becomes h + memory(h, DocReps). On exit the hook is removed, also when the forward raised.
`MemoryLM` bundles the frozen LM, the memory and the hooked block, and runs either the whole hooked
model, or, because the LM is frozen, only the blocks above the memory on hidden states computed once
(the activation cache).

Example:
    memory_lm = MemoryLM(model, memory, hook_memory_layer=-1)
    logits = memory_lm.logits(input_ids, attention_mask, docreps)  # (batch, seq, vocab)
"""

import contextlib

import torch
from torch import nn

import foundations
from document_memories import DocumentMemory

# Attribute set on a block while a memory hook is attached, so that a second attach fails.
HOOK_MARKER = "_document_memory_hook"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return position ids that start at 0 on each sequence's first real token.

    With left padding, the default positions (0..seq-1 for every row) would shift a padded
    sequence's rotary positions. Counting real tokens makes its logits match the unpadded ones.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class MemoryHook:
    """Context manager that adds a memory's update to the output of one block.

    `docreps` (batch, key_dim) is read at every forward, so callers may change it between calls;
    None reads the memory with every entry selected. The block may return a tensor
    (transformers 5) or a tuple whose first element is the hidden states.
    """

    def __init__(self, block: nn.Module, memory: DocumentMemory, docreps: torch.Tensor | None = None):
        self.block = block
        self.memory = memory
        self.docreps = docreps
        self.handle = None

    def _hook(self, module, inputs, output):
        hidden_states = output[0] if isinstance(output, tuple) else output
        updated = hidden_states + self.memory(hidden_states, self.docreps)
        if isinstance(output, tuple):
            return (updated, *output[1:])
        return updated

    def __enter__(self) -> "MemoryHook":
        if getattr(self.block, HOOK_MARKER, False):
            raise RuntimeError("a document memory is already attached to this block")
        self.handle = self.block.register_forward_hook(self._hook)
        setattr(self.block, HOOK_MARKER, True)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.handle.remove()
        self.handle = None
        delattr(self.block, HOOK_MARKER)


@contextlib.contextmanager
def swapped_layers(base_model: nn.Module, layers: list[nn.Module]):
    """Temporarily replace the decoder layers that `base_model` runs with `layers`."""
    original = base_model.layers
    base_model.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        base_model.layers = original


class MemoryLM:
    """A frozen causal LM with a document memory on the output of block `hook_memory_layer`."""

    def __init__(self, model: nn.Module, memory: DocumentMemory, hook_memory_layer: int):
        self.model = model
        self.memory = memory
        self.layer = foundations.resolve_layer(model, hook_memory_layer)
        self.block = foundations.get_block(model, self.layer)
        self.base_model = foundations.get_base_model(model)
        self.lm_head = foundations.get_lm_head(model)

    @property
    def memory_device(self) -> torch.device:
        return next(self.block.parameters()).device

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     docreps: torch.Tensor | None, memory_on: bool = True) -> torch.Tensor:
        """Run every block with the memory hooked in; return the final-norm output (batch, seq, hidden).

        With `memory_on=False` this is the base LM; `docreps=None` reads the memory with every
        entry selected.
        """
        position_ids = position_ids_from_mask(attention_mask)
        with contextlib.ExitStack() as stack:
            if memory_on:
                stack.enter_context(MemoryHook(self.block, self.memory, docreps))
            output = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False)
        return output.last_hidden_state

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               docreps: torch.Tensor | None, memory_on: bool = True) -> torch.Tensor:
        """Return the hooked model's logits (batch, seq, vocab); see `final_hidden`."""
        return self.lm_head(self.final_hidden(input_ids, attention_mask, docreps, memory_on))

    @torch.no_grad()
    def block_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run blocks 0..layer only; return the hooked block's raw output (batch, seq, hidden).

        The raw output is taken by a hook, because the last entry of `output_hidden_states` is
        taken after the final norm.
        """
        captured = {}

        def capture(module, inputs, output):
            captured["hidden_states"] = output[0] if isinstance(output, tuple) else output

        layers = list(self.base_model.layers)[: self.layer + 1]
        handle = self.block.register_forward_hook(capture)
        try:
            with swapped_layers(self.base_model, layers):
                self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        finally:
            handle.remove()
        return captured["hidden_states"]

    def final_hidden_from_block(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                                docreps: torch.Tensor | None, memory_on: bool = True) -> torch.Tensor:
        """Apply the memory to the block's output, then run only the blocks above and the final norm.

        Gives the same result as `final_hidden` on the same tokens, without running blocks 0..layer.
        """
        memory_dtype = next(self.memory.parameters()).dtype
        hidden_states = hidden_states.to(self.memory_device, memory_dtype)
        if memory_on:
            hidden_states = hidden_states + self.memory(hidden_states, docreps)
        layers = list(self.base_model.layers)[self.layer + 1:]
        with swapped_layers(self.base_model, layers):
            output = self.base_model(inputs_embeds=hidden_states, attention_mask=attention_mask,
                                     position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return output.last_hidden_state

    def logits_from_block(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                          docreps: torch.Tensor | None, memory_on: bool = True) -> torch.Tensor:
        """Return logits (batch, seq, vocab) from the block's output; see `final_hidden_from_block`."""
        return self.lm_head(self.final_hidden_from_block(hidden_states, attention_mask, docreps, memory_on))
