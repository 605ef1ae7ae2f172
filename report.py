"""Write report.md of a run: configuration, CE matrix, ROUGE, memory metrics, logit lens and figures.

The report contains no timestamps or wall times, so that `python evaluate.py RUN_DIR` on a saved run
folder writes the same file as the end of training. Every number is rounded to fixed decimals.

Example:
    text = build_report(config, metrics, generations, lens, landscapes, history, ["loss_curves.png"])
"""

import math
from pathlib import Path

RUN_FIGURES = (
    ("loss_curves.png", "Loss curves"),
    ("memory_selection.gif", "Memory selection per save (token, document, product)"),
)


def format_number(value, digits: int = 3) -> str:
    """Format a float with fixed decimals; None, NaN and infinity become 'n/a'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def escape_cell(text: str) -> str:
    """Make text safe inside a Markdown table cell or inline code on one line."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")


def configuration_section(config) -> list[str]:
    lines = ["## Configuration", "", "| flag | value |", "|---|---|"]
    for name, value in config.to_dict().items():
        lines.append(f"| `--{name}` | {escape_cell(value)} |")
    return lines


def training_section(history: list[dict]) -> list[str]:
    if not history:
        return ["## Training", "", "No training history was saved."]
    last = history[-1]
    return ["## Training", "",
            f"Trained {last['epoch']} epochs. Last epoch: guidance loss {format_number(last['loss'], 4)}, "
            f"CE+ (own DocRep) {format_number(last['ce_positive'], 4)}, "
            f"CE- (negative DocRep) {format_number(last['ce_negative'], 4)} nats."]


