"""A task x task matrix as an annotated heatmap PNG (gradient cosines, affinity)."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from multitune.errors import MultituneError
from multitune.files import atomic_path


def plot_matrix(
    matrix: torch.Tensor | list,
    names: list[str],
    path: str | Path,
    title: str,
    vmin: float = -1.0,
    vmax: float = 1.0,
    fmt: str = ".2f",
) -> None:
    """Heatmap of a (K, K) task matrix (cosines, affinities) with each value written in its cell.

    Diverging colormap centred between ``vmin`` and ``vmax`` (red negative, blue positive). The PNG
    is written atomically (temporary file in the same folder, then ``os.replace``), so a reader
    never sees a half-written plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.as_tensor(matrix, dtype=torch.float64).numpy()
    names = list(names)
    if values.shape != (len(names), len(names)):
        raise MultituneError(f"plot_matrix needs a {len(names)}x{len(names)} matrix for {names}; got {values.shape}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = len(names)
    fig, ax = plt.subplots(figsize=(3.0 + 0.9 * k, 1.6 + 0.7 * k))
    try:
        image = ax.imshow(values, cmap="RdBu", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
        span = max(abs(vmin), abs(vmax), 1e-12)
        for i, j in itertools.product(range(k), range(k)):
            strong = abs(values[i, j]) > 0.6 * span
            ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8, color="w" if strong else "k")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
