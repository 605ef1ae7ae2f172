"""Recall of trained documents in generation, scored with ROUGE against the true continuation.

For each document, the opening words of its first few segments are prompts. The frozen LM continues
each prompt greedily three times: with the document's own DocRep, with another document's DocRep
(the next label, cyclically), and with the memory off. ROUGE-1, ROUGE-2 and ROUGE-L (precision,
recall, F1; `rouge-score` package) compare each continuation with the same number of tokens that
really follow the prompt in the segment.

Example:
    prompts = build_prompts(segments, tokenizer, prompt_words=16, new_tokens=16, per_document=2)
    results = generate_and_score(memory_lm, tokenizer, prompts, new_tokens=16)
"""

from dataclasses import asdict, dataclass

import torch
from rouge_score import rouge_scorer

from hook_lm import MemoryHook, MemoryLM

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_FIELDS = ("precision", "recall", "fmeasure")
CONDITIONS = ("own", "other", "off")


@dataclass(frozen=True)
class Prompt:
    """A prompt cut from one segment, with the tokens that follow it there as the reference."""

    label: int
    segment: int  # position of the segment within its document
    text: str
    reference: str


def build_prompts(segments, tokenizer, prompt_words: int, new_tokens: int, per_document: int) -> list[Prompt]:
    """Cut prompts from the first `per_document` segments of every document.

    A segment with no words left after the prompt is skipped, because it has no continuation to
    score against.
    """
    prompts = []
    segments_seen: dict[int, int] = {}
    for segment in segments:
        position = segments_seen.get(segment.label, 0)
        if position >= per_document:
            continue
        segments_seen[segment.label] = position + 1
        words = segment.text.split()
        if len(words) <= prompt_words:
            continue
        rest = " " + " ".join(words[prompt_words:])
        reference_ids = tokenizer(rest, add_special_tokens=False)["input_ids"][:new_tokens]
        prompts.append(Prompt(segment.label, position, " ".join(words[:prompt_words]),
                              tokenizer.decode(reference_ids, skip_special_tokens=True)))
    return prompts


def condition_docreps(docreps: torch.Tensor, labels: list[int], condition: str) -> torch.Tensor | None:
    """Return the DocReps (len(labels), key_dim) of a condition; None for "off"."""
    labels_tensor = torch.tensor(labels, dtype=torch.long, device=docreps.device)
    if condition == "own":
        return docreps[labels_tensor]
    if condition == "other":
        return docreps[(labels_tensor + 1) % docreps.shape[0]]
    if condition == "off":
        return None
    raise ValueError(f"unknown condition {condition!r}; valid: {', '.join(CONDITIONS)}")


def left_pad(token_lists: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return left-padded input ids and attention mask for a list of token id lists."""
    length = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), length), dtype=torch.long)
    for row, ids in enumerate(token_lists):
        input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate_continuations(memory_lm: MemoryLM, tokenizer, prompts: list[Prompt], condition: str,
                           new_tokens: int, batch_size: int) -> list[str]:
    """Continue every prompt greedily by `new_tokens` tokens under one condition; return the texts.

    Generation stops early at the EOS token, so a continuation may be shorter than `new_tokens`.
    """
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        token_lists = [tokenizer(prompt.text)["input_ids"] for prompt in chunk]
        input_ids, attention_mask = left_pad(token_lists, tokenizer.pad_token_id)
        input_ids = input_ids.to(memory_lm.memory_device)
        attention_mask = attention_mask.to(memory_lm.memory_device)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                      do_sample=False, num_beams=1,
                      pad_token_id=tokenizer.pad_token_id)
        docreps = condition_docreps(memory_lm.memory.docreps, [prompt.label for prompt in chunk], condition)
        if docreps is None:
            output = memory_lm.model.generate(**kwargs)
        else:
            with MemoryHook(memory_lm.block, memory_lm.memory, docreps):
                output = memory_lm.model.generate(**kwargs)
        new_ids = output[:, input_ids.shape[1]:].cpu()
        texts.extend(tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids)
    return texts


def build_scorer() -> rouge_scorer.RougeScorer:
    """Return a ROUGE-1/2/L scorer with the package's default tokenizer and no stemming."""
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge_scores(reference: str, prediction: str, scorer: rouge_scorer.RougeScorer | None = None
                 ) -> dict[str, dict[str, float]]:
    """Return ROUGE-1/2/L precision, recall and F1 of `prediction` against `reference`."""
    scorer = scorer or build_scorer()
    scores = scorer.score(reference, prediction)
    return {name: {field: float(getattr(scores[name], field)) for field in ROUGE_FIELDS}
            for name in ROUGE_TYPES}


def mean_scores(rows: list[dict], condition: str) -> dict[str, dict[str, float]]:
    """Average the per-prompt ROUGE scores of one condition."""
    means = {}
    for name in ROUGE_TYPES:
        means[name] = {}
        for field in ROUGE_FIELDS:
            values = [row["scores"][condition][name][field] for row in rows]
            means[name][field] = sum(values) / len(values) if values else float("nan")
    return means


def generate_and_score(memory_lm: MemoryLM, tokenizer, prompts: list[Prompt], new_tokens: int,
                       batch_size: int = 16) -> dict:
    """Generate under every condition and score; return per-prompt rows and per-condition means."""
    generated = {condition: generate_continuations(memory_lm, tokenizer, prompts, condition, new_tokens,
                                                   batch_size)
                 for condition in CONDITIONS}
    scorer = build_scorer()
    rows = []
    for index, prompt in enumerate(prompts):
        texts = {condition: generated[condition][index] for condition in CONDITIONS}
        rows.append({
            **asdict(prompt),
            "generated": texts,
            "scores": {condition: rouge_scores(prompt.reference, texts[condition], scorer)
                       for condition in CONDITIONS},
        })
    return {"prompts": rows, "mean": {condition: mean_scores(rows, condition) for condition in CONDITIONS}}
