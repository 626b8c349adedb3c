"""fp32 at scale: the fused kernels against TRL 1.16's formulas (``benchmarks/peers.py``) at N=262,144 and G=1024.

TRL's formulas are evaluated in fp64 on the same fp32 rewards, which gives their exact values. Run in fp32, as
TRL runs them, they miss those values by up to 4e-4 on these rewards: in a group of equal rewards with a NaN,
the fp32 mean is one ulp off the common value, and ``/ (std + 1e-4)`` multiplies that by 10^4. The kernels
accumulate in fp64 and stay within 1e-5.
"""

import pytest
import torch

from benchmarks.peers import trl_normalize_then_sum, trl_sum_then_normalize
from papo_kernels import gdpo_advantages, grpo_advantages, papo_advantages
from papo_kernels.advantages import PAPO_EPS, fused, naive

N = 262_144
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _few_programs_under_the_interpreter(monkeypatch, device):
    """The interpreter's cost is per program, not per element, and the arithmetic is per group and batch, not per
    tile: on CPU, 64k-response tiles (4 programs, still merged by the last one) keep each call to seconds."""
    if device == "cpu":
        monkeypatch.setattr(fused, "TILE", 65_536)


def _rewards(G, device):
    """The benchmark's rewards: a 0/1 outcome, a process score in steps of 0.1 (1% NaN), a uniform score."""
    g = torch.Generator().manual_seed(N + G)
    outcome = (torch.rand(N, generator=g) < 0.4).float()
    process = torch.rand(N, generator=g).round(decimals=1)
    r = torch.stack([outcome, process, torch.rand(N, generator=g)], dim=1)
    r[torch.rand(N, generator=g) < 0.01, 1] = float("nan")
    return r.to(device)


def test_batch_statistics_match_trl_at_262144(device):
    G = 4
    r = _rewards(G, device)
    exact = trl_normalize_then_sum(r.cpu().double(), G)
    assert (trl_normalize_then_sum(r.cpu(), G).double() - exact).abs().max() > 1e-4  # fp32 accumulation fails
    torch.testing.assert_close(gdpo_advantages(r, G).advantages.cpu().double(), exact, **TOL)
    exact = trl_sum_then_normalize(r.cpu().double(), G, scale="batch")
    got = grpo_advantages(r, G, scale="batch")
    torch.testing.assert_close(got.advantages.cpu().double(), exact, **TOL)
    torch.testing.assert_close(got.std.cpu().double(), naive.nanstd(r.cpu().double().nansum(dim=1)).expand(N // G),
                               **TOL)  # fmt: skip


def test_group_statistics_match_trl_at_G_1024(device):
    G = 1024
    r = _rewards(G, device)
    got = grpo_advantages(r, G)
    torch.testing.assert_close(got.advantages.cpu().double(), trl_sum_then_normalize(r.cpu().double(), G), **TOL)
    total = r.cpu().double().nansum(dim=1).view(-1, G)
    torch.testing.assert_close(got.mean.cpu().double(), total.mean(dim=1), **TOL)
    torch.testing.assert_close(got.std.cpu().double(), total.std(dim=1), **TOL)
    gdpo = gdpo_advantages(r, G)
    torch.testing.assert_close(gdpo.advantages.cpu().double(), trl_normalize_then_sum(r.cpu().double(), G), **TOL)
    per_column = r.cpu().double().view(-1, G, 3)
    torch.testing.assert_close(gdpo.mean.cpu().double(), per_column.nanmean(dim=1), **TOL)
    torch.testing.assert_close(gdpo.std.cpu().double(), naive.nanstd(per_column, dim=1), **TOL)
    o, p = r[:, 0], r[:, 1]
    defaults = dict(lambda_process=1.0, eps=PAPO_EPS, scale_by_std=True, process_norm="correct")
    ref = naive.naive_papo_advantages(o.cpu(), p.cpu(), o.cpu() > 0, G, **defaults)  # computed in fp64
    for x, y in zip(papo_advantages(o, p, o > 0, G), ref, strict=True):
        torch.testing.assert_close(x.cpu(), y, equal_nan=True, **TOL)
