"""Line charts of logged figures, as PNG bytes to embed in the report."""

from __future__ import annotations

import io

OVERALL = ("all rows", "mean")  # run-wide series drawn black and dashed beside the per-task ones


def line_chart(title: str, lines: dict[str, tuple[list[int], list[float]]], ylabel: str, log_y: bool = False) -> bytes:
    """One line per series, step on the x axis; markers when a series has few points (dev evals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    try:
        for label, (steps, values) in lines.items():
            style = {"color": "k", "linestyle": "--"} if label in OVERALL and len(lines) > 1 else {}
            marker = "o" if len(steps) <= 20 else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.4, **style)
        every = [v for _, values in lines.values() for v in values]
        if log_y and min(every) > 0 and max(every) > 10 * min(every):  # a log axis only pays over a decade
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8, ncol=2 if len(lines) > 6 else 1, loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150)  # sharp on HiDPI screens
        return buf.getvalue()
    finally:
        plt.close(fig)
