"""The two-pass design: the gradient is written during the forward (single phase: one launch of the row kernel
reads each live row for its statistics and again for its gradient), the backward only rescales it when the upstream
gradient is not the announced one, and masked rows are never read."""

import pytest
import torch

from papo_kernels import PolicyLossConfig, fused_linear_policy_loss, policy_loss
from papo_kernels.loss import launch, naive_policy_loss
from papo_kernels.loss.rows import _rows, _scale_rows
from tests.kernels._policy_loss_cases import kwargs_of, make_case
from tests.kernels.test_policy_loss import run

B, T, V = 3, 7, 40
DAPO = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
GSPO = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, entropy_coef=0.01)


@pytest.fixture
def launches():
    """The row and scale kernels' launches, as (kernel, STATS, GRAD) tuples."""
    seen = []
    _rows.add_pre_run_hook(lambda *a, **kw: seen.append(("rows", kw["STATS"], kw["GRAD"])))
    _scale_rows.add_pre_run_hook(lambda *a, **kw: seen.append(("scale", None, None)))
    yield seen
    _rows.pre_run_hooks.clear()
    _scale_rows.pre_run_hooks.clear()


def _loss(x, case, cfg, **kw):
    return policy_loss(x, case["completion_ids"], case["completion_mask"], case["advantages"], config=cfg,
                       **kwargs_of(case), **kw)  # fmt: skip


@pytest.mark.parametrize("cfg, forward", [(DAPO, [("rows", True, True)]),
                                          (GSPO, [("rows", True, False), ("rows", False, True)])])  # fmt: skip
def test_gradient_is_written_in_the_forward(cfg, forward, launches, device, monkeypatch):
    """Single phase: one launch of the row kernel in the forward; two phases: statistics then gradient. The in-place
    buffer holds the exact gradient once the forward returns; the backward is one launch that leaves it as is."""
    monkeypatch.setattr(launch, "MAX_BLOCK_V", 16)  # several blocks a row: the second pass runs in reverse
    monkeypatch.setattr(launch, "SMALL_BLOCK", 16)
    case = make_case(1, B, T, V, cfg=cfg, device=device, masked_row=True)
    _, expected = run(naive_policy_loss, case, cfg)
    buf = case["logits"].clone().requires_grad_()
    out = _loss(buf, case, cfg, inplace_grad=True)
    assert launches == forward
    torch.testing.assert_close(buf.detach(), expected, rtol=1e-10, atol=1e-12)
    written = buf.detach().clone()
    out.loss.backward()
    assert launches[len(forward) :] == [("scale", None, None)]
    assert torch.equal(buf.grad, written) and torch.equal(buf.detach(), written)
    assert torch.count_nonzero(written[B - 1]) == 0  # the masked row, never read, is zeros


@pytest.mark.parametrize("cfg", [DAPO, GSPO], ids=["single", "two-phase"])
def test_announced_and_other_upstream_gradients(cfg, device):
    """``grad_scale`` announces the upstream gradient (a float or a device tensor): the forward writes that
    gradient; any other upstream gradient is applied by the backward's rescaling pass."""
    case = make_case(2, B, T, V, cfg=cfg, device=device, dtype=torch.float32)
    _, expected = run(naive_policy_loss, case, cfg, logits=case["logits"].double())
    for announced, applied in ((0.25, 0.25), (torch.tensor(0.5, device=device), 0.5), (1.0, 3.0), (0.5, -2.0)):
        x = case["logits"].clone().requires_grad_()
        (_loss(x, case, cfg, grad_scale=announced).loss * applied).backward()
        torch.testing.assert_close(x.grad.double(), expected * applied, rtol=1e-5, atol=1e-6)


def test_no_gradient_needed_reads_once_and_keeps_the_logits(launches, device):
    case = make_case(3, B, T, V, cfg=DAPO, device=device)
    x = case["logits"].clone()
    with torch.no_grad():
        out = _loss(x, case, DAPO, inplace_grad=True)
    _loss(x, case, DAPO, inplace_grad=True)  # no tensor requires grad
    assert launches == [("rows", True, False)] * 2
    assert torch.equal(x, case["logits"])
    ref, _ = run(naive_policy_loss, case, DAPO)
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-10, atol=1e-12)


def test_padded_rows_are_never_read(device):
    """NaN in every padded row, in place and not: no NaN anywhere, padded gradient rows are zeros."""
    case = make_case(4, B, T, V, cfg=DAPO, device=device)
    pad = case["completion_mask"] == 0
    assert pad.any()
    case["logits"][pad] = float("nan")
    for inplace in (False, True):
        x = case["logits"].clone().requires_grad_()
        out = _loss(x, case, DAPO, inplace_grad=inplace)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
        assert torch.count_nonzero(x.grad[pad]) == 0


def test_fused_linear_chunk_is_one_row_launch(launches, device):
    """The linear head's single phase: one row-kernel launch per chunk computes its statistics and gradient; the
    backward is the scale kernel's check of the hidden-state gradient."""
    case = make_case(5, B, T, V, cfg=DAPO, device=device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(V, 6, generator=g, dtype=torch.float64).to(device)
    n = int(case["completion_mask"].sum())
    out = fused_linear_policy_loss(h, w, case["completion_ids"], case["completion_mask"], case["advantages"],
                                   config=DAPO, chunk_size=4, **kwargs_of(case))  # fmt: skip
    out.loss.backward()
    assert launches == [("rows", True, True)] * (-(-n // 4)) + [("scale", None, None)]


@pytest.mark.parametrize("bad", [0.0, float("nan"), "1", torch.ones(2)])
def test_bad_grad_scale_raises(bad, device):
    case = make_case(6, B, T, V, cfg=DAPO, device=device)
    with pytest.raises(ValueError, match="grad_scale"):
        _loss(case["logits"].clone().requires_grad_(), case, DAPO, grad_scale=bad)


def test_second_backward_raises(device):
    case = make_case(7, B, T, V, cfg=DAPO, device=device)
    out = _loss(case["logits"].clone().requires_grad_(), case, DAPO)
    out.loss.backward(retain_graph=True)
    with pytest.raises(ValueError, match="second backward"):
        out.loss.backward()


def test_programs_fit_the_l2_and_the_sms():
    """Rows in flight on an H100 (132 SMs, 50 MB of L2): one program per SM for the widest blocks, more for narrow
    rows while the L2 holds them; rows up to 262,144 logits take the one-warp tile."""
    assert launch.tile(100) == launch.tile(32000) == launch.tile(151936) == launch.tile(1 << 18) == (1024, 1)
    big = launch.tile((1 << 18) + 1)
    assert big == (8192, 16)
    h100 = (132, 50 << 20)
    assert launch.occupancy(10**6, big[1], 151936 * 2, *h100) == 132
    assert launch.occupancy(10**6, 4, 2048 * 2, *h100) == 132 * 4
    assert launch.occupancy(10**6, 4, 32000 * 2, *h100) == 132 * 3  # 0.6 * 50 MB over 64 KB rows
    assert launch.occupancy(10**6, 4, 32000 * 2 * 2, *h100) == 132  # out of place: twice the bytes a row
    assert launch.occupancy(5, big[1], 0, *h100) == 5
