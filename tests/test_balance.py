"""Tests for multitune.training.surgery (gradient surgery) and multitune.training.loss_weighting (loss balancers)."""

import math

import numpy as np
import pytest
import torch

from multitune.errors import MultituneError
from multitune.training.loss_weighting import BALANCERS, make_balancer
from multitune.training.surgery import (
    SURGERY,
    _pcgrad_rows,
    aligned_mtl,
    cagrad,
    imtl_g,
    mgda,
    pcgrad,
    per_task_grads,
    write_grad,
)

ALL = torch.tensor([True, True])


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- PCGrad -------------------------------------------------------------------------------------


def test_pcgrad_conflicting_pair_by_hand():
    # g1.g2 = -1: g1' = (1,0) + 0.5 (-1,1) = (0.5,0.5); g2' = (-1,1) + 1 (1,0) = (0,1); sum (0.5,1.5)
    G = t([1, 0], [-1, 1])
    assert torch.allclose(_pcgrad_rows(G), t([0.5, 0.5], [0, 1]))
    assert torch.allclose(pcgrad(G), torch.tensor([0.5, 1.5]))


def test_pcgrad_without_conflict_is_the_plain_sum():
    G = t([1, 2], [3, 1], [0.5, 0])
    assert torch.equal(pcgrad(G), G.sum(0))


def test_pcgrad_projected_pair_is_orthogonal():
    gen = torch.Generator().manual_seed(0)
    g1 = torch.randn(50, generator=gen)
    g2 = -0.5 * g1 + torch.randn(50, generator=gen)
    G = torch.stack([g1, g2])
    assert float(g1 @ g2) < 0  # the case under test
    rows = _pcgrad_rows(G)
    assert float(rows[0] @ g2) == pytest.approx(0.0, abs=1e-4)
    assert float(rows[1] @ g1) == pytest.approx(0.0, abs=1e-4)
    assert float(rows[0] @ g2) >= -1e-4 and float(rows[1] @ g1) >= -1e-4


