"""Run a grid of training runs and aggregate every run folder under a save dir into one table.

`run` trains one run per setting (key activation x guidance alpha x negative DocRep type) through a
run.sh preset, each into its own folder `SAVE_DIR/<setting>/run_NNN` with its log in
`SAVE_DIR/<setting>/train.log`, and logs one progress line per run. A failed run is logged with its
exit status and log file, and the sweep goes on. `aggregate` reads the config.json and metrics.json
of every run folder under a save dir and writes sweep.csv, sweep.md and sweep.png there.

Example:
    python sweep.py run --save_dir outputs/sweep --key_activations tanh relu --guidances 0 0.1
    python sweep.py aggregate outputs/sweep
"""

import argparse
import csv
import itertools
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import figures
from config import OneLineErrorParser
from document_memories import KEY_ACTIVATIONS
from errors import InputError
from utils import NEGATIVE_KEY_TYPES

logger = logging.getLogger("sweep")

PRESETS = ("quick", "paper")
TIMES_NAME = "sweep_runs.json"
COLUMNS = (
    "setting", "run_dir", "status", "key_activation", "guidance", "negative_key_type", "num_epochs",
    "wall_s", "identification_accuracy", "mean_margin", "ce_own", "ce_best_other", "ce_memory_off",
    "rougeL_f1_own", "rougeL_f1_other", "rougeL_f1_off", "rouge1_f1_own", "mean_l0", "mean_l2",
    "pairwise_distance_over_l2",
)


def setting_name(key_activation: str, guidance: float, negative_key_type: str) -> str:
    """Return the folder name of one setting, e.g. `tanh_guidance0.1_other`."""
    return f"{key_activation}_guidance{guidance:g}_{negative_key_type}"


def validate_axes(key_activations: list[str], guidances: list[float], negative_key_types: list[str]) -> None:
    """Raise InputError for an axis value that train_guidance.py would reject."""
    for value in key_activations:
        if value not in KEY_ACTIVATIONS:
            raise InputError(f"unknown key activation '{value}'; valid: {', '.join(KEY_ACTIVATIONS)}")
    for value in guidances:
        if not math.isfinite(value) or value < 0:
            raise InputError(f"guidance {value} is invalid; it must be a finite number >= 0")
    for value in negative_key_types:
        if value not in NEGATIVE_KEY_TYPES:
            raise InputError(f"unknown negative key type '{value}'; valid: {', '.join(NEGATIVE_KEY_TYPES)}")


def run_one(command: list[str], log_path: Path) -> tuple[int, float]:
    """Run one training command with its output in `log_path`; return (exit status, wall seconds)."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        status = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, check=False).returncode
    return status, time.perf_counter() - start


def newest_run_dir(folder: Path) -> Path | None:
    runs = sorted(path for path in folder.glob("run_*") if path.name[4:].isdigit())
    return runs[-1] if runs else None


def run_sweep(save_dir: Path, preset: str, key_activations: list[str], guidances: list[float],
              negative_key_types: list[str], extra_args: list[str]) -> int:
    """Train every setting of the grid one after the other; return the number of failed runs."""
    validate_axes(key_activations, guidances, negative_key_types)
    save_dir.mkdir(parents=True, exist_ok=True)
    settings = list(itertools.product(key_activations, guidances, negative_key_types))
    script = Path(__file__).resolve().parent / "run.sh"
    records = _read_records(save_dir)
    failures = 0
    for number, (key_activation, guidance, negative_key_type) in enumerate(settings, start=1):
        name = setting_name(key_activation, guidance, negative_key_type)
        folder = save_dir / name
        folder.mkdir(exist_ok=True)
        command = ["bash", str(script), preset, "--key_activation", key_activation, "--guidance", str(guidance),
                   "--negative_key_type", negative_key_type, "--save_dir", str(folder), *extra_args]
        logger.info("run %d/%d %s: started", number, len(settings), name)
        status, wall_s = run_one(command, folder / "train.log")
        run_dir = newest_run_dir(folder)
        if status == 0:
            logger.info("run %d/%d %s: finished in %.0f s, %s", number, len(settings), name, wall_s, run_dir)
        else:
            failures += 1
            logger.error("run %d/%d %s: failed with exit status %d after %.0f s; see %s", number,
                         len(settings), name, status, wall_s, folder / "train.log")
        records.append({"setting": name, "run_dir": None if run_dir is None else str(run_dir.relative_to(save_dir)),
                        "exit_status": status, "wall_s": round(wall_s, 1)})
        (save_dir / TIMES_NAME).write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return failures


def _read_records(save_dir: Path) -> list[dict]:
    path = save_dir / TIMES_NAME
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def _mean(values: list) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def summarize_run(run_dir: Path, save_dir: Path, wall_times: dict[str, float]) -> dict:
    """Return one table row from a run folder's config.json and, if present, metrics.json."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    relative = str(run_dir.relative_to(save_dir))
    row = {column: None for column in COLUMNS}
    row.update({
        "setting": setting_name(config["key_activation"], float(config["guidance"]), config["negative_key_type"]),
        "run_dir": relative, "status": "no metrics (failed or unfinished)",
        "key_activation": config["key_activation"], "guidance": config["guidance"],
        "negative_key_type": config["negative_key_type"], "num_epochs": config["num_epochs"],
        "wall_s": wall_times.get(relative),
    })

    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return row
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    documents = metrics["documents"]
    row.update({
        "status": "ok" if "rouge" in metrics else "CE metrics only",
        "identification_accuracy": metrics.get("identification_accuracy"),
        "mean_margin": metrics.get("mean_margin"),
        "ce_own": _mean([document["ce_own"] for document in documents]),
        "ce_best_other": _mean([document["ce_best_other"] for document in documents]),
        "ce_memory_off": _mean([document["ce_memory_off"] for document in documents]),
    })

    if "rouge" in metrics:
        rouge = metrics["rouge"]
        row.update({f"rougeL_f1_{condition}": rouge[condition]["rougeL"]["fmeasure"]
                    for condition in ("own", "other", "off")})
        row["rouge1_f1_own"] = rouge["own"]["rouge1"]["fmeasure"]
    if "memory" in metrics:
        for name in ("mean_l0", "mean_l2", "pairwise_distance_over_l2"):
            row[name] = metrics["memory"].get(name)
    return row


