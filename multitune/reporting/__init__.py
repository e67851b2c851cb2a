"""`multitune report`: one self-contained HTML page of a run (tables, curves, heatmaps), and the
results table every command prints (reporting/tables.py)."""


def write_report(*args, **kwargs):
    """See reporting/page.py; imported on use (the page needs matplotlib, the tables do not)."""
    from multitune.reporting.page import write_report as write

    return write(*args, **kwargs)


__all__ = ["write_report"]
