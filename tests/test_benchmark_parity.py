"""The benchmarks' parity checks catch a missing term: a copy of the loss (the torch reference path) that drops the
policy gradient, the KL term or the entropy bonus passes nowhere it matters, and is flagged in the case where that
term is all there is. Also: the benchmarks' inputs keep the KL term and the clipping at their training size, and
the transcribed official PAPO loop is the specification."""

import gc
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark scripts import their siblings by name

import bench_advantages  # noqa: E402
import bench_fused_linear  # noqa: E402
import bench_policy_loss  # noqa: E402
import harness  # noqa: E402
from reference import NEAR, TERMS, term_rows  # noqa: E402

from papo_kernels.loss import naive_policy_loss  # noqa: E402

# a copy of the loss without one term: (config, advantages) -> (config, advantages)
DROP = {
    "policy_gradient": lambda config, adv: (config, adv * 0),
    "kl": lambda config, adv: (replace(config, beta=0.0), adv),
    "entropy_bonus": lambda config, adv: (replace(config, entropy_coef=0.0), adv),
}
ALONE = {"policy_gradient": "policy_gradient_only", "kl": "kl_only", "entropy_bonus": "entropy_bonus_only"}


def logits_loss(inp, config, drop=None):
    """The torch reference path on CPU (``naive_policy_loss``), with the term ``drop`` left out."""
    config, adv = DROP[drop](config, inp.adv) if drop else (config, inp.adv)
    leaf = inp.x.detach().clone().requires_grad_()
    loss = naive_policy_loss(leaf, inp.ids, inp.mask, adv, **inp.loss_kwargs(), config=config).loss
    return loss, torch.autograd.grad(loss, leaf)[0]


def linear_loss(inp, config, drop=None):
    """The same from hidden states and the head (fp32 logits ``h @ W^T``), gradients for both."""
    config, adv = DROP[drop](config, inp.adv) if drop else (config, inp.adv)
    h, w = inp.h.detach().float().requires_grad_(), inp.w.detach().float().requires_grad_()
    loss = naive_policy_loss(h @ w.t(), inp.ids, inp.mask, adv, **inp.loss_kwargs(), config=config).loss
    return (loss, *torch.autograd.grad(loss, (h, w)))


def copies(run):
    """``methods_of(inputs, config)`` for ``term_rows``: the intact loss and each copy without one term."""
    drops = {"intact": None, **{f"without_{t}": t for t in TERMS}}

    def methods_of(inp, config):
        return {name: (lambda d=d: lambda: run(inp, config, d), config, None) for name, d in drops.items()}

    return methods_of


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    yield lambda name: harness.Results(name)
    gc.unfreeze()  # Results freezes the objects alive when it starts


def linear_check(inp):
    """bench_fused_linear's check of its term rows (the looser tolerance: alone, the KL term feels bf16 logits)."""
    fl = bench_fused_linear
    return fl.parity_check(inp, tol_loss=fl.TERMS_TOL_LOSS, tol_grad=fl.TERMS_TOL_GRAD)


# benchmark -> (its module, its inputs at a tiny shape, a loss on them, its parity check of the term rows)
BENCHES = {
    "policy_loss": (bench_policy_loss, lambda: bench_policy_loss.make_inputs(512, 64, 0.25, "cpu", 16), logits_loss,
                    lambda inp: partial(bench_policy_loss.parity, inp.exact())),
    "fused_linear": (bench_fused_linear, lambda: bench_fused_linear.make_inputs(64, 32, 512, "cpu", 16), linear_loss,
                     linear_check),
}  # fmt: skip


@pytest.mark.parametrize("bench", list(BENCHES))
def test_parity_check_flags_each_dropped_term(bench, results):
    """Through the benchmark's own term rows and parity check: the intact loss passes every case, and the copy that
    drops a term fails the case where that term is alone (by far: the whole gradient is missing)."""
    module, make_inputs, run, check_of = BENCHES[bench]
    rows = results(f"{bench}_terms")
    methods = ("intact", *(f"without_{t}" for t in TERMS))
    term_rows(rows, make_inputs(), module.CFG, copies(run), check_of, methods, {"bench": bench})
    got = {(r["case"], r["method"]): r for r in rows.rows}
    assert len(got) == 4 * len(methods) and all(r["status"] == "ok" for r in got.values())
    assert all(got[(case, "intact")]["parity_ok"] for case in ("mixed", *ALONE.values())), rows.rows
    for term in TERMS:
        dropped = got[(ALONE[term], f"without_{term}")]
        grad = max(v for k, v in dropped.items() if k.startswith("rel_err_grad"))
        assert dropped["parity_ok"] is False and grad > 0.5, (term, dropped)
    assert got[("mixed", "without_policy_gradient")]["parity_ok"] is False  # it dominates the mixed case


def test_reference_and_old_logps_are_near_the_policys_own():
    """The k3 KL term and the clipping at their training size: both log-probs within a few NEAR of the policy's."""
    inp = bench_policy_loss.make_inputs(512, 64, 0.0, "cpu", 16)
    own = inp.exact().stats(1.0)[0].view(inp.ids.shape).float()
    for logps in (inp.ref, inp.old):
        gap = logps - own
        assert gap.abs().max() < 5 * NEAR and gap.std() == pytest.approx(NEAR, rel=0.3)
    ratio = (own - inp.old).exp()
    clipped = ((ratio < 1 - bench_policy_loss.CFG.epsilon_low) | (ratio > 1 + bench_policy_loss.CFG.eps_high)).float()
    assert 0 < clipped.mean() < 0.2


def test_official_papo_loop_is_the_specification():
    outcome = torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    process = torch.tensor([1.0, 1, 0.5, 0, 0, 0, 0, 0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.9])
    got = bench_advantages.official_papo_loop(outcome, process, outcome > 0, 8)
    expected = bench_advantages.reference_papo(outcome, process, outcome > 0, 8).total
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got[:4], torch.tensor([1.7850, 1.7850, 0.0529, -0.7246]), atol=1e-4)  # DESIGN.md's example
    o, p, c, _ = bench_advantages.make_inputs(64, 8, "cpu")
    assert harness.rel_err(bench_advantages.official_papo_loop(o, p, c, 8), bench_advantages.reference_papo(
        o.double(), p.double(), c, 8).total) < 1e-6  # fmt: skip
