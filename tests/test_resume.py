"""Interrupted runs: SIGKILL, Ctrl-C, SIGTERM and non-finite losses, then --resume to the same result.

A resumed run must end with the same memory weights, optimizer state and loss history, bit for bit,
as an uninterrupted run with the same seed. The SIGKILL test runs `python train_guidance.py` as real
processes; the others call `train_guidance.main` in this process.

Example:
    python -m pytest -q tests/test_resume.py
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_guidance
from checkpoint import CHECKPOINT_NAME, read_checkpoint
from tiny_models import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away")
STEPS_PER_EPOCH = 3  # 3 documents x 3 segments, batch size 4



# tiny models run faster on one thread, see conftest.py
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), "gpt_neox", WORDS)


def write_documents(path: Path, seed: int) -> Path:
    generator = random.Random(seed)
    lines = [json.dumps({"title": f"doc {index}", "text": " ".join(generator.choices(WORDS, k=30))})
             for index in range(4)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data_path(tmp_path):
    return write_documents(tmp_path / "docs.jsonl", seed=0)


def train_args(model_dir, data_path, save_dir, num_epochs: int, save_freq: int) -> list[str]:
    return ["--lm_name", "pythia", "--lm_size", "70m", "--lm_path", str(model_dir),
            "--data_path", str(data_path), "--save_dir", str(save_dir), "--hook_memory_layer", "-1",
            "--max_labels", "3", "--segment_length", "8", "--max_segements", "3", "--batch_size", "4",
            "--lr", "3e-3", "--num_epochs", str(num_epochs), "--save_freq", str(save_freq)]


def final_state(run_dir: Path) -> tuple[dict, dict]:
    """Return the checkpoint's memory and optimizer tensors, and its JSON state."""
    tensors, metadata = read_checkpoint(run_dir / CHECKPOINT_NAME)
    trained = {name: value for name, value in tensors.items() if name.startswith(("memory.", "optimizer."))}
    return trained, json.loads(metadata["state"])


def assert_same_training(run_dir: Path, reference_dir: Path) -> None:
    tensors, state = final_state(run_dir)
    reference_tensors, reference_state = final_state(reference_dir)
    assert state["epoch"] == reference_state["epoch"]
    assert state["history"] == reference_state["history"]
    assert tensors.keys() == reference_tensors.keys()
    for name in tensors:
        assert torch.equal(tensors[name], reference_tensors[name]), name


def checkpoint_epoch(run_dir: Path) -> int:
    return final_state(run_dir)[1]["epoch"]


# --- SIGKILL, real processes ---------------------------------------------------------------------


def cli_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def run_cli(argv, log_path: Path) -> int:
    with open(log_path, "w") as log:
        return subprocess.run([sys.executable, "train_guidance.py", *argv], cwd=REPO_ROOT, env=cli_env(),
                              stdout=log, stderr=subprocess.STDOUT, timeout=300).returncode


def start_and_kill_after_checkpoint(argv, checkpoint_path: Path, log_path: Path) -> int:
    """Start a training process, SIGKILL it once its first checkpoint exists; return its status."""
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "train_guidance.py", *argv], cwd=REPO_ROOT,
                                   env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not checkpoint_path.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        return process.wait(timeout=60)


def test_sigkill_then_resume_matches_uninterrupted(model_dir, data_path, tmp_path):
    # Saving does not touch the RNGs, so the reference may save only at its end. The reference's 60
    # epochs took 1.5 s on a shared 2-core CPU, so the killed run's 50 epochs after its first
    # checkpoint outlast the kill, which follows within one 20 ms poll. The epoch assert below
    # fails if the run ever finishes first.
    reference_args = train_args(model_dir, data_path, tmp_path / "reference", num_epochs=60, save_freq=60)
    killed_args = train_args(model_dir, data_path, tmp_path / "killed", num_epochs=60, save_freq=10)
    run_dir = tmp_path / "killed" / "run_000"

    assert run_cli(reference_args, tmp_path / "reference.log") == 0
    status = start_and_kill_after_checkpoint(killed_args, run_dir / CHECKPOINT_NAME, tmp_path / "killed.log")

    assert status == -signal.SIGKILL
    assert 10 <= checkpoint_epoch(run_dir) < 60
    assert not (run_dir / "metrics.json").exists()
    assert run_cli(["--resume", str(run_dir)], tmp_path / "resumed.log") == 0
    assert_same_training(run_dir, tmp_path / "reference" / "run_000")
    assert (run_dir / "metrics.json").exists()
    assert (run_dir / "frames" / "epoch_00060.png").exists()
    assert not list(run_dir.glob("*.tmp"))


