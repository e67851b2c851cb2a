"""`multitune report`: one self-contained HTML page of a run (tables, curves, heatmaps)."""

from multitune.reporting.page import write_report

__all__ = ["write_report"]