def test_pcgrad_three_tasks_order_dependence_by_hand():
    # g1=(1,0), g2=(-1,1), g3=(-1,-1); g2.g3 = 0.
    # g1: either order projects it to (0,0).
    # g2: after g1 -> (0,1), then g3: (0,1).(-1,-1) = -1 -> (-0.5,0.5); order (g3, g1) -> (0,1).
    # g3: symmetric: (-0.5,-0.5) or (0,-1).
    G = t([1, 0], [-1, 1], [-1, -1])
    g2_options = [(-0.5, 0.5), (0.0, 1.0)]
    g3_options = [(-0.5, -0.5), (0.0, -1.0)]
    expected = {(a[0] + b[0], a[1] + b[1]) for a in g2_options for b in g3_options}
    seen = set()
    for seed in range(40):
        rows = _pcgrad_rows(G, torch.Generator().manual_seed(seed))
        assert torch.allclose(rows[0], torch.zeros(2), atol=1e-7)
        out = pcgrad(G, torch.Generator().manual_seed(seed))
        key = (round(float(out[0]), 6), round(float(out[1]), 6))
        assert key in expected
        seen.add(key)
    assert len(seen) >= 2  # the random order really is used
    a = pcgrad(G, torch.Generator().manual_seed(7))
    b = pcgrad(G, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# --- CAGrad -------------------------------------------------------------------------------------


def _cagrad_brute_force(G: torch.Tensor, c: float) -> np.ndarray:
    """CAGrad by grid search over the simplex (coarse grid, then two local refinements)."""
    g = G.double().numpy()
    k = g.shape[0]
    a = g @ g.T
    b = np.ones(k) / k
    g0 = g.mean(0)
    g0_norm = math.sqrt(a.mean())

    def objective(w):
        return w @ a @ b + c * g0_norm * np.sqrt(np.einsum("ni,ij,nj->n", w, a, w))

    def grid(center, half, n):
        if k == 2:
            x = np.clip(np.linspace(center[0] - half, center[0] + half, n), 0, 1)
            return np.stack([x, 1 - x], 1)
        x, y = np.meshgrid(
            np.linspace(center[0] - half, center[0] + half, n), np.linspace(center[1] - half, center[1] + half, n)
        )
        x, y = x.ravel(), y.ravel()
        keep = (x >= 0) & (y >= 0) & (x + y <= 1)
        return np.stack([x[keep], y[keep], 1 - x[keep] - y[keep]], 1)

    w = np.full(k, 0.5)
    for half in (0.5, 0.01, 0.0005):
        cand = grid(w, half, 201)
        w = cand[objective(cand).argmin()]
    gw = w @ g
    d = g0 + c * g0_norm / np.linalg.norm(gw) * gw
    return k * d / (1 + c * c)


def test_cagrad_c_zero_is_the_sum():
    G = t([2, 0, 1], [-1, 1, 0], [0.5, -3, 2])
    assert torch.allclose(cagrad(G, c=0.0), G.sum(0))


@pytest.mark.parametrize("c", [0.4, 0.9, 2.0])
def test_cagrad_matches_brute_force_two_tasks(c):
    G = t([2, 0], [-1, 1])
    expected = _cagrad_brute_force(G, c)
    assert np.allclose(cagrad(G, c).numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_matches_brute_force_three_tasks(c):
    G = t([1, 0, 0.5], [-0.8, 1, 0], [0.2, -0.9, 1])
    expected = _cagrad_brute_force(G, c)
    assert np.allclose(cagrad(G, c).numpy(), expected, atol=1e-3)


def test_cagrad_known_value():
    # c = 0.4 on (2,0), (-1,1): the solver picks w = (0, 1) (a vertex), so
    # d = g0 + c|g0|/|g2| g2 = (0.5,0.5) + 0.4*sqrt(0.5)/sqrt(2) (-1,1) = (0.3,0.7); x K / (1 + c^2)
    d = cagrad(t([2, 0], [-1, 1]), c=0.4)
    assert torch.allclose(d, torch.tensor([0.3, 0.7]) * 2 / 1.16, atol=1e-5)


def test_cagrad_avoids_conflict_when_c_is_large_enough():
    G = t([4, 0], [-1, 0.5])
    assert float(G[1] @ G.mean(0)) < 0  # the mean gradient would increase task 2's loss
    d = cagrad(G, c=0.9)
    assert (G @ d >= 0).all(), G @ d
    assert float((G @ cagrad(G, c=0.4)).min()) < 0  # a small ball cannot reach a conflict-free direction


def test_cagrad_rejects_negative_c():
    with pytest.raises(MultituneError, match="cagrad c must be"):
        cagrad(t([1, 0]), c=-1.0)


# --- Aligned-MTL --------------------------------------------------------------------------------


def test_aligned_mtl_by_hand():
    # orthogonal, norms 2 and 1: lambda = (4, 1), B = 1 * diag(1/2, 1), alpha = (0.5, 1) -> (1, 1)
    assert torch.allclose(aligned_mtl(t([2, 0], [0, 1])), torch.tensor([1.0, 1.0]))
    # orthogonal with equal norms: the plain sum
    G = t([1, 1, 0], [-1, 1, 0])
    assert torch.allclose(aligned_mtl(G), G.sum(0))
    # rotated orthogonal rows with norms 3 and 4: alpha = (1, 3/4)
    c, s = math.cos(0.3), math.sin(0.3)
    G = t([3 * c, 3 * s], [-4 * s, 4 * c])
    assert torch.allclose(aligned_mtl(G), G[0] + 0.75 * G[1], atol=1e-5)
    # duplicated task: rank 1, B = [[.5,.5],[.5,.5]], alpha = (1,1) -> the sum
    G = t([1, 2], [1, 2])
    assert torch.allclose(aligned_mtl(G), G.sum(0), atol=1e-6)
    # exactly opposite tasks cancel
    assert torch.allclose(aligned_mtl(t([1, 2], [-1, -2])), torch.zeros(2), atol=1e-6)
    assert torch.equal(aligned_mtl(torch.zeros(2, 3)), torch.zeros(3))


def test_aligned_mtl_is_the_procrustes_solution():
    # B G = s_min U V^T (G = U S V^T), so the direction is s_min * (U V^T).sum(0), via SVD instead of eigh
    G = t([1, 0, 0.3], [1, 1, 0], [0.2, -0.5, 2])
    u, s, vh = torch.linalg.svd(G.double(), full_matrices=False)
    expected = s.min() * (u @ vh).sum(0)
    assert torch.allclose(aligned_mtl(G).double(), expected, atol=1e-5)


# --- MGDA and IMTL-G ----------------------------------------------------------------------------


def _simplex_grid(k: int, n: int = 200) -> np.ndarray:
    """Points of the simplex of 2 or 3 weights, step 1/n."""
    if k == 2:
        return np.array([(i / n, 1 - i / n) for i in range(n + 1)])
    return np.array([(i / n, j / n, 1 - (i + j) / n) for i in range(n + 1) for j in range(n + 1 - i)])


@pytest.mark.parametrize(
    "rows",
    [
        ([2, 0], [-1, 1]),  # a conflicting pair: the min-norm point is inside the segment
        ([1, 0, 0.5], [-0.8, 1, 0], [0.2, -0.9, 1]),
        ([1, 1, 0], [2, 2.5, 0], [0.5, 0.4, 0.1]),  # one row near the others' hull: a vertex or an edge
    ],
)
def test_mgda_is_the_min_norm_point_of_the_hull(rows):
    G = t(*rows)
    k = G.shape[0]
    d = mgda(G).double() / k  # the convex combination
    norms = np.linalg.norm(_simplex_grid(k) @ G.double().numpy(), axis=1)
    assert float(d.norm()) <= norms.min() + 1e-6  # float32 gradients
    assert float(d.norm()) == pytest.approx(norms.min(), abs=5e-3)  # the grid's step
    assert (G.double() @ d >= (d @ d) - 1e-6).all()  # no task's loss rises along d


def test_mgda_by_hand():
    # two tasks: w1 = clip((g2 - g1) . g2 / |g1 - g2|^2, 0, 1); (2,0), (-1,1): w1 = 4/10 -> d = (0.2, 0.6)
    assert torch.allclose(mgda(t([2, 0], [-1, 1])), 2 * torch.tensor([0.2, 0.6]), atol=1e-6)
    for G in (t([1, 1, 0], [-1, 1, 0]), t([1, 2], [1, 2])):  # orthogonal equal norms; identical
        assert torch.allclose(mgda(G), G.sum(0), atol=1e-6)
    assert torch.allclose(mgda(t([1, 2], [-1, -2])), torch.zeros(2), atol=1e-6)  # Pareto-stationary
    assert torch.equal(mgda(torch.zeros(2, 3)), torch.zeros(3))


@pytest.mark.parametrize(
    "rows",
    [([2, 0], [-1, 1]), ([1, 0, 0.5], [-0.8, 1, 0], [0.2, -0.9, 1]), ([10, 0, 0], [0, 0.1, 0], [1, 1, 1])],
)
def test_imtl_g_projects_equally_on_every_task(rows):
    G = t(*rows).double()
    d = imtl_g(G)
    units = G / G.norm(dim=1, keepdim=True)
    projections = units @ d
    assert torch.allclose(projections, projections[0].expand_as(projections), rtol=1e-9)
    alpha = torch.linalg.lstsq(G.T, d / G.shape[0]).solution  # d / K is a combination whose weights sum to 1
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-9)


def test_imtl_g_by_hand():
    for G in (t([1, 1, 0], [-1, 1, 0]), t([1, 2], [1, 2])):  # orthogonal equal norms; identical
        assert torch.allclose(imtl_g(G), G.sum(0), atol=1e-6)
    # orthogonal, norms 2 and 1: equal projections need alpha = (1/3, 2/3): d / K = (2/3, 2/3)
    assert torch.allclose(imtl_g(t([2, 0], [0, 1])), 2 * torch.tensor([2 / 3, 2 / 3]), atol=1e-6)
    assert torch.equal(imtl_g(t([3, 4])), t([3, 4])[0])


def test_surgery_registry():
    assert set(SURGERY) == {"pcgrad", "cagrad", "aligned_mtl", "mgda", "imtl_g"}
    G = t([1, 0], [0, 1])  # no conflict, equal norms: the sum, (1, 1)
    for name in ("pcgrad", "aligned_mtl", "mgda", "imtl_g"):
        assert torch.allclose(SURGERY[name](G), torch.tensor([1.0, 1.0])), name
    # CAGrad: w = (.5,.5) so g_w = g0 and d = (1 + c) g0, times K / (1 + c^2)
    assert torch.allclose(SURGERY["cagrad"](G), torch.full((2,), 1.4 / 1.16), atol=1e-5)


# --- per-task gradients -------------------------------------------------------------------------


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = torch.nn.Linear(3, 4)
        self.head_a = torch.nn.Linear(4, 1)
        self.head_b = torch.nn.Linear(4, 1)

    def losses(self, x, y, task):
        h = torch.tanh(self.shared(x))
        out_a, out_b = self.head_a(h).squeeze(1), self.head_b(h).squeeze(1)
        la = ((out_a - y)[task == 0] ** 2).mean()
        lb = ((out_b - y)[task == 1] ** 2).mean()
        return la, lb


def _batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen)
    y = torch.randn(6, generator=gen)
    task = torch.tensor([0, 1, 0, 1, 1, 0])
    return x, y, task


