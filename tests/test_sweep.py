"""Sweep runs (with the training command replaced) and aggregation of hand-made run folders."""

import csv
import json

import pytest

import sweep
from errors import InputError


def write_run(folder, key_activation: str, guidance: float, accuracy: float | None = None) -> None:
    """Write a run folder with config.json and, when `accuracy` is given, a finished metrics.json."""
    folder.mkdir(parents=True)
    config = {"key_activation": key_activation, "guidance": guidance, "negative_key_type": "other",
              "num_epochs": 60}
    (folder / "config.json").write_text(json.dumps(config))
    if accuracy is None:
        return
    rouge = {condition: {name: {"precision": 0.5, "recall": 0.5, "fmeasure": value}
                         for name in ("rouge1", "rouge2", "rougeL")}
             for condition, value in (("own", 0.6), ("other", 0.2), ("off", 0.1))}
    metrics = {
        "documents": [{"ce_own": 1.0, "ce_best_other": 3.0, "ce_memory_off": 4.0},
                      {"ce_own": 2.0, "ce_best_other": 2.5, "ce_memory_off": 4.0}],
        "identification_accuracy": accuracy, "mean_margin": 1.25, "rouge": rouge,
        "memory": {"mean_l0": 30.0, "mean_l2": 2.0, "pairwise_distance_over_l2": 0.5},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_aggregate_lists_every_run(tmp_path):
    write_run(tmp_path / "tanh_guidance0_other" / "run_000", "tanh", 0.0, accuracy=1.0)
    write_run(tmp_path / "relu_guidance0.1_other" / "run_000", "relu", 0.1, accuracy=0.5)
    write_run(tmp_path / "sigmoid_guidance0_other" / "run_000", "sigmoid", 0.0)
    rows = sweep.aggregate(tmp_path)
    assert [row["setting"] for row in rows] == ["relu_guidance0.1_other", "sigmoid_guidance0_other",
                                                "tanh_guidance0_other"]
    with open(tmp_path / "sweep.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 3
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert (tmp_path / "sweep.md").read_text().count("\n") == 2 + 3


def test_aggregate_row_values(tmp_path):
    write_run(tmp_path / "a" / "run_000", "tanh", 0.1, accuracy=0.75)
    row = sweep.aggregate(tmp_path)[0]
    assert row["status"] == "ok"
    assert row["identification_accuracy"] == pytest.approx(0.75)
    assert row["ce_own"] == pytest.approx(1.5)
    assert row["ce_best_other"] == pytest.approx(2.75)
    assert row["rougeL_f1_own"] == pytest.approx(0.6)
    assert row["rougeL_f1_other"] == pytest.approx(0.2)
    assert row["mean_l0"] == pytest.approx(30.0)


def test_aggregate_marks_unfinished_run(tmp_path):
    write_run(tmp_path / "a" / "run_000", "tanh", 0.0)
    row = sweep.aggregate(tmp_path)[0]
    assert row["status"].startswith("no metrics")
    assert row["identification_accuracy"] is None


def test_aggregate_empty_dir_rejected(tmp_path):
    with pytest.raises(InputError, match="no run folder"):
        sweep.aggregate(tmp_path)


def test_sweep_goes_on_after_failure(tmp_path, monkeypatch, caplog):
    commands = []

    def fake_run(command, log_path):
        commands.append(command)
        folder = log_path.parent
        activation = command[command.index("--key_activation") + 1]
        guidance = float(command[command.index("--guidance") + 1])
        if activation == "relu":
            return 1, 0.5
        write_run(folder / "run_000", activation, guidance, accuracy=1.0)
        return 0, 2.0

    monkeypatch.setattr(sweep, "run_one", fake_run)
    failures = sweep.run_sweep(tmp_path, "quick", ["tanh", "relu", "sigmoid"], [0.0, 0.1], ["other"],
                               ["--num_epochs", "3"])
    assert failures == 2
    assert len(commands) == 6
    assert all(command[-2:] == ["--num_epochs", "3"] for command in commands)
    assert "relu_guidance0.1_other: failed with exit status 1" in caplog.text
    records = json.loads((tmp_path / sweep.TIMES_NAME).read_text())
    assert [record["exit_status"] for record in records].count(1) == 2
    rows = sweep.aggregate(tmp_path)
    assert len(rows) == 4
    assert rows[0]["wall_s"] == pytest.approx(2.0)


def test_sweep_rejects_unknown_activation(tmp_path, capsys):
    assert sweep.main(["run", "--save_dir", str(tmp_path), "--key_activations", "softmax"]) == 2
    assert "unknown key activation 'softmax'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sweep_rejects_negative_guidance():
    with pytest.raises(InputError, match="guidance -1"):
        sweep.validate_axes(["tanh"], [-1.0], ["other"])
