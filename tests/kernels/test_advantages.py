"""Fused group-advantage kernels vs the torch reference, TRL 1.16's formulas and PAPO's properties."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.peers import trl_normalize_then_sum, trl_sum_then_normalize
from papo_kernels import (
    dynamic_sampling_mask,
    gdpo_advantages,
    grpo_advantages,
    papo_advantages,
    pass_rate_buckets,
)
from papo_kernels.advantages import GRPO_EPS, PAPO_EPS
from papo_kernels.advantages.naive import naive_gdpo_advantages, naive_grpo_advantages, naive_papo_advantages


def _rewards(N, K, dtype, device, nan_frac=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(N, K, generator=g, dtype=torch.float64).round(decimals=1)
    r[torch.rand(N, K, generator=g) < nan_frac] = float("nan")
    return r.to(dtype).to(device)


def _assert_tuple_close(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.cpu(), y.cpu().to(x.dtype), equal_nan=True, **tol)


PAPO_DEFAULTS = dict(lambda_process=1.0, eps=PAPO_EPS, scale_by_std=True, process_norm="correct")
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-5, rtol=2e-5)}


@pytest.mark.parametrize("G", [1, 2, 3, 8, 13, 64])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grpo_gdpo_match_reference(G, K, dtype, device):
    r = _rewards(G * 7, K, dtype, device, seed=G * K)
    w = torch.linspace(0.5, 1.5, K, dtype=dtype, device=device)
    tol = TOL.get(dtype, TOL[torch.float32])
    for scale in ("group", "batch", "none"):
        _assert_tuple_close(
            grpo_advantages(r, G, weights=w, scale=scale),
            naive_grpo_advantages(r.cpu(), G, weights=w.cpu(), scale=scale, eps=GRPO_EPS),
            **tol,
        )
    ref = naive_gdpo_advantages(r.cpu(), G, weights=w.cpu(), eps=GRPO_EPS)
    _assert_tuple_close(gdpo_advantages(r, G, weights=w), ref, **tol)


@pytest.mark.parametrize("G", [1, 2, 5, 8, 16, 100])
@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("process_norm", ["correct", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_papo_matches_reference(G, scale_by_std, process_norm, dtype, device):
    g = torch.Generator().manual_seed(G)
    N = G * 9
    outcome = (torch.rand(N, generator=g) < 0.5).to(dtype)
    outcome[:G] = 1.0  # an all-correct group
    process = torch.rand(N, generator=g, dtype=dtype).round(decimals=1)
    process[torch.rand(N, generator=g) < 0.1] = float("nan")
    correct = outcome > 0
    args = dict(lambda_process=0.7, eps=PAPO_EPS, scale_by_std=scale_by_std, process_norm=process_norm)
    got = papo_advantages(outcome.to(device), process.to(device), correct.to(device), G, **args)
    _assert_tuple_close(got, naive_papo_advantages(outcome, process, correct, G, **args), **TOL[dtype])


def test_large_and_non_power_of_two_groups(device):
    for G in (1000, 1024):
        r = _rewards(2 * G, 2, torch.float32, device, seed=G)
        ref = naive_grpo_advantages(r.cpu(), G, weights=None, scale="batch", eps=GRPO_EPS)
        _assert_tuple_close(grpo_advantages(r, G, scale="batch"), ref, **TOL[torch.float32])
        o = (r[:, 0].nan_to_num() > 0).float()
        got = papo_advantages(o, r[:, 1], o, G)
        ref = naive_papo_advantages(o.cpu(), r[:, 1].cpu(), o.cpu(), G, **PAPO_DEFAULTS)
        _assert_tuple_close(got, ref, **TOL[torch.float32])


def test_sixteen_reward_columns(device):
    r = _rewards(8 * 5, 16, torch.float32, device, seed=16)
    w = torch.rand(16, generator=torch.Generator().manual_seed(0)).to(device)
    ref = naive_grpo_advantages(r.cpu(), 8, weights=w.cpu(), scale="group", eps=GRPO_EPS)
    _assert_tuple_close(grpo_advantages(r, 8, weights=w), ref, **TOL[torch.float32])
    ref = naive_gdpo_advantages(r.cpu(), 8, weights=w.cpu(), eps=GRPO_EPS)
    _assert_tuple_close(gdpo_advantages(r, 8, weights=w), ref, **TOL[torch.float32])


def test_worked_example(device):
    outcome = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0.0], device=device)
    process = torch.tensor([1, 1, 0.5, 0, 0, 0, 0, 0.0], device=device)
    out = papo_advantages(outcome, process, outcome > 0, 8, eps=1e-6)
    exp_out = torch.tensor([1.2076] * 3 + [-0.7246] * 5)
    exp_proc = torch.tensor([0.5774, 0.5774, -1.1547, 0, 0, 0, 0, 0])
    exp_total = torch.tensor([1.7850, 1.7850, 0.0529] + [-0.7246] * 5)
    torch.testing.assert_close(out.outcome.cpu(), exp_out, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.process.cpu(), exp_proc, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.total.cpu(), exp_total, atol=1e-4, rtol=0)
    assert out.process_active.tolist() == [True] and out.num_correct.tolist() == [3]


def test_gates_and_unscorable(device):
    nan = float("nan")
    # group 0: one correct -> no process signal; group 1: all correct and equal process -> std gate
    outcome = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1.0], device=device)
    process = torch.tensor([0.9, 1, 1, 1, 0.5, 0.5, 0.5, 0.5], device=device)
    out = papo_advantages(outcome, process, outcome > 0, 4)
    assert out.process.abs().sum() == 0 and not out.process_active.any()
    assert (out.outcome[4:] == 0).all()
    # a None (NaN) process score is left out of the statistics and gets A_proc = 0
    process = torch.tensor([1.0, nan, 0.5, 0.0], device=device)
    out = papo_advantages(torch.ones(4, device=device), process, torch.ones(4, device=device), 4)
    assert out.process[1] == 0 and out.process_active.item()
    torch.testing.assert_close(out.process_mean.cpu(), torch.tensor([0.5]))
    # GRPO: an unscorable row (all NaN) gets 0 and is left out of its group's statistics
    r = torch.tensor([[1.0, nan], [nan, nan], [0.0, 1.0], [0.0, 0.0]], device=device)
    got = grpo_advantages(r, 4)
    assert got.advantages[1] == 0
    torch.testing.assert_close(got.mean.cpu(), torch.tensor([2.0 / 3]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_equals_trl_formula(scale, device):
    r = _rewards(8 * 6, 3, torch.float64, device, nan_frac=0.3, seed=1)
    r[5] = float("nan")  # an unscorable row
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, device=device)
    tol = dict(atol=1e-7, rtol=1e-7)  # TRL's nanstd computes its Bessel factor count / (count - 1) in fp32
    torch.testing.assert_close(
        grpo_advantages(r, 8, weights=w, scale=scale).advantages.cpu(),
        trl_sum_then_normalize(r.cpu(), 8, w.cpu(), scale),
        **tol,
    )
    torch.testing.assert_close(
        gdpo_advantages(r, 8, weights=w).advantages.cpu(), trl_normalize_then_sum(r.cpu(), 8, w.cpu()), **tol
    )


groups = st.integers(2, 12).flatmap(
    lambda G: st.tuples(
        st.just(G),
        st.lists(st.sampled_from([0.0, 1.0]), min_size=G, max_size=G),
        st.lists(st.floats(0, 1, allow_nan=False).map(lambda x: round(x, 2)), min_size=G, max_size=G),
        st.permutations(list(range(G))),
    )
)


@given(groups)
def test_permuting_a_group_permutes_its_outputs(case):
    G, o, p, perm = case
    o, p = torch.tensor(o, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)
    perm = torch.tensor(perm)
    a = papo_advantages(o, p, o > 0, G)
    b = papo_advantages(o[perm], p[perm], o[perm] > 0, G)
    for x, y in ((a.total, b.total), (a.outcome, b.outcome), (a.process, b.process)):
        torch.testing.assert_close(x[perm], y)
    r = torch.stack([o, p], dim=1)
    torch.testing.assert_close(gdpo_advantages(r, G).advantages[perm], gdpo_advantages(r[perm], G).advantages)
    torch.testing.assert_close(grpo_advantages(r, G).advantages[perm], grpo_advantages(r[perm], G).advantages)


@given(groups)
def test_incorrect_responses_get_no_process_credit(case):
    G, o, p, _ = case
    o, p = torch.tensor(o), torch.tensor(p)
    out = papo_advantages(o, p, o > 0, G)
    assert (out.process[o == 0] == 0).all()
    if (o == 1).all():
        assert (out.outcome == 0).all()


@given(groups, st.floats(0.2, 20), st.floats(-5, 5))
def test_process_advantage_is_affine_invariant(case, a, b):
    G, o, p, _ = case
    o, p = torch.tensor(o, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)
    base = papo_advantages(o, p, o > 0, G)
    moved = papo_advantages(o, a * p + b, o > 0, G)
    std_c = base.process_std.nan_to_num(0.0).item()
    if std_c > 1e-3:  # away from the std > eps gate, only eps effects remain
        torch.testing.assert_close(moved.process, base.process, atol=1e-3, rtol=1e-3)


def test_dynamic_sampling_and_buckets(device):
    outcome = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0.0], device=device)
    assert dynamic_sampling_mask(outcome, 4).tolist() == [True, False, True]
    assert pass_rate_buckets(outcome > 0, 4).tolist() == [3, 0, 2]
    assert pass_rate_buckets(outcome, 3).tolist() == [3, 0, 1, 1]
    assert dynamic_sampling_mask(outcome, 1).tolist() == [False] * 12


def test_empty_batch(device):
    r = torch.empty(0, device=device)
    assert grpo_advantages(r, 4).advantages.numel() == 0
    assert papo_advantages(r, r, r, 4).total.numel() == 0


# value errors (inf, NaN) raise at once with validate=True on every device; without it, CUDA defers them to
# result.check() (test_advantages_hot_path.py)
BAD = [
    (lambda d: grpo_advantages(torch.zeros(6, device=d), 4), "not a multiple of the group size"),
    (lambda d: grpo_advantages(torch.zeros(8, device=d), 0), "`G` must be a positive integer"),
    (lambda d: grpo_advantages(torch.zeros(8, device=d), -2), "`G` must be a positive integer"),
    (lambda d: grpo_advantages(torch.zeros(8, 2, 2, device=d), 4), "`rewards` must have 1 or 2 dims"),
    (lambda d: grpo_advantages(torch.zeros(8, dtype=torch.long, device=d), 4), "`rewards` must be a floating"),
    (
        lambda d: grpo_advantages(torch.tensor([1.0, float("inf")], device=d), 2, validate=True),
        "`rewards` contains +-inf",
    ),
    (lambda d: grpo_advantages(torch.zeros(8, 2, device=d), 4, weights=torch.ones(3, device=d)), "`weights` has 3"),
    (lambda d: grpo_advantages(torch.zeros(8, device=d), 4, scale="prompt"), "`scale` must be"),
    (lambda d: gdpo_advantages(torch.zeros(8, device=d), 4, eps=-1.0), "`eps` must be"),
    (lambda d: grpo_advantages(torch.zeros(8, device=d), 4, eps=True), "`eps` must be a finite number >= 0, got True"),
    (
        lambda d: papo_advantages(*[torch.zeros(8, device=d)] * 3, 4, lambda_process=-1.0),
        "`lambda_process` must be a finite number >= 0, got -1.0",  # the rule PAPOConfig applies (test_config_ranges)
    ),
    (
        lambda d: papo_advantages(*[torch.zeros(8, device=d)] * 3, 4, lambda_process=True),
        "`lambda_process` must be a finite number >= 0, got True",
    ),
    (
        lambda d: papo_advantages(torch.zeros(8, device=d), torch.zeros(4, device=d), torch.zeros(8, device=d), 4),
        "`process` has shape",
    ),
    (
        lambda d: papo_advantages(
            torch.zeros(8, device=d), torch.zeros(8, dtype=torch.float64, device=d), torch.zeros(8, device=d), 4
        ),
        "`process` has dtype",
    ),
    (
        lambda d: papo_advantages(
            torch.zeros(8, device=d),
            torch.zeros(8, device=d),
            torch.full((8,), float("nan"), device=d),
            4,
            validate=True,
        ),
        "`correct` contains NaN",
    ),
    (
        lambda d: papo_advantages(
            torch.full((8,), float("nan"), device=d),
            torch.zeros(8, device=d),
            torch.zeros(8, device=d),
            4,
            validate=True,
        ),
        "`outcome` must be finite",
    ),
    (
        lambda d: papo_advantages(
            torch.zeros(8, device=d), torch.zeros(8, device=d), torch.zeros(8, device=d), 4, process_norm="none"
        ),
        "`process_norm` must be",
    ),
    (
        lambda d: dynamic_sampling_mask(torch.tensor([1.0, float("nan")], device=d), 2, validate=True),
        "`outcome` must be finite",
    ),
    (lambda d: pass_rate_buckets(torch.zeros(6, device=d), 4), "not a multiple of the group size"),
    (
        lambda d: pass_rate_buckets(torch.tensor([float("nan"), 1.0], device=d), 2, validate=True),
        "`correct` contains NaN",
    ),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_input_raises(call, message, device):
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("(", r"\(")):
        call(device)


def test_device_mismatch_raises():
    other = torch.zeros(4, device="meta")  # any second device: nothing is computed before the check
    with pytest.raises(ValueError, match="`process` is on meta"):
        papo_advantages(torch.zeros(4), other, torch.zeros(4), 4)
    with pytest.raises(ValueError, match="`weights` is on meta"):
        grpo_advantages(torch.zeros(4, 2), 4, weights=torch.zeros(2, device="meta"))


class _CountingKernel:
    """Counts ``kernel[grid](...)`` launches of a wrapped Triton kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_one_launch_per_call(monkeypatch, device):
    from papo_kernels.advantages import fused

    counters = {}
    for name in ("_grpo_kernel", "_gdpo_kernel", "_papo_kernel", "_group_count_kernel"):
        counters[name] = _CountingKernel(getattr(fused, name))
        monkeypatch.setattr(fused, name, counters[name])
    r = _rewards(8 * 300, 3, torch.float32, device)  # enough groups for several programs (CPU: the interpreter)
    o = (r[:, 0].nan_to_num() > 0).float()
    grpo_advantages(r, 8, scale="batch", validate=False)
    gdpo_advantages(r, 8, validate=False)
    papo_advantages(o, r[:, 1], o, 8, validate=False)
    dynamic_sampling_mask(o, 8, validate=False)
    pass_rate_buckets(o, 8, validate=False)
    assert {k: c.launches for k, c in counters.items()} == {
        "_grpo_kernel": 1,
        "_gdpo_kernel": 1,
        "_papo_kernel": 1,
        "_group_count_kernel": 2,
    }