def test_per_task_grads_equals_separate_backward():
    model = _TwoHeads()
    params = list(model.parameters())
    x, y, task = _batch()
    G = per_task_grads(list(model.losses(x, y, task)), params)  # one forward for both tasks
    assert all(p.grad is None for p in params)  # p.grad is left alone
    assert G.shape == (2, sum(p.numel() for p in params)) and G.dtype == torch.float32
    for k in range(2):
        model.zero_grad(set_to_none=True)
        model.losses(x, y, task)[k].backward()
        expected = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        assert torch.allclose(G[k], expected, atol=1e-6)
    n_head_b = sum(p.numel() for p in model.head_b.parameters())
    assert torch.equal(G[0, -n_head_b:], torch.zeros(n_head_b))  # task a never reaches head b


def test_per_task_grads_constant_loss_gives_zero_row():
    model = _TwoHeads()
    params = list(model.parameters())
    x, y, task = _batch()
    la, _ = model.losses(x, y, task)
    G = per_task_grads([la, torch.tensor(0.0)], params)
    assert torch.equal(G[1], torch.zeros(G.shape[1]))
    assert G[0].abs().sum() > 0


def test_write_grad_round_trip_and_sets_not_adds():
    model = _TwoHeads()
    params = list(model.parameters())
    g = torch.arange(sum(p.numel() for p in params), dtype=torch.float32)
    write_grad(params, g)
    write_grad(params, g)  # a second write replaces, it does not accumulate
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in params]), g)
    g[0] = -99.0  # p.grad is not a view of g
    assert float(params[0].grad.reshape(-1)[0]) == 0.0
    with pytest.raises(ValueError):
        write_grad(params, g[:-1])