def collect_rows(save_dir: Path) -> list[dict]:
    """Return one row per run folder (a folder with config.json) anywhere under `save_dir`."""
    wall_times = {record["run_dir"]: record["wall_s"] for record in _read_records(save_dir)
                  if record.get("run_dir")}
    run_dirs = sorted(path.parent for path in save_dir.rglob("config.json"))
    rows = [summarize_run(run_dir, save_dir, wall_times) for run_dir in run_dirs]
    return sorted(rows, key=lambda row: (row["key_activation"], float(row["guidance"]), row["negative_key_type"],
                                         row["run_dir"]))


def format_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def write_markdown(rows: list[dict], path: Path) -> None:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[column]) for column in COLUMNS) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def aggregate(save_dir: Path) -> list[dict]:
    """Write sweep.csv, sweep.md and sweep.png for every run folder under `save_dir`; return the rows."""
    if not save_dir.is_dir():
        raise InputError(f"save dir {save_dir} not found; pass the --save_dir of the runs")
    rows = collect_rows(save_dir)
    if not rows:
        raise InputError(f"no run folder (with config.json) under {save_dir}")
    write_csv(rows, save_dir / "sweep.csv")
    write_markdown(rows, save_dir / "sweep.md")
    figures.draw_sweep(rows, save_dir / "sweep.png")
    logger.info("aggregated %d runs into %s, %s and %s", len(rows), save_dir / "sweep.csv",
                save_dir / "sweep.md", save_dir / "sweep.png")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description="Run a grid of training runs, or aggregate run folders.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    run = commands.add_parser("run", help="train every setting of the grid, then aggregate")
    run.add_argument("--save_dir", type=Path, default=Path("outputs/sweep"), help="folder of the sweep's runs")
    run.add_argument("--preset", choices=PRESETS, default="quick", help="run.sh preset of every run")
    run.add_argument("--key_activations", nargs="+", default=["tanh", "relu", "sigmoid"],
                     help="values of --key_activation")
    run.add_argument("--guidances", nargs="+", type=float, default=[0.0, 0.1, 0.5], help="values of --guidance")
    run.add_argument("--negative_key_types", nargs="+", default=["other"], help="values of --negative_key_type")
    run.add_argument("extra_args", nargs="*", help="flags passed to every run after '--'")
    summary = commands.add_parser("aggregate", help="write sweep.csv, sweep.md and sweep.png")
    summary.add_argument("save_dir", type=Path, help="folder searched for run folders")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "aggregate":
            aggregate(arguments.save_dir)
            return 0
        start = time.perf_counter()
        failures = run_sweep(arguments.save_dir, arguments.preset, arguments.key_activations,
                             arguments.guidances, arguments.negative_key_types, arguments.extra_args)
        logger.info("sweep finished in %.0f s; %d failed runs", time.perf_counter() - start, failures)
        if collect_rows(arguments.save_dir):
            aggregate(arguments.save_dir)
        else:
            logger.error("no run wrote a run folder under %s; nothing to aggregate", arguments.save_dir)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
