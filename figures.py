"""Figures of a training run: loss curves, memory-selection frames and their GIF.

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
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
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
    """Draw the three selection heatmaps (each num_documents x hook_memory_dim) into one PNG."""
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
        image = axis.imshow(values, aspect="auto", cmap=colormap, norm=norm, interpolation="nearest")
        axis.set_ylabel(label)
        axis.set_xticks(range(num_entries))
        axis.set_yticks(range(num_documents))
        axis.tick_params(labelsize=7)
        figure.colorbar(image, ax=axis)
    axes[0].set_title(f"Epoch: {epoch}/{num_epochs}")
    axes[-1].set_xlabel("memory entry")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_gif(frame_paths: list[Path], path: Path, duration_ms: int = 400) -> None:
    """Assemble PNG frames into an endlessly looping GIF."""
    frames = [Image.open(frame_path).convert("RGB") for frame_path in frame_paths]
    if not frames:
        raise ValueError(f"no frames to write into {path}")
    size = frames[0].size
    frames = [frame.resize(size) for frame in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
