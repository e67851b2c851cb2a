"""`multitune report`: one self-contained HTML page of a run (tables, curves, heatmaps)."""

from multitune.report.page import write_report

__all__ = ["write_report"]
