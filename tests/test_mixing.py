"""Tests for multitune.data.mixing: probabilities, per-epoch coverage, determinism, resume."""

import json
from collections import Counter

import numpy as np
import pytest

from multitune.data.mixing import STRATEGIES, TaskMixture, mixture_probabilities
from multitune.errors import MultituneError

SIZES = {"a": 100, "b": 400}


def test_strategies_tuple():
    assert STRATEGIES == ("proportional", "temperature", "uniform", "weights")


def test_proportional():
    assert mixture_probabilities(SIZES, "proportional") == pytest.approx({"a": 0.2, "b": 0.8})


def test_temperature_two_is_sqrt_ratio():
    # sqrt(100) : sqrt(400) = 10 : 20
    p = mixture_probabilities(SIZES, "temperature", temperature=2.0)
    assert p == pytest.approx({"a": 1 / 3, "b": 2 / 3})


def test_temperature_one_is_proportional():
    p = mixture_probabilities(SIZES, "temperature", temperature=1.0)
    assert p == pytest.approx({"a": 0.2, "b": 0.8})


def test_temperature_other_value():
    # 8 ** (1/3) = 2, 64 ** (1/3) = 4, 1 ** (1/3) = 1 -> 2:4:1
    p = mixture_probabilities({"x": 8, "y": 64, "z": 1}, "temperature", temperature=3.0)
    assert p == pytest.approx({"x": 2 / 7, "y": 4 / 7, "z": 1 / 7})


def test_uniform():
    p = mixture_probabilities({"a": 1, "b": 50, "c": 9999}, "uniform")
    assert p == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_weights():
    p = mixture_probabilities(SIZES, "weights", weights={"a": 3.0, "b": 1.0})
    assert p == pytest.approx({"a": 0.75, "b": 0.25})


def test_weights_zero_switches_task_off():
    p = mixture_probabilities(SIZES, "weights", weights={"a": 0.0, "b": 2.0})
    assert p == {"a": 0.0, "b": 1.0}
    m = TaskMixture(SIZES, "weights", weights={"a": 0, "b": 1})
    assert {t for t, _ in m.next_batch(500)} == {"b"}


def test_probabilities_keep_task_order_and_sum_to_one():
    sizes = {"z": 3, "a": 7, "m": 11}
    for strategy in ("proportional", "temperature", "uniform"):
        p = mixture_probabilities(sizes, strategy)
        assert list(p) == ["z", "a", "m"]
        assert sum(p.values()) == pytest.approx(1.0)
        assert all(type(v) is float for v in p.values())


def test_mixture_exposes_probabilities():
    m = TaskMixture(SIZES, "temperature", temperature=2.0)
    assert m.probabilities == pytest.approx({"a": 1 / 3, "b": 2 / 3})


def test_empirical_proportions_match_temperature():
    m = TaskMixture({"a": 100, "b": 400, "c": 2500}, "temperature", temperature=2.0, seed=3)
    counts = Counter()
    for _ in range(200):
        counts.update(t for t, _ in m.next_batch(100))
    total = sum(counts.values())
    assert total == 20_000 == m.draws
    for task, p in m.probabilities.items():
        assert abs(counts[task] / total - p) < 0.01


def test_each_epoch_covers_every_index_once():
    sizes = {"a": 7, "b": 13, "c": 20}
    m = TaskMixture(sizes, "uniform", seed=5)
    seen: dict[str, list[int]] = {t: [] for t in sizes}
    for _ in range(60):
        for task, idx in m.next_batch(8):
            seen[task].append(idx)
    for task, n in sizes.items():
        idxs = seen[task]
        full_epochs = len(idxs) // n
        assert full_epochs >= 2, task
        for e in range(full_epochs):
            assert sorted(idxs[e * n : (e + 1) * n]) == list(range(n))
        # a partial epoch never repeats an index
        rest = idxs[full_epochs * n :]
        assert len(set(rest)) == len(rest)


def test_epoch_permutation_comes_from_seed_and_is_reshuffled():
    sizes = {"a": 30, "b": 50}
    m = TaskMixture(sizes, "weights", weights={"a": 0, "b": 1}, seed=11)
    got = [i for _, i in m.next_batch(100)]
    expected0 = np.random.default_rng([11, 1, 0]).permutation(50).tolist()
    expected1 = np.random.default_rng([11, 1, 1]).permutation(50).tolist()
    assert got == expected0 + expected1
    assert expected0 != expected1


def _sequence(m: TaskMixture, batches: int, batch_size: int = 16) -> list:
    return [m.next_batch(batch_size) for _ in range(batches)]


def test_same_seed_same_sequence_different_seed_differs():
    a = _sequence(TaskMixture(SIZES, "temperature", seed=42), 20)
    b = _sequence(TaskMixture(SIZES, "temperature", seed=42), 20)
    c = _sequence(TaskMixture(SIZES, "temperature", seed=43), 20)
    assert a == b
    assert a != c


