"""Checkpoint files: verified on read, rejected when truncated, edited or foreign, and saved atomically.

Example:
    python -m pytest -q tests/test_checkpoint.py
"""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
from checkpoint import CHECKPOINT_FORMAT, load_memory, read_checkpoint, save_checkpoint
from document_memories import DocumentMemory
from errors import InputError


def make_memory(seed: int = 0) -> DocumentMemory:
    return DocumentMemory(hidden_size=8, hook_memory_dim=4, num_documents=3, key_dim=2, seed=seed)


@pytest.fixture
def saved(tmp_path):
    """Return the path of a checkpoint of epoch 3 with an optimizer state and one RNG tensor."""
    memory = make_memory()
    optimizer = torch.optim.AdamW(memory.parameters(), lr=1e-3)
    memory(torch.randn(2, 5, 8), memory.docreps[:2]).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, memory, optimizer, state={"epoch": 3, "history": [{"loss": 1.5}]},
                    extra_tensors={"rng.torch": torch.get_rng_state()})
    return path


def rejection_message(path) -> str:
    with pytest.raises(InputError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_checkpoint_round_trip(saved):
    tensors, metadata = read_checkpoint(saved)

    assert json.loads(metadata["state"]) == {"epoch": 3, "history": [{"loss": 1.5}]}
    assert metadata["format"] == CHECKPOINT_FORMAT
    assert "rng.torch" in tensors
    assert any(name.startswith("optimizer.") for name in tensors)
    assert torch.equal(load_memory(saved).docreps, make_memory().docreps)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.99])
def test_truncated_checkpoint_rejected(saved, keep_fraction):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep_fraction)])

    message = rejection_message(saved)

    assert str(saved) in message
    assert "is damaged or not a safetensors file" in message


def test_checkpoint_with_flipped_tensor_byte_rejected(saved):
    data = bytearray(saved.read_bytes())
    data[-1] ^= 0xFF  # the file ends with tensor data
    saved.write_bytes(bytes(data))

    message = rejection_message(saved)

    assert str(saved) in message
    assert "failed its SHA-256 check" in message


def test_checkpoint_with_edited_metadata_rejected(saved):
    data = saved.read_bytes()
    assert data.count(b'\\"epoch\\": 3') == 1  # JSON inside the header's JSON is escaped
    saved.write_bytes(data.replace(b'\\"epoch\\": 3', b'\\"epoch\\": 9'))

    message = rejection_message(saved)

    assert "failed its SHA-256 check" in message


def test_checkpoint_rewritten_with_other_state_rejected(saved):
    tensors, metadata = read_checkpoint(saved)
    save_file(tensors, str(saved), metadata={**metadata, "state": json.dumps({"epoch": 99, "history": []})})

    message = rejection_message(saved)

    assert "failed its SHA-256 check" in message


def test_foreign_safetensors_file_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))

    message = rejection_message(path)

    assert f"is not a {CHECKPOINT_FORMAT} checkpoint" in message


class TouchOnUnpickle:
    """Pickle payload that creates a file when unpickled, to detect any unpickling."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


def test_pickle_renamed_as_checkpoint_not_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(pickle.dumps({"memory.weight": TouchOnUnpickle(marker)}))

    message = rejection_message(path)

    assert "is damaged or not a safetensors file" in message
    assert not marker.exists()


def test_missing_checkpoint_rejected(tmp_path):
    message = rejection_message(tmp_path / "absent.safetensors")

    assert "not found" in message


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    before = saved.read_bytes()

    def write_half_then_stop(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt  # as if Ctrl-C arrived in the middle of the write

    monkeypatch.setattr(checkpoint, "save_file", write_half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, make_memory(seed=1), state={"epoch": 4})

    assert saved.read_bytes() == before
    assert json.loads(read_checkpoint(saved)[1]["state"])["epoch"] == 3
    assert sorted(path.name for path in saved.parent.iterdir()) == [saved.name]


def test_failed_rename_keeps_previous_checkpoint(saved, monkeypatch):
    before = saved.read_bytes()

    def fail_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "replace", fail_replace)
    with pytest.raises(OSError):
        save_checkpoint(saved, make_memory(seed=1), state={"epoch": 4})

    assert saved.read_bytes() == before
    assert sorted(path.name for path in saved.parent.iterdir()) == [saved.name]


def test_save_replaces_checkpoint(saved):
    save_checkpoint(saved, make_memory(seed=1), state={"epoch": 4})

    tensors, metadata = read_checkpoint(saved)

    assert json.loads(metadata["state"]) == {"epoch": 4}
    assert torch.equal(tensors["memory.docreps"], make_memory(seed=1).docreps)
    assert sorted(path.name for path in saved.parent.iterdir()) == [saved.name]
