"""Tests for multitune.analysis: gradient geometry, TAG affinity and grouping, Δm, plots."""

import math

import pytest
import torch

from multitune.analysis.affinity import average_affinity, lookahead_affinity, propose_clusters
from multitune.analysis.delta_m import compare_table, delta_m
from multitune.analysis.gradients import conflict_rate, cosine_matrix, magnitude_similarity
from multitune.analysis.heatmap import plot_matrix
from multitune.errors import MultituneError
from multitune.training.surgery import per_task_grads

U = torch.tensor([1.0, -2.0, 0.5])


def _data(seed: int, n: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen)


# Task "a": y = +x.u; "a2": the same rows and targets as "a"; "b": y = -x.u on other rows.
X = {"a": _data(1), "a2": _data(1), "b": _data(2)}
SIGN = {"a": 1.0, "a2": 1.0, "b": -1.0}


def _model():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    return model


def _loss(model, name):
    x = X[name]
    return ((model(x).squeeze(1) - SIGN[name] * (x @ U)) ** 2).mean()


def _grads(names):
    model = _model()
    return per_task_grads([_loss(model, n) for n in names], list(model.parameters()))


def test_cosine_and_conflict_rate_on_conflicting_tasks():
    cos = cosine_matrix(_grads(["a", "b"]))
    assert cos.shape == (2, 2)
    assert float(cos[0, 1]) < -0.9 and float(cos[0, 1]) == float(cos[1, 0])
    assert cos[0, 0] == 1.0 and cos[1, 1] == 1.0
    assert conflict_rate(cos) == 1.0


def test_cosine_three_tasks_with_a_copy():
    cos = cosine_matrix(_grads(["a", "a2", "b"]))
    assert float(cos[0, 1]) == pytest.approx(1.0, abs=1e-6)
    assert float(cos[0, 2]) < -0.9 and float(cos[1, 2]) < -0.9
    assert conflict_rate(cos) == pytest.approx(2 / 3)


def test_cosine_zero_row_and_small_k():
    G = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    cos = cosine_matrix(G)
    assert not torch.isnan(cos).any()
    assert cos[1].tolist() == [0.0, 0.0, 0.0] and cos[:, 1].tolist() == [0.0, 0.0, 0.0]
    assert float(cos[0, 2]) == pytest.approx(-1 / math.sqrt(2))
    assert conflict_rate(cos) == pytest.approx(1 / 3)
    assert conflict_rate(torch.ones(1, 1)) == 0.0


def test_magnitude_similarity_by_hand():
    G = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0], [0.0, -5.0]])
    gms = magnitude_similarity(G)
    assert float(gms[0, 1]) == pytest.approx(2 * 5 * 1 / (25 + 1))
    assert float(gms[0, 3]) == pytest.approx(1.0)  # equal norms, whatever the direction
    assert float(gms[0, 0]) == pytest.approx(1.0)
    assert float(gms[0, 2]) == 0.0 and float(gms[2, 2]) == 0.0
    assert torch.allclose(gms, gms.T)


def test_lookahead_affinity_signs_and_parameters_restored():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, 0.2, -0.3]]))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    calls = []

    def task_loss(name):
        calls.append(name)
        return _loss(model, name)

    z = lookahead_affinity(params, task_loss, ["a", "a2", "b"], lr=0.05)
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(p.grad is None for p in params)
    assert len(calls) == 3 + 3 * 3  # L(theta) once per task, then K lookahead evaluations per task
    assert z["a"]["a2"] > 0 and z["a"]["a2"] == pytest.approx(z["a"]["a"])
    assert z["a2"]["a"] > 0
    assert z["a"]["b"] < 0 and z["b"]["a"] < 0
    # Z[i][j] = 1 - L_j(theta - lr grad L_i) / L_j(theta), checked for one entry by hand
    with torch.no_grad():
        base = float(_loss(model, "b"))
    grad = torch.autograd.grad(_loss(model, "a"), params)[0]
    with torch.no_grad():
        moved = torch.nn.Linear(3, 1, bias=False)
        moved.weight.copy_(model.weight - 0.05 * grad)
        after = float(_loss(moved, "b"))
    assert z["a"]["b"] == pytest.approx(1 - after / base, rel=1e-5)


def test_lookahead_affinity_restores_parameters_on_error():
    model = _model()
    params = list(model.parameters())
    before = params[0].detach().clone()
    state = {"n": 0}

    def task_loss(name):
        state["n"] += 1
        if state["n"] > 3:  # fail during a lookahead evaluation, after the step was applied
            raise RuntimeError("boom")
        return _loss(model, name)

    with pytest.raises(RuntimeError):
        lookahead_affinity(params, task_loss, ["a", "b"], lr=0.5)
    assert torch.equal(params[0], before)
    with pytest.raises(MultituneError, match="lr must be"):
        lookahead_affinity(params, task_loss, ["a"], lr=0.0)