def matrix_table(metrics: dict, transform, digits: int) -> list[str]:
    """Return the per-document table of every DocRep column plus no DocRep and memory off."""
    matrix = metrics["ce_matrix"]
    num_documents = len(matrix["docrep"])
    header = ["document"] + [f"DocRep {column}" for column in range(num_documents)]
    header += ["no DocRep", "memory off (base LM)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, document in enumerate(metrics["documents"]):
        cells = [f"{row}: {escape_cell(document['title'][:30])}"]
        for column, value in enumerate(matrix["docrep"][row]):
            text = format_number(transform(value), digits)
            cells.append(f"**{text}**" if column == row else text)
        cells.append(format_number(transform(matrix["no_docrep"][row]), digits))
        cells.append(format_number(transform(matrix["memory_off"][row]), digits))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ce_section(metrics: dict) -> list[str]:
    lines = ["## Cross-entropy matrix", "",
             "Mean CE (nats) of each document's segments (rows) under each DocRep (columns); the own "
             "DocRep is in bold.", ""]
    lines += matrix_table(metrics, lambda value: value, 3)
    lines += ["", "Perplexity, exp(CE):", ""]
    lines += matrix_table(metrics, lambda value: math.exp(min(value, 700.0)), 2)
    lines += ["", f"Identification accuracy (own DocRep gives the lowest CE): "
                  f"{format_number(metrics['identification_accuracy'])}", "",
              f"Mean margin, best other CE minus own CE: {format_number(metrics['mean_margin'])} nats "
              f"(per document: {', '.join(format_number(row['ce_margin']) for row in metrics['documents'])})"]
    return lines


def rouge_section(metrics: dict, generations: dict) -> list[str]:
    rouge = metrics["rouge"]
    lines = ["## Recall in generation", "",
             f"{metrics['num_prompts']} prompts; greedy continuations scored against the true continuation. "
             "own: the document's DocRep; other: the next document's DocRep; off: the base LM.", "",
             "| condition | R-1 P | R-1 R | R-1 F1 | R-2 P | R-2 R | R-2 F1 | R-L P | R-L R | R-L F1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for condition, scores in rouge.items():
        cells = [format_number(scores[name][field])
                 for name in ("rouge1", "rouge2", "rougeL") for field in ("precision", "recall", "fmeasure")]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    lines += ["", "Generated texts (also in generations.json):", ""]
    for row in generations["prompts"]:
        lines.append(f"- document {row['label']}, segment {row['segment']}: prompt `{escape_cell(row['text'])}`")
        lines.append(f"  - reference: `{escape_cell(row['reference'])}`")
        for condition, text in row["generated"].items():
            f1 = row["scores"][condition]["rougeL"]["fmeasure"]
            lines.append(f"  - {condition} (ROUGE-L F1 {format_number(f1)}): `{escape_cell(text)}`")
    return lines


def memory_section(memory: dict) -> list[str]:
    lines = ["## Memory entries", "",
             f"Document selections key_act(g(K)); L0 counts entries with |value| > "
             f"{format_number(memory['threshold'], 4)}.", "",
             "| document | L0 | L1 | L2 | document tokens | trained tokens |", "|---|---|---|---|---|---|"]
    for label, (l0, l1, l2) in enumerate(zip(memory["l0"], memory["l1"], memory["l2"])):
        lines.append(f"| {label} | {l0:.0f} | {format_number(l1)} | {format_number(l2)} | "
                     f"{memory['document_tokens'][label]} | {memory['trained_tokens'][label]} |")
    lines += ["", "| metric | value |", "|---|---|",
              f"| mean L0 | {format_number(memory['mean_l0'], 2)} |",
              f"| mean L2 | {format_number(memory['mean_l2'])} |",
              f"| mean pairwise distance | {format_number(memory['mean_pairwise_distance'])} |",
              f"| pairwise distance / L2 | {format_number(memory['pairwise_distance_over_l2'])} |"]
    for name, value in memory["correlations"].items():
        lines.append(f"| Pearson r, {name.replace('_vs_', ' vs ').replace('_', ' ')} | {format_number(value)} |")
    if any("n/a" in line for line in lines):
        lines += ["", "n/a: undefined, for example a correlation over documents of equal length."]
    return lines


def logit_lens_section(lens: list[dict], metrics: dict) -> list[str]:
    lines = ["## Logit lens", "",
             "Tokens whose logits each document's mean memory update raises most (final norm, then "
             "unembedding; also in logit_lens.json).", ""]
    for entry in lens:
        title = escape_cell(metrics["documents"][entry["label"]]["title"][:40])
        tokens = ", ".join(f"`{escape_cell(token['token']) or ' '}`" for token in entry["tokens"])
        lines.append(f"- {entry['label']} ({title}): {tokens}")
    return lines


def figures_section(figure_names: list[str], landscapes: list[dict]) -> list[str]:
    lines = ["## Figures", ""]
    captions = dict(RUN_FIGURES)
    for name in figure_names:
        lines += [f"### {captions.get(name, name)}", "", f"![{name}]({name})", ""]
    for entry in landscapes:
        lines += [f"### Perplexity landscape, document {entry['label']}", "",
                  f"Lowest perplexity on the grid: {format_number(entry['min_perplexity'], 2)}.", "",
                  f"![landscape {entry['label']}]({entry['figure']})", ""]
    if not landscapes:
        lines += ["No perplexity landscape: it needs --key_dim 2 and --eval_landscape_documents >= 1.", ""]
    return lines


def existing_figures(run_dir: Path) -> list[str]:
    """Return the names of the run-level figures present in `run_dir`."""
    return [name for name, _ in RUN_FIGURES if (Path(run_dir) / name).is_file()]


def build_report(config, metrics: dict, generations: dict, lens: list[dict], landscapes: list[dict],
                 history: list[dict], figure_names: list[str]) -> str:
    """Return the whole report.md text."""
    title = f"# Document memories: {config.lm_name} {config.lm_size}, {len(metrics['documents'])} documents"
    sections = [
        [title],
        configuration_section(config),
        training_section(history),
        ce_section(metrics),
        rouge_section(metrics, generations),
        memory_section(metrics["memory"]),
        logit_lens_section(lens, metrics),
        figures_section(figure_names, landscapes),
    ]
    return "\n\n".join("\n".join(section) for section in sections).rstrip() + "\n"
