"""Figures of a training run and of a sweep: loss curves, memory-selection frames and their GIF,
perplexity landscapes over DocRep space, and the per-setting bars of a sweep.

A memory-selection frame stacks three heatmaps, documents x memory entries: token selection (mean of
act(W_up h) over the document's tokens), document selection key_act(g(K)), and their product, each
with its own colour bar, and the epoch in the title. One frame is drawn per save; the GIF plays them
in order.

Example:
    draw_selection_frame(selections, epoch=10, num_epochs=50, path=run_dir / "frames/epoch_0010.png")
    write_gif(sorted((run_dir / "frames").glob("*.png")), run_dir / "memory_selection.gif")
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or available on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm  # noqa: E402
from PIL import Image  # noqa: E402

PANELS = (
    ("token", "Token selection", "Reds"),
    ("document", "Document selection", "seismic"),
    ("product", "Document x token", "seismic"),
)


def draw_loss_curves(history: list[dict], path: Path) -> None:
    """Plot loss, CE+ and CE- per epoch from the training history."""
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(epochs, [row["loss"] for row in history], label="guidance loss")
    axes[0].set_title("Loss")
    axes[1].plot(epochs, [row["ce_positive"] for row in history], label="CE+ (own DocRep)")
    axes[1].plot(epochs, [row["ce_negative"] for row in history], label="CE- (negative DocRep)")
    axes[1].set_title("Cross-entropy (nats)")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_selection_frame(selections: dict[str, np.ndarray], epoch: int, num_epochs: int, path: Path) -> None:
    """Draw the three selection heatmaps (each num_documents x hook_memory_dim) into one PNG.

    Cells have thin black borders so that single memory entries stay readable at 32+ entries.
    """
    num_documents, num_entries = selections["token"].shape
    width = max(8.0, 0.35 * num_entries + 3)
    height = max(6.0, 3 * (0.3 * num_documents + 1.2))
    figure, axes = plt.subplots(3, 1, figsize=(width, height))
    for axis, (key, label, colormap) in zip(axes, PANELS):
        values = np.asarray(selections[key], dtype=np.float64)
        norm = None
        if colormap == "seismic":
            # diverging colours centred on 0, as signs of the selection matter
            limit = max(float(np.abs(values).max()), 1e-6)
            norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
        image = axis.pcolormesh(values, cmap=colormap, norm=norm, edgecolors="black", linewidth=0.4)
        axis.invert_yaxis()  # document 0 on top, as in a matrix
        axis.set_ylabel(label)
        axis.set_xticks(np.arange(num_entries) + 0.5, labels=[str(entry) for entry in range(num_entries)])
        axis.set_yticks(np.arange(num_documents) + 0.5, labels=[str(row) for row in range(num_documents)])
        axis.tick_params(labelsize=7, length=0)
        figure.colorbar(image, ax=axis)
    axes[0].set_title(f"Epoch: {epoch}/{num_epochs}")
    axes[-1].set_xlabel("memory entry")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def draw_landscape(xs: np.ndarray, ys: np.ndarray, perplexity: np.ndarray, docreps: np.ndarray, label: int,
                   title: str, path: Path) -> None:
    """Draw one document's perplexity over a grid of 2-D DocReps, marking every trained DocRep.

    `perplexity` is (len(ys), len(xs)). The colour scale is logarithmic when perplexity spans more
    than a factor of 10 over the grid, as it does around a well-trained DocRep.
    """
    figure, axis = plt.subplots(figsize=(6, 5))
    values = np.asarray(perplexity, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    # a log scale only pays off over a wide range; over a narrow one it gives unreadable ticks
    norm = LogNorm(vmin=low, vmax=high) if high > 10 * low else Normalize(vmin=low, vmax=max(high, low + 1e-6))
    image = axis.pcolormesh(xs, ys, values, cmap="viridis_r", shading="nearest", norm=norm)
    figure.colorbar(image, ax=axis, label="perplexity")
    others = [row for row in range(docreps.shape[0]) if row != label]
    axis.scatter(docreps[others, 0], docreps[others, 1], marker="o", s=40, facecolors="white",
                 edgecolors="black", label="other DocReps")
    axis.scatter(docreps[label, 0], docreps[label, 1], marker="*", s=220, color="red", edgecolors="black",
                 label="own DocRep")
    for row in range(docreps.shape[0]):
        axis.annotate(str(row), (docreps[row, 0], docreps[row, 1]), xytext=(5, 5), textcoords="offset points",
                      color="white", fontsize=9)
    axis.set_title(f"Document {label}: {title[:40]}")
    axis.set_xlabel("DocRep dimension 0")
    axis.set_ylabel("DocRep dimension 1")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def draw_sweep(rows: list[dict], path: Path) -> None:
    """Plot identification accuracy, mean CE margin and own-DocRep ROUGE-L F1 of every sweep run."""
    names = [row["setting"] for row in rows]
    panels = (("identification_accuracy", "identification accuracy"), ("mean_margin", "mean CE margin (nats)"),
              ("rougeL_f1_own", "ROUGE-L F1, own DocRep"))
    figure, axes = plt.subplots(1, 3, figsize=(max(10.0, 1.2 * len(rows) + 4), 4.5))
    positions = np.arange(len(rows))
    for axis, (key, label) in zip(axes, panels):
        values = [np.nan if row.get(key) is None else float(row[key]) for row in rows]
        axis.bar(positions, values, color="tab:blue")
        axis.set_title(label)
        axis.set_xticks(positions, labels=names, rotation=60, ha="right", fontsize=7)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_gif(frame_paths: list[Path], path: Path, duration_ms: int = 400) -> None:
    """Assemble PNG frames into an endlessly looping GIF."""
    frames = [Image.open(frame_path).convert("RGB") for frame_path in frame_paths]
    if not frames:
        raise ValueError(f"no frames to write into {path}")
    size = frames[0].size
    frames = [frame.resize(size) for frame in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
