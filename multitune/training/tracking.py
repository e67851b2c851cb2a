"""Experiment tracking through Accelerate's tracker classes (`accelerate.tracking`): TensorBoard by
default, any of Weights & Biases, MLflow, Comet, Aim, ClearML, DVCLive, Trackio or SwanLab with one
config key (`train.report_to: [tensorboard, mlflow]`).

Every tracker gets the same series: `train/<key>` and `train/<task>/<key>` each logged step,
`dev/<task>/<metric>` at each eval, `final/<task>/<metric>` after the final evaluation, and the
flattened config as hyperparameters. metrics.jsonl stays the run's own record (the report reads
it); the trackers are views of it.

The trackers are built here rather than by `Accelerator(log_with=...)` because a resumed run has to
hand each one what continues its series (TensorBoard's purge step, the MLflow and W&B run ids),
and those are known only after the checkpoint is read. What a tracker needs to continue is kept in
RUN/trackers.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from multitune import rundir
from multitune.config import flat_config
from multitune.errors import MultituneError

# config name -> (module to import, what to pip install)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow (or mlflow-skinny sqlalchemy alembic)"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "trackio": ("trackio", "trackio"),
    "swanlab": ("swanlab", "swanlab"),
}
STATE = rundir.TRACKERS
PROJECT = "multitune"


def check_installed(names: list[str]) -> None:
    """One line for a tracker that is named but not installed (Accelerate would drop it silently)."""
    for name in names:
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise MultituneError(f"train.report_to: {name} is not installed; pip install {package}")


class Trackers:
    """The run's trackers, started together, logged together, finished together (main process)."""

    def __init__(self, names: list[str], run_dir: Path, step: int, resume: bool, main: bool):
        self.run_dir = Path(run_dir)
        self.trackers: list = []
        self.continued: set[str] = set()
        self._mlflow_store = False
        if not main or not names:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        saved = self._saved() if resume else {}
        self.continued = set(saved)
        run_name = self.run_dir.resolve().name
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                # purge_step hides the events a stopped run logged after its last checkpoint
                tracker = cls("", str(self.run_dir / rundir.TENSORBOARD), purge_step=step + 1)
            elif name == "mlflow":
                self._use_run_store()
                tracker = cls(PROJECT, run_name=run_name, run_id=saved.get("mlflow"))
            elif name == "wandb":
                run_id = saved.get("wandb") or _wandb_id()
                tracker = cls(PROJECT, name=run_name, id=run_id, resume="allow", dir=str(self.run_dir))
            elif cls.requires_logging_directory:
                tracker = cls(PROJECT, str(self.run_dir))
            else:
                tracker = cls(PROJECT)
            tracker.start()
            self.trackers.append(tracker)
        self._save()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:  # an MLflow run that stopped on an error or a signal says so
            for tracker in self.trackers:
                if tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")
        self.finish()

    def store_config(self, config: dict) -> None:
        """The config as hyperparameters, once per tracked run (a continued MLflow or W&B run
        has them already, and MLflow refuses a parameter whose value changes)."""
        values = flat_config(config)
        for tracker in self.trackers:
            if tracker.name not in self.continued:
                tracker.store_init_configuration(values)

    def log(self, values: dict, step: int) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
        if self._mlflow_store:
            import mlflow

            mlflow.set_tracking_uri(None)  # unsets MLFLOW_TRACKING_URI again: the next run picks its own
            self._mlflow_store = False

    def _use_run_store(self) -> None:
        """MLflow logs into the run dir (RUN/mlflow.db, a local SQLite store) unless the user named a
        tracking server or store (MLFLOW_TRACKING_URI); `finish` unsets it again (MLflow keeps the URI
        in that environment variable, which the next run in this process would otherwise inherit)."""
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return
        import mlflow

        self._mlflow_store = True
        mlflow.set_tracking_uri(f"sqlite:///{(self.run_dir / rundir.MLFLOW_DB).resolve()}")

    def _saved(self) -> dict:
        path = self.run_dir / STATE
        try:
            saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (OSError, ValueError):
            saved = {}
        return saved if isinstance(saved, dict) else {}

    def _save(self) -> None:
        """The ids that continue each series on --resume."""
        from multitune.files import write_atomic

        ids = {}
        for tracker in self.trackers:
            if tracker.name == "mlflow":
                ids["mlflow"] = tracker.active_run.info.run_id
            elif tracker.name == "wandb":
                ids["wandb"] = tracker.run.id
        if ids:
            write_atomic(self.run_dir / STATE, json.dumps(ids) + "\n")


def _wandb_id() -> str:
    import wandb

    return wandb.util.generate_id()