# --- in-process runs -----------------------------------------------------------------------------


@pytest.fixture
def reference_dir(model_dir, data_path, tmp_path):
    """Return the folder of an uninterrupted 6-epoch run that saves every 2 epochs."""
    assert train_guidance.main(train_args(model_dir, data_path, tmp_path / "reference", 6, 2)) == 0
    return tmp_path / "reference" / "run_000"


def interrupt_at_epoch(monkeypatch, epoch: int, signum: int, count: int = 1) -> None:
    """Make the run send itself `count` signals `signum` right after finishing `epoch`."""
    original = train_guidance.Trainer.run_epoch

    def run_epoch_then_signal(self):
        metrics = original(self)
        if self.epoch == epoch:
            for _ in range(count):
                os.kill(os.getpid(), signum)
        return metrics

    monkeypatch.setattr(train_guidance.Trainer, "run_epoch", run_epoch_then_signal)


@pytest.mark.parametrize("signum, expected_status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_saves_and_resumes(signum, expected_status, model_dir, data_path, tmp_path,
                                       reference_dir, monkeypatch, caplog):
    save_dir = tmp_path / "stopped"
    run_dir = save_dir / "run_000"
    handler_before = signal.getsignal(signum)
    interrupt_at_epoch(monkeypatch, epoch=3, signum=signum)

    status = train_guidance.main(train_args(model_dir, data_path, save_dir, 6, 2))

    assert status == expected_status
    assert checkpoint_epoch(run_dir) == 3
    assert f"python train_guidance.py --resume {run_dir}" in caplog.text
    assert signal.getsignal(signum) == handler_before
    monkeypatch.undo()
    assert train_guidance.main(["--resume", str(run_dir)]) == 0
    assert_same_training(run_dir, reference_dir)


def test_second_ctrl_c_stops_without_saving(model_dir, data_path, tmp_path, caplog, monkeypatch):
    run_dir = tmp_path / "stopped" / "run_000"
    interrupt_at_epoch(monkeypatch, epoch=3, signum=signal.SIGINT, count=2)

    status = train_guidance.main(train_args(model_dir, data_path, tmp_path / "stopped", 6, 2))

    assert status == 130
    assert checkpoint_epoch(run_dir) == 2
    assert "stopped without saving at epoch 3" in caplog.text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def make_loss_non_finite_at(monkeypatch, epoch: int) -> None:
    original = train_guidance.Trainer.step_loss

    def step_loss(self, batch):
        loss, ce_positive, ce_negative = original(self, batch)
        if self.epoch + 1 == epoch:
            loss = loss * float("nan")
        return loss, ce_positive, ce_negative

    monkeypatch.setattr(train_guidance.Trainer, "step_loss", step_loss)


def test_non_finite_loss_keeps_last_checkpoint(model_dir, data_path, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "outputs" / "run_000"
    make_loss_non_finite_at(monkeypatch, epoch=3)

    status = train_guidance.main(train_args(model_dir, data_path, tmp_path / "outputs", 6, 2))
    last_line = capsys.readouterr().err.strip().splitlines()[-1]

    assert status == 1
    assert last_line.startswith(f"error: non-finite loss nan at epoch 3, step 1 of {STEPS_PER_EPOCH}")
    assert f"the last good checkpoint {run_dir / CHECKPOINT_NAME} (epoch 2) is kept" in last_line
    assert checkpoint_epoch(run_dir) == 2


def test_non_finite_loss_before_first_checkpoint(model_dir, data_path, tmp_path, monkeypatch, capsys):
    make_loss_non_finite_at(monkeypatch, epoch=1)

    status = train_guidance.main(train_args(model_dir, data_path, tmp_path / "outputs", 6, 2))
    last_line = capsys.readouterr().err.strip().splitlines()[-1]

    assert status == 1
    assert "at epoch 1, step 1" in last_line
    assert "no checkpoint was written yet" in last_line
    assert not (tmp_path / "outputs" / "run_000" / CHECKPOINT_NAME).exists()


# --- --resume flag rules -------------------------------------------------------------------------


@pytest.fixture
def short_run(model_dir, data_path, tmp_path):
    """Return the folder of a finished 4-epoch run that saves every 2 epochs."""
    assert train_guidance.main(train_args(model_dir, data_path, tmp_path / "short", 4, 2)) == 0
    return tmp_path / "short" / "run_000"


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ("config.json", CHECKPOINT_NAME)}