def test_batch_items_are_plain_python():
    batch = TaskMixture(SIZES, seed=0).next_batch(10)
    assert len(batch) == 10
    for task, idx in batch:
        assert type(task) is str
        assert type(idx) is int
        assert 0 <= idx < SIZES[task]


def test_draws_counts_pairs():
    m = TaskMixture(SIZES)
    assert m.draws == 0
    m.next_batch(7)
    m.next_batch(5)
    assert m.draws == 12


@pytest.mark.parametrize("via_json", [False, True])
def test_resume_from_state_dict_continues_identically(via_json):
    sizes = {"a": 9, "b": 23, "c": 40}  # small tasks so epochs roll over during the test
    kwargs = dict(strategy="temperature", temperature=1.5, seed=7)
    original = TaskMixture(sizes, **kwargs)
    _sequence(original, 13, batch_size=5)

    state = original.state_dict()
    if via_json:
        state = json.loads(json.dumps(state))
    restored = TaskMixture(sizes, **kwargs)
    restored.load_state_dict(state)
    assert restored.draws == original.draws == 65

    assert _sequence(restored, 50, batch_size=5) == _sequence(original, 50, batch_size=5)
    assert restored.draws == original.draws


def test_state_dict_is_plain_json():
    m = TaskMixture(SIZES, seed=1)
    m.next_batch(33)
    state = m.state_dict()

    def check(value):
        if isinstance(value, dict):
            for k, v in value.items():
                assert type(k) is str
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)
        else:
            assert type(value) in (int, float, str, bool), type(value)

    check(state)
    assert json.loads(json.dumps(state)) == state


def test_load_state_with_other_tasks_raises():
    state = TaskMixture(SIZES).state_dict()
    with pytest.raises(MultituneError, match="tasks"):
        TaskMixture({"a": 100, "c": 400}).load_state_dict(state)
    with pytest.raises(MultituneError, match="tasks"):
        TaskMixture({"b": 400, "a": 100}).load_state_dict(state)


def test_load_state_with_other_sizes_raises():
    state = TaskMixture(SIZES).state_dict()
    with pytest.raises(MultituneError, match="sizes"):
        TaskMixture({"a": 100, "b": 401}).load_state_dict(state)


def test_unknown_strategy():
    with pytest.raises(MultituneError, match=r"unknown mixing strategy 'bogus'.*proportional"):
        mixture_probabilities(SIZES, "bogus")
    with pytest.raises(MultituneError, match="unknown mixing strategy"):
        TaskMixture(SIZES, "bogus")


@pytest.mark.parametrize("temperature", [0, -1.0, 0.0])
def test_bad_temperature(temperature):
    with pytest.raises(MultituneError, match="temperature must be"):
        mixture_probabilities(SIZES, "temperature", temperature=temperature)


def test_zero_size_task():
    with pytest.raises(MultituneError, match=r"task 'b' has size 0"):
        mixture_probabilities({"a": 5, "b": 0}, "uniform")


def test_no_tasks():
    with pytest.raises(MultituneError, match="at least one task"):
        mixture_probabilities({}, "proportional")


def test_weights_missing_task():
    with pytest.raises(MultituneError, match=r"weights missing for task\(s\) 'b'"):
        mixture_probabilities(SIZES, "weights", weights={"a": 1.0})


def test_weights_none():
    with pytest.raises(MultituneError, match="needs weights"):
        mixture_probabilities(SIZES, "weights")


def test_weights_unknown_task():
    with pytest.raises(MultituneError, match=r"unknown task\(s\) 'c'"):
        mixture_probabilities(SIZES, "weights", weights={"a": 1.0, "b": 1.0, "c": 1.0})


def test_negative_weight():
    with pytest.raises(MultituneError, match=r"weight for task 'a' is negative"):
        mixture_probabilities(SIZES, "weights", weights={"a": -1.0, "b": 1.0})


def test_all_zero_weights():
    with pytest.raises(MultituneError, match="sum to 0"):
        mixture_probabilities(SIZES, "weights", weights={"a": 0.0, "b": 0.0})


def test_error_messages_are_one_line():
    cases = [
        lambda: mixture_probabilities(SIZES, "bogus"),
        lambda: mixture_probabilities(SIZES, "temperature", temperature=0),
        lambda: mixture_probabilities({"a": 0}, "uniform"),
        lambda: mixture_probabilities(SIZES, "weights", weights={"a": 1.0}),
        lambda: mixture_probabilities(SIZES, "weights", weights={"a": 1, "b": 1, "c": 1}),
        lambda: mixture_probabilities(SIZES, "weights", weights={"a": -1, "b": 1}),
    ]
    for case in cases:
        with pytest.raises(MultituneError) as info:
            case()
        assert "\n" not in str(info.value)


def test_bad_batch_size_and_seed():
    with pytest.raises(MultituneError, match="batch size"):
        TaskMixture(SIZES).next_batch(0)
    with pytest.raises(MultituneError, match="seed"):
        TaskMixture(SIZES, seed=-1)