def test_average_affinity():
    m1 = {"a": {"a": 1.0, "b": -1.0}, "b": {"a": 0.0, "b": 2.0}}
    m2 = {"a": {"a": 3.0, "b": 1.0}, "b": {"a": 2.0, "b": 0.0}}
    assert average_affinity([m1, m2]) == {"a": {"a": 2.0, "b": 0.0}, "b": {"a": 1.0, "b": 1.0}}
    with pytest.raises(MultituneError):
        average_affinity([])
    with pytest.raises(MultituneError, match="same tasks"):
        average_affinity([m1, {"a": {"a": 1.0}}])


def _pairs_affinity(order):
    def z(i, j):
        if i == j:
            return 0.0
        return 1.0 if {i, j} in ({"a", "b"}, {"c", "d"}) else -1.0

    return {i: {j: z(i, j) for j in order} for i in order}


def test_propose_clusters_finds_the_attracting_pairs():
    assert propose_clusters(_pairs_affinity("abcd"), 2) == {"a": "c1", "b": "c1", "c": "c2", "d": "c2"}
    # clusters are numbered by first task, in the affinity's order
    assert propose_clusters(_pairs_affinity("cadb"), 2) == {"c": "c1", "a": "c2", "d": "c1", "b": "c2"}
    assert propose_clusters(_pairs_affinity("abcd"), 1) == dict.fromkeys("abcd", "c1")
    assert propose_clusters(_pairs_affinity("abcd"), 4) == {"a": "c1", "b": "c2", "c": "c3", "d": "c4"}
    # three groups: one attracting pair stays together, the other pair splits (tie -> first found)
    three = propose_clusters(_pairs_affinity("abcd"), 3)
    assert three == {"a": "c1", "b": "c1", "c": "c2", "d": "c3"}


def test_propose_clusters_asymmetric_affinity():
    # a helps b strongly, b hurts a a little: together they score mean(Z[a][b]) + mean(Z[b][a]) = 2 - 0.5 > 0
    z = {"a": {"a": 0.0, "b": 2.0, "c": -1.0}, "b": {"a": -0.5, "b": 0.0, "c": -1.0}, "c": {"a": -1, "b": -1, "c": 0}}
    assert propose_clusters(z, 2) == {"a": "c1", "b": "c1", "c": "c2"}


def test_propose_clusters_errors():
    z = _pairs_affinity("abcd")
    with pytest.raises(MultituneError, match=r"between 1 and the number of tasks \(4\); got 5"):
        propose_clusters(z, 5)
    with pytest.raises(MultituneError, match="got 0"):
        propose_clusters(z, 0)
    big = {f"t{i}": {f"t{j}": 0.0 for j in range(11)} for i in range(11)}
    with pytest.raises(MultituneError, match="at most 10 tasks; got 11"):
        propose_clusters(big, 2)


def test_delta_m_by_hand():
    multi = {"acc": 80.0, "ppl": 10.0}
    single = {"acc": 75.0, "ppl": 12.5}
    hib = {"acc": True, "ppl": False}
    # ((80-75)/75 + (12.5-10)/12.5) * 100 / 2 = (6.667 + 20) / 2
    assert delta_m(multi, single, hib) == pytest.approx(13.3333333)
    assert delta_m(single, single, hib) == 0.0


def test_compare_table_fields():
    multi = {"acc": 80.0, "ppl": 10.0, "f1": 50.0}
    single = {"acc": 75.0, "ppl": 12.5, "f1": 60.0}
    hib = {"acc": True, "ppl": False, "f1": True}
    table = compare_table(multi, single, hib)
    assert table["tasks"]["acc"] == pytest.approx(
        {"multi": 80.0, "single": 75.0, "delta": 5.0, "relative_delta": 6.6666667}
    )
    assert table["tasks"]["ppl"]["delta"] == -2.5 and table["tasks"]["ppl"]["relative_delta"] == pytest.approx(20.0)
    assert table["tasks"]["f1"]["relative_delta"] == pytest.approx(-16.6666667)
    assert table["delta_m"] == pytest.approx((6.6666667 + 20.0 - 16.6666667) / 3)
    assert table["delta_m"] == pytest.approx(delta_m(multi, single, hib))
    assert table["below_baseline"] == 1
    assert table["worst_task"] == "f1"


def test_delta_m_errors():
    with pytest.raises(MultituneError, match="multi-task results cover tasks"):
        delta_m({"a": 1.0}, {"a": 1.0, "b": 2.0}, {"a": True, "b": True})
    with pytest.raises(MultituneError, match="task 'a' is 0"):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": True})


def test_plot_matrix_writes_png(tmp_path):
    out = tmp_path / "plots" / "cos.png"
    plot_matrix(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), ["a", "b"], out, "gradient cosine")
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["cos.png"]  # no temporary file left behind
    plot_matrix([[0.2, 0.1], [0.0, -0.3]], ["a", "b"], out, "affinity", vmin=-0.5, vmax=0.5)  # list input, overwrite
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MultituneError, match="2x2 matrix"):
        plot_matrix([[1.0]], ["a", "b"], out, "bad")