def resume_rejected(argv, run_dir: Path, capsys) -> str:
    """Run main with `argv`, assert it fails with status 2 and changes nothing; return the message."""
    before = run_files(run_dir)
    folders_before = sorted(run_dir.parent.iterdir())

    status = train_guidance.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()

    assert status == 2
    assert lines[-1].startswith("error: ")
    assert run_files(run_dir) == before
    assert sorted(run_dir.parent.iterdir()) == folders_before
    return lines[-1]


def test_raised_num_epochs_continues_run(short_run, reference_dir, capsys):
    assert train_guidance.main(["--resume", str(short_run), "--num_epochs", "6"]) == 0

    assert_same_training(short_run, reference_dir)
    assert json.loads((short_run / "config.json").read_text())["num_epochs"] == 6
    assert (short_run / "frames" / "epoch_00006.png").exists()


def test_resume_accepts_repeated_flags(short_run, model_dir, data_path, tmp_path):
    argv = train_args(model_dir, data_path, tmp_path / "short", 4, 2)

    assert train_guidance.main([*argv, "--resume", str(short_run)]) == 0
    assert checkpoint_epoch(short_run) == 4


def test_resume_accepts_moved_data(short_run, data_path, tmp_path):
    moved = tmp_path / "elsewhere" / "docs.jsonl"
    moved.parent.mkdir()
    shutil.copy(data_path, moved)

    assert train_guidance.main(["--resume", str(short_run), "--data_path", str(moved)]) == 0
    assert json.loads((short_run / "config.json").read_text())["data_path"] == str(moved)


def test_resume_rejects_conflicting_flag(short_run, capsys):
    message = resume_rejected(["--resume", str(short_run), "--lr", "0.5"], short_run, capsys)

    assert "--lr 0.5 conflicts with 0.003" in message
    assert "only --num_epochs (raised)" in message


def test_resume_rejects_lowered_num_epochs(short_run, capsys):
    message = resume_rejected(["--resume", str(short_run), "--num_epochs", "3"], short_run, capsys)

    assert "--num_epochs 3 is below the 4 epochs" in message


def test_resume_rejects_other_documents(short_run, tmp_path, capsys):
    other = write_documents(tmp_path / "other.jsonl", seed=1)

    message = resume_rejected(["--resume", str(short_run), "--data_path", str(other)], short_run, capsys)

    assert "differ from those in" in message


def test_resume_rejects_damaged_checkpoint(short_run, capsys):
    checkpoint_path = short_run / CHECKPOINT_NAME
    checkpoint_path.write_bytes(checkpoint_path.read_bytes()[:-10])

    message = resume_rejected(["--resume", str(short_run), "--num_epochs", "6"], short_run, capsys)

    assert str(checkpoint_path) in message


def test_resume_rejects_missing_folder(tmp_path, capsys):
    status = train_guidance.main(["--resume", str(tmp_path / "absent")])

    assert status == 2
    assert "is not a folder" in capsys.readouterr().err


def test_resume_rejects_folder_without_config(tmp_path, capsys):
    status = train_guidance.main(["--resume", str(tmp_path)])

    assert status == 2
    assert "config.json not found" in capsys.readouterr().err


def test_resume_without_checkpoint_restarts(short_run, reference_dir):
    (short_run / CHECKPOINT_NAME).unlink()

    assert train_guidance.main(["--resume", str(short_run), "--num_epochs", "6"]) == 0
    assert_same_training(short_run, reference_dir)
