"""Reaches into other libraries' internals live in multitune/_compat.py only, and a missing one
is one line naming the library and the supported range."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from multitune import _compat
from multitune.errors import MultituneError

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = [
    "_compiled_call_impl",
    "_current_graph_task_id",
    "._version",
    "PEFT_TYPE_TO_",
    "_member_map_",
    "hf_quantizer",
    "_scaled_dot_product_flash",
    "_get_in_out_features",
    "__class__ =",
    "transformers.integrations",
    "transformers.masking_utils",
    "transformers.cache_utils",
]


def test_no_module_outside_compat_reaches_into_private_internals():
    found = []
    for path in sorted((ROOT / "multitune").rglob("*.py")):
        if path.name == "_compat.py":
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}: {name}" for name in PRIVATE if name in text]
    assert found == []


def test_the_supported_ranges_are_the_package_ranges():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {re.match(r"[a-z]+", d).group(0): d[len(re.match(r"[a-z]+", d).group(0)) :] for d in deps}
    for library, spec in _compat.SUPPORTED.items():
        assert declared[library] == spec, library
    pins = (ROOT / "constraints.txt").read_text().split()
    for pin in pins:
        if "==" in pin:
            library, pinned = pin.split("==")
            lower = re.search(r">=([\d.]+)", _compat.SUPPORTED[library]).group(1)
            assert pinned.startswith(lower), (library, pinned, lower)


def test_a_missing_internal_is_one_line_with_the_range(monkeypatch):
    monkeypatch.delattr(_compat.torch._C, "_current_graph_task_id")
    with pytest.raises(MultituneError) as e:
        _compat.in_backward()
    message = str(e.value)
    assert message.startswith(f"torch {_compat.version('torch')} has no torch._C._current_graph_task_id")
    assert message.endswith("supported: torch>=2.4") and "\n" not in message


def test_registering_a_method_twice_replaces_its_classes():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from multitune.methods.experts.config import CGC_LORA, CgcLoraConfig
    from multitune.methods.experts.model import CgcLoraModel

    class Again(CgcLoraModel):
        pass

    try:
        _compat.register_peft_method("cgc_lora", CGC_LORA, CgcLoraConfig, Again)
        assert PEFT_TYPE_TO_TUNER_MAPPING[CGC_LORA] is Again
        assert PEFT_TYPE_TO_CONFIG_MAPPING[CGC_LORA] is CgcLoraConfig
    finally:
        _compat.register_peft_method("cgc_lora", CGC_LORA, CgcLoraConfig, CgcLoraModel)
    assert _compat.extend_peft_type("CGC_LORA") is CGC_LORA
