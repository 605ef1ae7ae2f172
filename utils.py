"""Guidance loss, per-sequence cross-entropy, negative DocReps, seeding and run folders.

Guidance loss for one segment with cross-entropy CE+ under its own DocRep and CE- under a negative
DocRep, weight alpha and target tau (nats):

    code:  CE+ + alpha * min((CE- - tau)^2, CE+)   (the authors' public code)
    paper: CE+ + alpha * |tau - CE-|                (the paper's equation)

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
    taken = [int(path.name[4:]) for path in root.glob("run_*") if path.name[4:].isdigit()]
    number = max(taken, default=-1) + 1
    while True:
        run_dir = root / f"run_{number:03d}"
        try:
            run_dir.mkdir()
        except FileExistsError:
            # another process took this number between the glob and the mkdir
            number += 1
            continue
        return run_dir