# --- balancers ----------------------------------------------------------------------------------


def test_equal_and_static_combine_exact():
    losses = torch.tensor([2.0, 3.0, float("nan")])
    present = torch.tensor([True, True, False])
    eq = make_balancer("equal", ["a", "b", "c"])
    assert float(eq.combine(losses, present)) == 5.0  # the absent task's NaN does not leak
    assert eq.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}
    st = make_balancer("static", ["a", "b", "c"], weights={"a": 0.5, "b": 2.0, "c": 10.0})
    assert float(st.combine(losses, present)) == 0.5 * 2 + 2.0 * 3
    assert float(st.combine(losses, torch.tensor([False, True, False]))) == 6.0
    assert st.weights() == {"a": 0.5, "b": 2.0, "c": 10.0}
    assert float(eq.combine(losses, torch.zeros(3, dtype=torch.bool))) == 0.0


def test_static_weights_errors():
    names = ["a", "b"]
    with pytest.raises(MultituneError, match="unknown task.*'z'"):
        make_balancer("static", names, weights={"a": 1.0, "b": 1.0, "z": 1.0})
    with pytest.raises(MultituneError, match="missing for task.*'b'"):
        make_balancer("static", names, weights={"a": 1.0})
    with pytest.raises(MultituneError, match="task 'b' must be a finite number >= 0; got -1"):
        make_balancer("static", names, weights={"a": 1.0, "b": -1.0})
    with pytest.raises(MultituneError, match="need a weight for every task"):
        make_balancer("static", names)


