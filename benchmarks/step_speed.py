"""Time one guidance training step three ways on the same model, batch and memory.

(a) public: two full hooked forwards (own DocRep, then negative DocRep) with the LM's parameters
    trainable, so backward walks every block. The LM's gradients are then zeroed, as in the public
    code of Park & Choi.
(b) frozen: the same two full forwards with the LM frozen.
(c) cached: this project's step: the memory block's output is computed once, and each step runs
    only the blocks above it, for both DocReps in one batched forward.

All three start from the same memory weights and see the same batches and negative DocReps, so their
losses must agree; the script prints steps per second, the speed-up ratios, the largest loss
difference, and the ratios predicted from the FLOPs of the blocks each path runs.

Example (SmolLM2-135M, memory on the last block, 8 segments of 128 tokens):
    python benchmarks/step_speed.py --model smollm2 --layer -1 --batch_size 8 --seq_len 128
"""

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import foundations  # noqa: E402
from document_memories import DocumentMemory  # noqa: E402
from hook_lm import MemoryLM  # noqa: E402
from segment_data import Batch, batch_cross_entropy  # noqa: E402
from utils import guidance_loss, negative_docreps  # noqa: E402

logger = logging.getLogger("step_speed")


def load_model(name: str):
    """Return a frozen model: the real SmolLM2-135M, or a tiny random Llama for a smoke test."""
    if name == "smollm2":
        model, _ = foundations.load_foundation("smollm2", "135m")
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def make_batches(model, args) -> list[Batch]:
    """Random token batches with left padding in half of the rows."""
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.config.vocab_size
    batches = []
    for _ in range(args.steps + args.warmup):
        input_ids = torch.randint(0, vocab_size, (args.batch_size, args.seq_len), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[::2, : args.seq_len // 4] = 0
        labels = torch.randint(0, args.num_documents, (args.batch_size,), generator=generator)
        batches.append(Batch(input_ids, attention_mask, labels))
    return batches


def step_two_forwards(memory_lm: MemoryLM, batch: Batch, negative: torch.Tensor, args) -> torch.Tensor:
    """Guidance loss from two separate full hooked forwards (paths a and b)."""
    own = memory_lm.memory.docreps[batch.labels]
    ce_positive = batch_cross_entropy(memory_lm, batch, own)
    ce_negative = batch_cross_entropy(memory_lm, batch, negative)
    return guidance_loss(ce_positive, ce_negative, args.guidance, 4.5).mean()


def step_cached(memory_lm: MemoryLM, batch: Batch, negative: torch.Tensor, args) -> torch.Tensor:
    """Guidance loss from one batched forward of the blocks above the memory (path c)."""
    own = memory_lm.memory.docreps[batch.labels]
    ce_positive, ce_negative = batch_cross_entropy(memory_lm, batch, torch.cat([own, negative])).chunk(2)
    return guidance_loss(ce_positive, ce_negative, args.guidance, 4.5).mean()


def run_path(path: str, model, memory: DocumentMemory, batches: list[Batch], negatives, args):
    """Train `args.steps` steps after `args.warmup` untimed ones; return (seconds, losses)."""
    memory = copy.deepcopy(memory)
    memory_lm = MemoryLM(model, memory, args.layer)
    optimizer = torch.optim.AdamW(memory.parameters(), lr=1e-3)
    model.requires_grad_(path == "public")
    if path == "cached":
        for batch in batches:
            batch.hidden_states = memory_lm.block_hidden_states(batch.input_ids, batch.attention_mask)
    step = step_cached if path == "cached" else step_two_forwards
    losses = []
    start = 0.0
    for index, (batch, negative) in enumerate(zip(batches, negatives)):
        if index == args.warmup:
            start = time.perf_counter()
        loss = step(memory_lm, batch, negative, args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)  # the public code's LM gradients are computed, then dropped
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    model.requires_grad_(False)
    for batch in batches:
        batch.hidden_states = None
    return elapsed, losses


def flops_per_token(model, layer: int, seq_len: int) -> dict[str, float]:
    """Predict each path's FLOPs per token from block and head sizes.

    A forward costs 2 FLOPs per weight plus attention (about 2 * seq_len * hidden per block, with
    the causal mask halving 4 * seq_len * hidden). Backward to the inputs costs one forward, and
    weight gradients another; only path (a) needs weight gradients and a backward below the memory.
    """
    blocks = foundations.get_blocks(model)
    hidden_size = model.config.hidden_size
    block_cost = [2 * sum(p.numel() for p in block.parameters()) + 2 * seq_len * hidden_size for block in blocks]
    head = 2 * foundations.get_lm_head(model).weight.numel()
    all_blocks = sum(block_cost)
    upper = sum(block_cost[layer + 1:])
    return {
        "public": 2 * 3 * (all_blocks + head),
        "frozen": 2 * (all_blocks + head) + 2 * (upper + head),
        "cached": 2 * (upper + head) + 2 * (upper + head),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time guidance training steps three ways.")
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2", help="model to time")
    parser.add_argument("--layer", type=int, default=-1, help="block whose output gets the memory")
    parser.add_argument("--batch_size", type=int, default=8, help="segments per step")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per segment")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--hook_memory_dim", type=int, default=32, help="memory entries")
    parser.add_argument("--num_documents", type=int, default=10, help="number of DocReps")
    parser.add_argument("--guidance", type=float, default=0.1, help="guidance weight alpha")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps the default")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    args.layer = foundations.resolve_layer(model, args.layer)
    memory = DocumentMemory(model.config.hidden_size, args.hook_memory_dim, args.num_documents, seed=0)
    batches = make_batches(model, args)
    generator = torch.Generator().manual_seed(1)
    negatives = [negative_docreps(memory.docreps, batch.labels, "other", generator) for batch in batches]

    results = {path: run_path(path, model, memory, batches, negatives, args)
               for path in ("public", "frozen", "cached")}
    log_results(results, flops_per_token(model, args.layer, args.seq_len), args)
    return 0


def log_results(results: dict, flops: dict, args) -> None:
    logger.info("model %s, memory on block %d, batch %d x %d tokens, %d timed steps per path",
                args.model, args.layer, args.batch_size, args.seq_len, args.steps)
    for path, (seconds, _) in results.items():
        logger.info("%-7s %7.3f steps/s  (%.3f s/step)", path, args.steps / seconds, seconds / args.steps)
    cached_seconds = results["cached"][0]
    for path in ("public", "frozen"):
        logger.info("speed-up cached vs %-6s measured %5.2fx  predicted from FLOPs %5.2fx", path,
                    results[path][0] / cached_seconds, flops[path] / flops["cached"])
    cached_losses = results["cached"][1]
    for path in ("public", "frozen"):
        difference = max(abs(a - b) for a, b in zip(results[path][1], cached_losses))
        logger.info("max |loss(%s) - loss(cached)| over all steps: %.2e", path, difference)


if __name__ == "__main__":
    sys.exit(main())
