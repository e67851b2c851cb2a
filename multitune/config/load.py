"""Reading a run's config: the YAML file, `key.sub=value` overrides, validation, paths.

Validation errors come out as one line naming the key (with a suggestion when a known key is
close), because a typo found after a 30-second model load is a typo found too late.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from multitune.config.schema import (
    AdapterMethod,
    CgcLoraMethod,
    FreezeMethod,
    FullMethod,
    LoraExpertsMethod,
    LoraMethod,
    MoeLoraMethod,
    MtlLoraMethod,
    RunConfig,
)
from multitune.errors import MultituneError
from multitune.textfile import read_text


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file, apply `key.sub=value` overrides, validate, resolve data paths."""
    path = Path(path)
    if not path.is_file():
        raise MultituneError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise MultituneError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise MultituneError(f"{path}: a run config must be a YAML mapping of keys to values")
    for item in overrides or []:
        apply_override(raw, item)
    cfg = validate_config(raw, source=str(path))
    return resolve_paths(cfg)


def as_config(config: str | Path | dict | RunConfig, overrides: list[str] | None = None) -> RunConfig:
    """A validated run config from a YAML path, a dict of the YAML's content or a `RunConfig`,
    with `key.sub=value` overrides applied (the Python API takes any of the three)."""
    if isinstance(config, str | Path):
        return load_config(config, overrides)
    if isinstance(config, RunConfig):
        raw, source = config.model_dump(mode="json"), "config"
    elif isinstance(config, dict):
        raw, source = copy.deepcopy(config), "config dict"
    else:
        raise MultituneError(f"a run config is a YAML path, a dict or a RunConfig, not {type(config).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return resolve_paths(validate_config(raw, source=source))


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise MultituneError(f"{source}: {describe_validation_error(e, raw)}") from None


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Make data file paths absolute (relative to the working directory) so a saved run config
    still points at its data when used from elsewhere."""
    for t in cfg.tasks:
        if t.data.hf_dataset is None:
            for split in ("train", "dev", "test"):
                p = getattr(t.data, split)
                if p is not None:
                    setattr(t.data, split, str(Path(p).expanduser().resolve()))
    if Path(cfg.model).expanduser().exists():  # a local model dir, .gguf file or earlier run (a DAPT stage)
        cfg.model = str(Path(cfg.model).expanduser().resolve())
    if cfg.retention is not None and cfg.retention.data is not None:
        cfg.retention.data = str(Path(cfg.retention.data).expanduser().resolve())
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`train.lr=1e-4`, `method.rank=16`, `tasks.sst2.max_train_examples=100` (task by name or index)."""
    if "=" not in item:
        raise MultituneError(f"override '{item}' must look like key.sub=value")
    key, value_text = item.split("=", 1)
    try:
        value = yaml.safe_load(value_text) if value_text else ""
    except yaml.YAMLError:
        value = value_text
    if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
        try:
            value = float(value)
        except ValueError:
            pass
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[: i + 1]))
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise MultituneError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        raise MultituneError(f"override '{item}': name a key inside the list item")
    node[last] = value


def _list_item(items: list, part: str, where: str) -> dict:
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    for it in items:
        if isinstance(it, dict) and it.get("name") == part:
            return it
    names = [str(it.get("name")) for it in items if isinstance(it, dict)]
    raise MultituneError(f"override: no item '{part}' in '{where.rsplit('.', 1)[0]}' (have: {', '.join(names)})")


def describe_validation_error(e: ValidationError, raw: dict[str, Any]) -> str:
    """One line per pydantic error, joined: 'unknown key train.lrr (did you mean train.lr?)'."""
    msgs = []
    for err in e.errors():
        loc = _readable_loc(err["loc"], raw)
        if err["type"] == "extra_forbidden":
            parent_model = _model_at(err["loc"][:-1], raw)
            bad = str(err["loc"][-1])
            hint = ""
            if parent_model is not None:
                close = difflib.get_close_matches(bad, list(parent_model.model_fields), n=1)
                if close:
                    hint = f" (did you mean '{loc.rsplit('.', 1)[0] + '.' if '.' in loc else ''}{close[0]}'?)"
            msgs.append(f"unknown key '{loc}'{hint}")
        elif err["type"] == "missing":
            msgs.append(f"missing key '{loc}'")
        else:
            text = err["msg"].removeprefix("Value error, ")
            if err["type"] == "literal_error":  # name what was given beside what is allowed
                text += f"; got {err['input']!r}"
            msgs.append(f"{loc}: {text}" if loc else text)
    return "; ".join(msgs)


_METHODS = {
    "lora": LoraMethod,
    "full": FullMethod,
    "freeze": FreezeMethod,
    "moe_lora": MoeLoraMethod,
    "cgc_lora": CgcLoraMethod,
    "lora_experts": LoraExpertsMethod,
    "mtl_lora": MtlLoraMethod,
    "adapter": AdapterMethod,
}


def _readable_loc(loc: tuple, raw: dict[str, Any]) -> str:
    """('tasks', 0, 'kind') -> 'tasks[sst2].kind'; drop pydantic's union tags ('method', 'lora', 'rank')."""
    out: list[str] = []
    for i, part in enumerate(loc):
        if i == 1 and loc[0] == "method" and part in _METHODS:
            continue
        if isinstance(part, int):
            name = None
            if loc[:i] == ("tasks",) and isinstance(raw.get("tasks"), list) and part < len(raw["tasks"]):
                item = raw["tasks"][part]
                name = item.get("name") if isinstance(item, dict) else None
            out[-1] += f"[{name or part}]"
        else:
            out.append(str(part))
    return ".".join(out)


def _model_at(loc: tuple, raw: dict[str, Any]) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue
        if i == 1 and loc[0] == "method" and part in _METHODS:
            model = _METHODS[part]
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        sub = _first_model(ann)
        if str(part) == "method":
            sub = _METHODS.get(str((raw.get("method") or {}).get("name")), None)
        if sub is None:
            return None
        model = sub
    return model


def _first_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def flat_config(config: dict, prefix: str = "") -> dict:
    """The config as one level of `a.b.c` keys with scalar values, as trackers take hyperparameters
    and the report compares settings. Tasks are keyed by name (`tasks.sst2.prompt`); a list of
    scalars is one JSON string; None stays None (TensorBoard skips it, the others show it)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for item in value:
                out.update(flat_config({k: v for k, v in item.items() if k != "name"}, f"{name}.{item['name']}."))
        elif isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(list(value))
        else:
            out[name] = value
    return out
