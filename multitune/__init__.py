"""multitune: multi-task fine-tuning of pre-trained causal language models.

The Python API (docs/python-api.md): each command as a function that returns its result.

    import multitune
    results = multitune.train("run.yaml", ["train.max_steps=100"])
    rows = multitune.predict("runs/x", "sst2", [{"text": "a fine film"}])

The functions are imported on first use, so `import multitune` itself loads no model library.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "predict", "export", "report", "affinity", "compare", "merge", "MultituneError"]


def __getattr__(name: str):
    if name == "MultituneError":
        from multitune.errors import MultituneError

        return MultituneError
    if name in __all__:
        from multitune import api

        return getattr(api, name)
    raise AttributeError(f"module 'multitune' has no attribute {name!r}")