def test_make_balancer_errors():
    with pytest.raises(MultituneError, match="unknown loss balancer 'gradnorm'; valid balancers: equal, static"):
        make_balancer("gradnorm", ["a"])
    with pytest.raises(MultituneError, match="unknown option.*'tau'.*valid options: temperature, beta"):
        make_balancer("dwa", ["a", "b"], tau=1.0)
    with pytest.raises(MultituneError, match="dwa temperature must be a finite number > 0"):
        make_balancer("dwa", ["a", "b"], temperature=0)
    with pytest.raises(MultituneError, match="at least one task"):
        make_balancer("equal", [])
    assert set(BALANCERS) == {"equal", "static", "uncertainty", "dwa", "famo"}
    for name in BALANCERS:
        options = {"weights": {"a": 1.0}} if name == "static" else {}
        assert make_balancer(name, ["a"], **options).needs_task_grads is False


def test_uncertainty_down_weights_the_larger_loss():
    bal = make_balancer("uncertainty", ["a", "b"])
    params = list(bal.parameters())
    assert len(params) == 1 and params[0].shape == (2,)
    losses = torch.tensor([5.0, 0.5])  # task a's loss is always 10x task b's
    assert float(bal.combine(losses, ALL).detach()) == pytest.approx(5.5)  # s = 0: plain sum
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        bal.combine(losses, ALL).backward()
        opt.step()
    w = bal.weights()
    assert w["a"] < w["b"]
    # optimum of exp(-s) L + s/2 is exp(-s) = 1 / (2L)
    assert w["a"] == pytest.approx(1 / (2 * 5.0), rel=0.05)
    assert w["b"] == pytest.approx(1 / (2 * 0.5), rel=0.05)


def test_uncertainty_absent_task_gets_no_gradient():
    bal = make_balancer("uncertainty", ["a", "b"])
    bal.combine(torch.tensor([1.0, float("nan")]), torch.tensor([True, False])).backward()
    assert float(bal.log_vars.grad[1]) == 0.0 and float(bal.log_vars.grad[0]) == pytest.approx(-1.0 + 0.5)


def test_dwa_weights_by_hand():
    bal = make_balancer("dwa", ["a", "b"], temperature=2.0, beta=0.0)  # beta 0: raw step ratios
    assert bal.weights() == {"a": 1.0, "b": 1.0}
    bal.update(torch.tensor([1.0, 1.0]), ALL)
    assert bal.weights() == {"a": 1.0, "b": 1.0}  # one record is not enough
    bal.update(torch.tensor([0.5, 0.9]), ALL)
    ea, eb = math.exp(0.5 / 2), math.exp(0.9 / 2)
    w = bal.weights()
    assert w["a"] == pytest.approx(2 * ea / (ea + eb)) and w["b"] == pytest.approx(2 * eb / (ea + eb))
    assert w["b"] > w["a"] and sum(w.values()) == pytest.approx(2.0)
    assert float(bal.combine(torch.tensor([1.0, 2.0]), ALL)) == pytest.approx(w["a"] + 2 * w["b"], rel=1e-6)


