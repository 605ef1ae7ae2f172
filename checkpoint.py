"""Save and load training checkpoints as one safetensors file: no pickles, no code on load.

A checkpoint contains the memory's weights and DocReps (`memory.*`), the AdamW state (`optimizer.*`)
and RNG states (`rng.*`). Its safetensors metadata stores the rest as JSON: epoch, loss history,
scheduler state, optimizer hyper-parameters and memory settings. A SHA-256 over every tensor and
every other metadata entry makes a file truncated or edited by hand fail to load. It is written
to a temporary file, flushed to disk and renamed over the old one, so a kill during a save leaves
the previous checkpoint intact.

Example:
    save_checkpoint(run_dir / "checkpoint.safetensors", memory, optimizer, state={"epoch": 3})
    memory = load_memory(run_dir / "checkpoint.safetensors")
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from document_memories import DocumentMemory
from errors import InputError

CHECKPOINT_NAME = "checkpoint.safetensors"
# Version 1 had a digest over the tensors only, so its metadata could be edited unnoticed.
CHECKPOINT_FORMAT = "document_memories/2"


def checkpoint_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Return a SHA-256 over the names, dtypes, shapes and bytes of `tensors` and over `metadata`.

    The metadata entry "sha256" itself is left out, so the digest can be stored in the metadata.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    covered = {key: value for key, value in metadata.items() if key != "sha256"}
    digest.update(json.dumps(covered, sort_keys=True).encode())
    return digest.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer's state dict into flat tensors and JSON-ready parameter groups."""
    state_dict = optimizer.state_dict()
    tensors = {
        f"optimizer.{param_id}.{key}": value.detach().clone()
        for param_id, param_state in state_dict["state"].items()
        for key, value in param_state.items()
    }
    return tensors, state_dict["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         param_groups: list[dict]) -> None:
    """Restore an optimizer from `optimizer_tensors` output."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            state.setdefault(int(param_id), {})[key] = value
    for group in param_groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON turned the tuple into a list
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(path: Path, memory: DocumentMemory, optimizer: torch.optim.Optimizer | None = None,
                    state: dict | None = None, extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write memory, optimizer and `state` (JSON-ready) atomically to `path`."""
    path = Path(path)
    tensors = {f"memory.{name}": value.detach().cpu().contiguous().clone()
               for name, value in memory.state_dict().items()}
    param_groups = []
    if optimizer is not None:
        optimizer_state, param_groups = optimizer_tensors(optimizer)
        tensors.update({name: value.cpu().contiguous() for name, value in optimizer_state.items()})
    for name, value in (extra_tensors or {}).items():
        tensors[name] = value.detach().cpu().contiguous().clone()
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "memory_settings": json.dumps(memory.settings),
        "param_groups": json.dumps(param_groups),
        "state": json.dumps(state or {}),
    }
    metadata["sha256"] = checkpoint_digest(tensors, metadata)
    write_atomically(path, tensors, metadata)


def write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file next to `path`, flush it to disk, then rename it over `path`.

    A process killed before the rename leaves the previous file untouched. The temporary file's name
    contains the process id, so two processes never write into the same temporary file.
    """
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and verify a checkpoint; return its tensors and metadata, or raise InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"checkpoint {path} is damaged or not a safetensors file ({err}); "
                         "use an intact copy or start a new run") from err
    if metadata.get("format") != CHECKPOINT_FORMAT or "sha256" not in metadata:
        raise InputError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint "
                         f"(format {metadata.get('format')!r}); it was not written by this version")
    if checkpoint_digest(tensors, metadata) != metadata["sha256"]:
        raise InputError(f"checkpoint {path} failed its SHA-256 check, so it was edited or damaged; "
                         "use an intact copy or start a new run")
    return tensors, metadata


def load_memory(path: Path, device: str | torch.device = "cpu") -> DocumentMemory:
    """Rebuild the DocumentMemory stored in a checkpoint, DocReps included."""
    tensors, metadata = read_checkpoint(path)
    memory = DocumentMemory(**json.loads(metadata["memory_settings"]))
    weights = {name[len("memory."):]: value for name, value in tensors.items() if name.startswith("memory.")}
    memory.load_state_dict(weights)
    return memory.to(device)
