"""Guidance loss, per-sequence cross-entropy, negative DocReps, seeding and run folders.

Guidance loss for one segment with cross-entropy CE+ under its own DocRep and CE- under a negative
DocRep, weight alpha and target tau (nats):

    code:  CE+ + alpha * min((CE- - tau)^2, CE+)   (the public code of Park & Choi)
    paper: CE+ + alpha * |tau - CE-|                (Park & Choi, IJCAI 2024, arXiv 2406.15996)

The loss is computed per segment and averaged over the batch, so a segment's loss does not depend
on which segments share its batch.

Example:
    loss = guidance_loss(ce_positive, ce_negative, alpha=0.1, tau=4.5, form="code").mean()
"""

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from errors import InputError

NEGATIVE_KEY_TYPES = ("other", "random", "zero", "perturb")
GUIDANCE_LOSSES = ("code", "paper")


def sequence_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
    """Return each sequence's mean next-token cross-entropy over its real tokens: (batch,).

    Logits (batch, seq, vocab) at position t predict token t+1; a target counts only when both it
    and its context position are real tokens, so pad tokens never enter the loss.
    """
    targets = input_ids[:, 1:]  # (batch, seq-1)
    token_ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(token_ce.dtype)
    return (token_ce * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def guidance_loss(ce_positive: torch.Tensor, ce_negative: torch.Tensor, alpha: float, tau: float,
                  form: str = "code") -> torch.Tensor:
    """Return the per-segment guidance loss (same shape as the inputs)."""
    if form == "code":
        return ce_positive + alpha * torch.minimum((ce_negative - tau) ** 2, ce_positive)
    if form == "paper":
        return ce_positive + alpha * (tau - ce_negative).abs()
    raise InputError(f"unknown --guidance_loss '{form}'; valid: {', '.join(GUIDANCE_LOSSES)}")


def negative_docreps(docreps: torch.Tensor, labels: torch.Tensor, negative_key_type: str,
                     generator: torch.Generator, perturb_std: float = 0.1) -> torch.Tensor:
    """Return one negative DocRep per segment: (batch, key_dim).

    other: the DocRep of another document, uniform over the rest; random: standard normal;
    zero: all zeros; perturb: the own DocRep plus Gaussian noise of std `perturb_std`.
    """
    own = docreps[labels]  # (batch, key_dim)
    if negative_key_type == "other":
        num_documents = docreps.shape[0]
        if num_documents < 2:
            raise InputError("--negative_key_type other needs at least 2 documents; use --max_labels >= 2")
        # shift by 1..n-1 so the result is never the own label
        shift = torch.randint(1, num_documents, labels.shape, generator=generator)
        return docreps[(labels + shift.to(labels.device)) % num_documents]
    if negative_key_type == "random":
        return torch.randn(own.shape, generator=generator).to(own)
    if negative_key_type == "zero":
        return torch.zeros_like(own)
    if negative_key_type == "perturb":
        return own + perturb_std * torch.randn(own.shape, generator=generator).to(own)
    raise InputError(f"unknown --negative_key_type '{negative_key_type}'; valid: {', '.join(NEGATIVE_KEY_TYPES)}")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for negatives and batch order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_run_dir(save_dir: str | os.PathLike) -> Path:
    """Create and return a new numbered folder `run_NNN` under `save_dir`; never reuse one."""
    root = Path(save_dir)
    root.mkdir(parents=True, exist_ok=True)
    used_numbers = [int(path.name[4:]) for path in root.glob("run_*") if path.name[4:].isdigit()]
    number = max(used_numbers, default=-1) + 1
    while True:
        run_dir = root / f"run_{number:03d}"
        try:
            run_dir.mkdir()
        except FileExistsError:
            # another process took this number between the glob and the mkdir
            number += 1
            continue
        return run_dir


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `hidden @ weight.T` without keeping the logits.

    The logits of a language-model head are (tokens, vocab), far larger than anything else in a
    memory step. This function computes them in chunks of `chunk_size` tokens and, when the input
    needs a gradient, also computes d(loss_i)/d(hidden_i) = (softmax_i - onehot_i) @ weight in the
    same pass, so backward only scales it by the incoming per-token gradient. The head's weight is
    treated as frozen: it gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        losses = hidden.new_empty(hidden.shape[0], dtype=torch.float32)  # (tokens,)
        needs_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end].to(weight.dtype) @ weight.T).float()  # (chunk, vocab)
            target_logits = logits.gather(1, targets[start:end, None])[:, 0]
            log_normalizer = torch.logsumexp(logits, dim=-1)
            losses[start:end] = log_normalizer - target_logits
            if needs_grad:
                probabilities = torch.exp(logits.sub_(log_normalizer[:, None]))
                probabilities.scatter_add_(1, targets[start:end, None],
                                           -torch.ones_like(target_logits)[:, None])
                grad_hidden[start:end] = (probabilities.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None


def head_sequence_cross_entropy(final_hidden: torch.Tensor, head_weight: torch.Tensor,
                                input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                chunk_size: int = 1024) -> torch.Tensor:
    """Return each sequence's mean next-token CE (batch,) from the final-norm hidden states.

    Same value as `sequence_cross_entropy(final_hidden @ head_weight.T, ...)`, but the head runs
    only on positions that predict a real token, and the logits are never stored.
    """
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()  # (batch, seq-1)
    hidden = final_hidden[:, :-1][mask]  # (tokens, hidden)
    targets = input_ids[:, 1:][mask]  # (tokens,)
    token_ce = LinearCrossEntropy.apply(hidden, head_weight, targets, chunk_size)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    sums = torch.zeros(mask.shape[0], device=token_ce.device).index_add(0, rows, token_ce)
    return sums / mask.sum(-1).clamp(min=1)