def test_dwa_moving_average_and_absent_tasks():
    bal = make_balancer("dwa", ["a", "b", "c"])  # beta 0.9
    bal.update(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([True, True, True]))
    bal.update(torch.tensor([0.5, 0.9, 123.0]), torch.tensor([True, True, False]))
    assert bal.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}  # task c has one record only
    bal.update(torch.tensor([0.0, 0.0, 2.0]), torch.tensor([False, False, True]))
    # ratios: a 0.95/1, b 0.99/1, c (0.9 + 0.1 * 2)/1 = 1.1
    r = torch.tensor([0.95, 0.99, 1.1], dtype=torch.float64)
    expected = 3 * torch.softmax(r / 2.0, 0)
    assert list(bal.weights().values()) == pytest.approx(expected.tolist())
    assert sum(bal.weights().values()) == pytest.approx(3.0)


def _softmax_grad(xi, delta):
    z = torch.softmax(xi, 0)
    return z * (delta - (z * delta).sum())  # J_softmax^T delta


def test_famo_combine_gradient_weights():
    bal = make_balancer("famo", ["a", "b"])
    losses = torch.tensor([2.0, 1.0], requires_grad=True)
    bal.combine(losses, ALL).backward()
    # z = (.5,.5), D = (2,1), c = .25+.5: weights K * (z/D)/c = 2 * (1/3, 2/3)
    assert losses.grad.tolist() == pytest.approx([2 / 3, 4 / 3])
    losses.grad = None
    bal.combine(losses, torch.tensor([True, False])).backward()
    assert losses.grad.tolist() == pytest.approx([1.0, 0.0])


def test_famo_raises_the_weight_of_the_stalled_task():
    bal = make_balancer("famo", ["fast", "stalled"])
    assert list(bal.parameters()) == []  # the logits are not for the main optimizer
    bal.update(torch.tensor([2.0, 1.0]), ALL)
    assert bal.weights() == {"fast": 1.0, "stalled": 1.0}  # the first call only records
    for step in range(1, 60):
        bal.update(torch.tensor([2.0 * 0.95**step, 1.0]), ALL)
    w = bal.weights()
    assert w["stalled"] > w["fast"] + 0.5, w
    assert sum(w.values()) == pytest.approx(2.0)


def test_famo_update_matches_torch_adam():
    bal = make_balancer("famo", ["a", "b", "c"], w_lr=0.1, gamma=0.01)
    xi = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=0.1, weight_decay=0.01)
    series = [[3.0, 2.0, 1.0], [2.5, 1.9, 1.1], [2.0, 1.9, 0.9], [1.7, 1.5, 0.8], [1.6, 1.5, 0.85]]
    bal.update(torch.tensor(series[0]), torch.ones(3, dtype=torch.bool))
    for prev, curr in zip(series, series[1:], strict=False):
        bal.update(torch.tensor(curr), torch.ones(3, dtype=torch.bool))
        delta = torch.tensor(prev).log() - torch.tensor(curr).log()
        opt.zero_grad()
        xi.grad = _softmax_grad(xi.detach(), delta)
        opt.step()
        assert torch.allclose(bal.xi, xi.detach(), atol=1e-6)


def test_famo_state_dict_round_trip():
    a = make_balancer("famo", ["x", "y"])
    for step in range(8):
        a.update(torch.tensor([1.0 * 0.9**step, 1.0 - 0.01 * step]), ALL)
    b = make_balancer("famo", ["x", "y"])
    b.load_state_dict(a.state_dict())
    assert a.weights() == b.weights()
    nxt = torch.tensor([0.4, 0.9])
    a.update(nxt, ALL)
    b.update(nxt, ALL)
    assert torch.equal(a.xi, b.xi) and a.weights() == b.weights()
    assert {"xi", "exp_avg", "exp_avg_sq", "adam_steps", "prev_loss", "prev_seen"} <= set(a.state_dict())
