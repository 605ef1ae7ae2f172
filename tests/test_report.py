"""report.md of a tiny trained run, and its regeneration from the saved run folder by evaluate.py."""

import json
import random

import pytest
from PIL import Image

import evaluate
import report
import train_guidance
from tiny_models import save_tiny_model

WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "and", "then", "came", "back")


def write_corpus(path) -> None:
    rng = random.Random(0)
    articles = []
    for index in range(3):
        words = " ".join(rng.choice(WORDS) for _ in range(40))
        articles.append(f" = Article {index} = \n\n {words} \n\n")
    path.write_text("".join(articles), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Train a tiny Llama-like model on three articles; return the run folder."""
    root = tmp_path_factory.mktemp("tiny_run")
    model_folder = save_tiny_model(root / "model", "llama", WORDS)
    write_corpus(root / "data.txt")
    status = train_guidance.main([
        "--lm_name", "llama2_hf", "--lm_size", "7b", "--lm_path", model_folder,
        "--data_path", str(root / "data.txt"), "--max_labels", "3", "--segment_length", "12",
        "--max_segements", "2", "--max_length", "32", "--hook_memory_layer", "1", "--hook_memory_dim", "8",
        "--num_epochs", "5", "--save_freq", "1", "--batch_size", "4", "--save_dir", str(root / "runs"),
        "--eval_prompt_words", "4", "--eval_new_tokens", "4", "--eval_landscape_points", "3",
    ])
    assert status == 0
    return root / "runs" / "run_000"


def test_report_has_every_section(tiny_run):
    text = (tiny_run / "report.md").read_text(encoding="utf-8")
    for heading in ("## Configuration", "## Cross-entropy matrix", "## Recall in generation",
                    "## Memory entries", "## Logit lens", "## Figures"):
        assert heading in text


def test_report_embeds_existing_figures(tiny_run):
    text = (tiny_run / "report.md").read_text(encoding="utf-8")
    for name in ("loss_curves.png", "memory_selection.gif", "landscape/landscape_doc0.png"):
        assert f"({name})" in text
        assert (tiny_run / name).is_file()


def test_gif_has_one_frame_per_save(tiny_run):
    with Image.open(tiny_run / "memory_selection.gif") as gif:
        assert gif.n_frames == 5


def test_metrics_and_generations_written(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text(encoding="utf-8"))
    generations = json.loads((tiny_run / "generations.json").read_text(encoding="utf-8"))
    assert len(metrics["ce_matrix"]["docrep"]) == 3
    assert set(metrics["rouge"]) == {"own", "other", "off"}
    assert len(generations["prompts"]) == metrics["num_prompts"] == 6
    assert set(generations["prompts"][0]["generated"]) == {"own", "other", "off"}


def test_report_regenerated_identically(tiny_run):
    names = ("report.md", "metrics.json", "generations.json", "logit_lens.json")
    before = {name: (tiny_run / name).read_bytes() for name in names}
    (tiny_run / "report.md").unlink()
    assert evaluate.main([str(tiny_run)]) == 0
    for name in names:
        assert (tiny_run / name).read_bytes() == before[name], name


def test_evaluate_override_changes_report(tiny_run, tmp_path):
    original = (tiny_run / "report.md").read_text(encoding="utf-8")
    assert evaluate.main([str(tiny_run), "--eval_top_k", "2"]) == 0
    changed = (tiny_run / "report.md").read_text(encoding="utf-8")
    assert "| `--eval_top_k` | 2 |" in changed
    assert changed != original
    assert evaluate.main([str(tiny_run)]) == 0


def test_evaluate_missing_run_dir(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    assert "config.json not found" in error
    assert error.count("\n") == 1


def test_evaluate_rejects_bad_option(tiny_run, capsys):
    report_before = (tiny_run / "report.md").read_bytes()
    assert evaluate.main([str(tiny_run), "--eval_new_tokens", "0"]) == 2
    assert "--eval_new_tokens 0 is invalid" in capsys.readouterr().err
    assert (tiny_run / "report.md").read_bytes() == report_before


def test_format_number_handles_missing():
    assert report.format_number(None) == "n/a"
    assert report.format_number(float("nan")) == "n/a"
    assert report.format_number(float("inf")) == "n/a"
    assert report.format_number(1.23456, 2) == "1.23"


def test_escape_cell_keeps_one_line():
    assert report.escape_cell("a|b\n c") == "a\\|b c"
    assert report.escape_cell("`code`") == "'code'"
