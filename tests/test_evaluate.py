"""Evaluation metrics on hand-made tensors, and generation, landscape and logit lens on tiny models."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import figures
import landscape
import memory_metrics
import recall
from document_memories import DocumentMemory
from hook_lm import MemoryLM
from segment_data import SegmentData
from tiny_models import HIDDEN_SIZE, VOCAB_SIZE, build_llama_like, build_word_tokenizer
from wikitext import Segment

SELECTIONS = torch.tensor([
    [0.5, -0.005, 0.0, -2.0],
    [3.0, 4.0, 0.0, 0.0],
])


def test_l0_counts_entries_above_threshold():
    l0 = memory_metrics.l0_norms(SELECTIONS, threshold=0.01)
    assert l0.tolist() == [2.0, 2.0]


def test_l0_threshold_zero_counts_nonzero():
    assert memory_metrics.l0_norms(SELECTIONS, threshold=0.0).tolist() == [3.0, 2.0]


def test_l1_and_l2_norms():
    assert memory_metrics.l1_norms(SELECTIONS).tolist() == pytest.approx([2.505, 7.0])
    assert memory_metrics.l2_norms(SELECTIONS)[1].item() == pytest.approx(5.0)


def test_pairwise_distance_known_rows():
    rows = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]])
    # pairs: (0,1) 5, (0,2) 8, (1,2) 5
    assert memory_metrics.mean_pairwise_distance(rows) == pytest.approx(6.0)


def test_pairwise_distance_single_row_is_nan():
    assert math.isnan(memory_metrics.mean_pairwise_distance(torch.ones(1, 4)))


def test_selection_metrics_ratio():
    rows = torch.tensor([[3.0, 4.0], [-3.0, -4.0]])
    metrics = memory_metrics.selection_metrics(rows, threshold=0.01)
    assert metrics["mean_l2"] == pytest.approx(5.0)
    assert metrics["mean_pairwise_distance"] == pytest.approx(10.0)
    assert metrics["pairwise_distance_over_l2"] == pytest.approx(2.0)
    assert metrics["mean_l0"] == pytest.approx(2.0)


def test_pearson_known_values():
    assert memory_metrics.pearson_correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert memory_metrics.pearson_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_constant_is_nan():
    assert math.isnan(memory_metrics.pearson_correlation([1, 2, 3], [5, 5, 5]))


def test_size_length_correlations_keys():
    metrics = {"l0": [1.0, 2.0, 3.0], "l1": [3.0, 2.0, 1.0]}
    correlations = memory_metrics.size_length_correlations(metrics, {"tokens": [10, 20, 30]})
    assert correlations["l0_vs_tokens"] == pytest.approx(1.0)
    assert correlations["l1_vs_tokens"] == pytest.approx(-1.0)


CE = torch.tensor([
    [1.0, 2.0, 3.0],  # identified, margin 1
    [0.5, 1.5, 4.0],  # not identified, margin -1
    [2.0, 2.0, 2.0],  # tie: not identified, margin 0
])


def test_identification_accuracy_known_matrix():
    assert memory_metrics.identification_accuracy(CE) == pytest.approx(1 / 3)


def test_identification_accuracy_perfect():
    assert memory_metrics.identification_accuracy(torch.eye(3) * -1 + 2) == pytest.approx(1.0)


def test_margins_known_matrix():
    assert memory_metrics.ce_margins(CE) == pytest.approx([1.0, -1.0, 0.0])
    assert memory_metrics.mean_margin(CE) == pytest.approx(0.0)


def test_metrics_from_matrix_matches_helpers():
    documents = [type("Document", (), {"index": i, "title": f"T{i}"})() for i in range(3)]
    matrix = {"docrep": CE, "no_docrep": torch.zeros(3), "memory_off": torch.full((3,), 3.0)}
    metrics = evaluate.metrics_from_matrix(matrix, documents)
    assert metrics["identification_accuracy"] == pytest.approx(1 / 3)
    assert [row["identified"] for row in metrics["documents"]] == [True, False, False]
    assert metrics["documents"][1]["ce_best_other"] == pytest.approx(0.5)


def test_write_json_turns_nan_into_null(tmp_path):
    evaluate.write_json(tmp_path / "x.json", {"a": math.nan, "b": [1.0, math.inf]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.0, None]}


def test_rouge_identical_and_disjoint():
    same = recall.rouge_scores("the cat sat on the mat", "the cat sat on the mat")
    disjoint = recall.rouge_scores("the cat sat", "dog ran far")
    for name in recall.ROUGE_TYPES:
        assert same[name]["fmeasure"] == pytest.approx(1.0)
        assert disjoint[name]["fmeasure"] == pytest.approx(0.0)


def test_rouge_partial_overlap():
    scores = recall.rouge_scores("the cat sat on the mat", "the cat")
    assert scores["rouge1"]["precision"] == pytest.approx(1.0)
    assert scores["rouge1"]["recall"] == pytest.approx(2 / 6)
    assert scores["rouge2"]["recall"] == pytest.approx(1 / 5)


WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away")
# one word per id of the tiny model's vocabulary, so that every generated id decodes to a word
ALL_WORDS = WORDS + tuple(f"w{index}" for index in range(VOCAB_SIZE - 2 - len(WORDS)))


def test_build_prompts_cuts_words_and_reference():
    tokenizer = build_word_tokenizer(WORDS)
    segments = [Segment(0, "the cat sat on mat a dog"), Segment(0, "dog ran far away the cat"),
                Segment(0, "a dog ran far away"), Segment(1, "the cat"), Segment(1, "mat a dog ran far")]
    prompts = recall.build_prompts(segments, tokenizer, prompt_words=3, new_tokens=2, per_document=2)
    assert [(prompt.label, prompt.segment) for prompt in prompts] == [(0, 0), (0, 1), (1, 1)]
    assert prompts[0].text == "the cat sat"
    assert prompts[0].reference == "on mat"
    assert prompts[2].reference == "ran far"


def test_condition_docreps():
    docreps = torch.arange(6.0).view(3, 2)
    assert torch.equal(recall.condition_docreps(docreps, [0, 2], "own"), docreps[[0, 2]])
    assert torch.equal(recall.condition_docreps(docreps, [0, 2], "other"), docreps[[1, 0]])
    assert recall.condition_docreps(docreps, [0, 2], "off") is None


def tiny_memory_lm(num_documents: int = 3) -> MemoryLM:
    torch.manual_seed(0)
    model = build_llama_like(num_layers=3).eval().requires_grad_(False)
    model.generation_config.pad_token_id = 0
    memory = DocumentMemory(hidden_size=HIDDEN_SIZE, hook_memory_dim=8, num_documents=num_documents, seed=0)
    with torch.no_grad():
        # large weights make the memory change the model's predictions visibly
        for parameter in memory.parameters():
            parameter.mul_(20)
    return MemoryLM(model, memory, hook_memory_layer=1)


def tiny_data(num_documents: int = 3) -> SegmentData:
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 12, 9, 12, 5, 10]
    token_ids = [torch.randint(2, 12, (length,), generator=generator) for length in lengths]
    return SegmentData(token_ids, [index % num_documents for index in range(len(lengths))], pad_token_id=0)


def test_generation_batched_matches_single():
    memory_lm = tiny_memory_lm()
    tokenizer = build_word_tokenizer(ALL_WORDS)
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [recall.Prompt(0, 0, "the cat sat on mat", ""), recall.Prompt(2, 0, "dog", "")]
    batched = recall.generate_continuations(memory_lm, tokenizer, prompts, "own", new_tokens=5, batch_size=2)
    single = [recall.generate_continuations(memory_lm, tokenizer, [prompt], "own", new_tokens=5, batch_size=1)[0]
              for prompt in prompts]
    assert batched == single


def test_generation_memory_changes_text():
    memory_lm = tiny_memory_lm()
    tokenizer = build_word_tokenizer(ALL_WORDS)
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [recall.Prompt(label, 0, "the cat sat", "") for label in range(3)]
    own = recall.generate_continuations(memory_lm, tokenizer, prompts, "own", new_tokens=6, batch_size=3)
    off = recall.generate_continuations(memory_lm, tokenizer, prompts, "off", new_tokens=6, batch_size=3)
    assert own != off
    assert len(memory_lm.block._forward_hooks) == 0


@pytest.mark.parametrize("cached", [False, True])
def test_landscape_at_docrep_equals_ce_matrix(cached):
    memory_lm = tiny_memory_lm()
    data = tiny_data()
    if cached:
        data.build_activation_cache(memory_lm, batch_size=4, device=torch.device("cpu"))
    matrix = evaluate.ce_matrix(memory_lm, data, batch_size=4)
    docreps = memory_lm.memory.docreps
    for label in range(3):
        xs = docreps[label, :1].double()
        ys = docreps[label, 1:].double()
        ce = landscape.landscape_ce(memory_lm, data, label, xs, ys, batch_size=4)
        assert ce.shape == (1, 1)
        assert ce[0, 0].item() == pytest.approx(matrix["docrep"][label, label].item(), abs=1e-4)


def test_landscape_axes_cover_docreps():
    docreps = torch.tensor([[-1.0, 0.0], [0.5, 2.0]])
    xs, ys = landscape.landscape_axes(docreps, points=5, margin=0.5)
    assert xs[0].item() == pytest.approx(-1.5)
    assert xs[-1].item() == pytest.approx(1.0)
    assert ys[0].item() == pytest.approx(-0.5)
    assert ys[-1].item() == pytest.approx(2.5)


def test_logit_lens_top_k_sorted():
    memory_lm = tiny_memory_lm()
    tokenizer = build_word_tokenizer(WORDS)
    lens = landscape.logit_lens(memory_lm, tiny_data(), tokenizer, top_k=4, batch_size=4)
    assert len(lens) == 3
    for entry in lens:
        logits = [token["logit"] for token in entry["tokens"]]
        assert len(logits) == 4
        assert logits == sorted(logits, reverse=True)


def test_selection_frames_make_gif(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for epoch in range(1, 6):
        selections = {key: rng.normal(size=(3, 8)) for key in ("token", "document", "product")}
        path = tmp_path / f"epoch_{epoch:05d}.png"
        figures.draw_selection_frame(selections, epoch, 5, path)
        paths.append(path)
    figures.write_gif(paths, tmp_path / "memory_selection.gif")
    with Image.open(tmp_path / "memory_selection.gif") as gif:
        assert gif.n_frames == 5


def test_landscape_figure_written(tmp_path):
    xs = np.linspace(-1, 1, 4)
    ys = np.linspace(-1, 1, 3)
    perplexity = np.exp(np.arange(12.0).reshape(3, 4))
    docreps = np.array([[0.0, 0.0], [0.5, -0.5]])
    figures.draw_landscape(xs, ys, perplexity, docreps, 0, "A title", tmp_path / "landscape.png")
    assert (tmp_path / "landscape.png").stat().st_size > 0
