"""One table per plug-in point: the methods (methods/registry.py) and the balancing methods
(config.py's two tuples), each matching what the config accepts and what implements it."""

from __future__ import annotations

import typing

import pytest

from multitune import config
from multitune.errors import MultituneError
from multitune.methods.registry import GATED, METHODS, method
from multitune.training.loss_weighting import BALANCERS
from multitune.training.surgery import SURGERY


def _config_method_names() -> set[str]:
    union = typing.get_args(typing.get_args(config.MethodConfig)[0])
    return {typing.get_args(cls.model_fields["name"].annotation)[0] for cls in union}


def test_every_config_method_has_one_registry_entry():
    assert set(METHODS) == _config_method_names()
    assert set(GATED) == set(config.EXPERT_METHODS)


def test_balancing_choices_come_from_the_one_table():
    assert set(BALANCERS) == set(config.BALANCE_WEIGHTINGS)
    assert set(SURGERY) == set(config.BALANCE_SURGERY)
    choices = typing.get_args(config.BalanceConfig.model_fields["method"].annotation)
    assert choices == ("rows", *config.BALANCE_WEIGHTINGS, *config.BALANCE_SURGERY)


def test_what_each_method_says_of_itself():
    saves = {name for name, m in METHODS.items() if m.saves_adapter}
    per_task = {"moe_lora", "cgc_lora", "lora_experts", "mtl_lora"}
    assert saves == {"lora", "adapter", *per_task}
    assert {name for name, m in METHODS.items() if m.per_task} == per_task
    assert {name for name, m in METHODS.items() if m.gates} == per_task == set(GATED)
    assert {name for name, m in METHODS.items() if m.merges and not m.per_task} == {"lora", "full", "freeze"}
    assert {name for name, m in METHODS.items() if m.export_lora} == {"lora", *per_task}
    adapter = config.AdapterMethod(name="adapter")
    assert not method("adapter").reads_task(adapter)
    assert method("adapter").reads_task(adapter.model_copy(update={"per_task": "task"}))
    assert method("cgc_lora").reads_task(None) and not method("lora").reads_task(None)


def test_an_unknown_method_is_one_line():
    with pytest.raises(MultituneError, match="unknown method 'lorax'; known: lora, moe_lora"):
        method("lorax")
