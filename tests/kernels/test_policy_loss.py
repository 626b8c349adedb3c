"""The fused policy-loss kernels against the torch reference (itself checked against TRL in fp64)."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import papo_kernels
from papo_kernels import PolicyLossConfig
from papo_kernels.loss import launch as launch_mod
from papo_kernels.loss import naive_policy_loss, policy_loss, token_logps_and_entropy
from tests.kernels._policy_loss_cases import configs, input_options, kwargs_of, make_case

B, T, V = 3, 6, 11
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL = [(lt, lvl) for lt in papo_kernels.loss.LOSS_TYPES for lvl in ("token", "sequence")]


def run(fn, case, cfg, logits=None, **extra):
    x = (case["logits"] if logits is None else logits).clone().requires_grad_()
    out = fn(x, case["completion_ids"], case["completion_mask"], case["advantages"], config=cfg, **kwargs_of(case),
             **extra)  # fmt: skip
    out.loss.backward()
    return out, x.grad


def assert_outputs_close(a, b, grad_a, grad_b, rtol, atol):
    torch.testing.assert_close(a.loss, b.loss.to(a.loss.dtype), rtol=rtol, atol=atol)
    gscale = max(grad_b.abs().max().item(), 1e-30)
    torch.testing.assert_close(grad_a.to(grad_b.dtype), grad_b, rtol=rtol, atol=atol * gscale)
    assert set(a.metrics) == set(b.metrics)
    for k in b.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k].to(a.metrics[k].dtype), rtol=rtol, atol=atol, msg=k)
    for name in ("per_token_logps", "entropy", "sequence_loss"):
        ours, ref = getattr(a, name), getattr(b, name)
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=rtol, atol=atol * max(1.0, ref.abs().max().item()))
    assert (a.sequence_clip_ratio is None) == (b.sequence_clip_ratio is None)
    if b.sequence_clip_ratio is not None:  # fractions of a few tokens: exact up to the division's rounding
        ours, ref = a.sequence_clip_ratio, b.sequence_clip_ratio
        torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-6, atol=1e-7, equal_nan=True)


@given(cfg=configs(T=T), opts=input_options(), seed=st.integers(0, 2**16))
def test_kernel_matches_reference_fp64(cfg, opts, seed):
    case = make_case(seed, B, T, V, cfg=cfg, device=DEVICE, **opts)
    ours, g_ours = run(policy_loss, case, cfg)
    ref, g_ref = run(naive_policy_loss, case, cfg)
    assert_outputs_close(ours, ref, g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tile", ["narrow", "wide"])
@pytest.mark.parametrize("loss_type,level", ALL)
def test_fp32_matches_fp64_reference(loss_type, level, tile, device, monkeypatch):
    """fp32 logits: loss and dlogits within 1e-5 (relative) of TRL's formulas in fp64, several vocab blocks, with the
    one-warp tile (sums per block) and the wide tile (sums per lane)."""
    monkeypatch.setattr(launch_mod, "MAX_BLOCK_V", 32)
    monkeypatch.setattr(launch_mod, "SMALL_BLOCK", 32)
    if tile == "wide":
        monkeypatch.setattr(launch_mod, "SMALL_V", 0)
    cfg = PolicyLossConfig(
        loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.28 if loss_type != "cispo" else 1.3,
        beta=0.04, use_bias_correction_kl=level == "sequence", entropy_coef=0.01, temperature=0.8,
        max_completion_length=10, delta=1.4 if loss_type == "grpo" else None,
    )  # fmt: skip
    case = make_case(7, 4, 8, 77, cfg=cfg, adv_2d=level == "token", is_ratio="token", masked_row=True, device=device)
    case32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in case.items()}
    ours, g_ours = run(policy_loss, case32, cfg)
    ref, g_ref = run(naive_policy_loss, case, cfg, logits=case32["logits"].double())
    assert ours.loss.dtype == torch.float32 and ours.per_token_logps.dtype == torch.float32
    assert g_ours.dtype == torch.float32
    assert_outputs_close(ours, ref, g_ours, g_ref, rtol=1e-5, atol=1e-6)


def test_bf16_is_closer_to_fp64_than_eager_bf16(device):
    """Eager bf16 as TRL's torch branches compute it (``selective_log_softmax`` / ``entropy_from_logits``)."""
    from papo_kernels.loss import loss_from_logps

    def selective_log_softmax(x, ids):
        rows = zip(x, ids, strict=True)
        return torch.stack([torch.log_softmax(r, -1).gather(-1, i[:, None]).squeeze(-1) for r, i in rows])

    def entropy_from_logits(x):
        lp = torch.log_softmax(x, -1)
        return -(lp.exp() * lp).sum(-1)

    cfg = PolicyLossConfig(loss_type="grpo", entropy_coef=0.01, beta=0.04)
    case = make_case(11, 4, 16, 500, cfg=cfg, device=device, scale=4.0)
    x16 = case["logits"].bfloat16()
    ours, g_ours = run(policy_loss, case, cfg, logits=x16)
    ref, g_ref = run(naive_policy_loss, case, cfg, logits=x16.double())

    eager_x = x16.clone().requires_grad_()
    logps = selective_log_softmax(eager_x, case["completion_ids"])
    entropy = entropy_from_logits(eager_x)
    eager = loss_from_logps(logps, entropy, case["completion_mask"], case["advantages"], config=cfg, **kwargs_of(case))
    eager.loss.backward()

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    mask = case["completion_mask"] > 0
    assert err(ours.per_token_logps[mask], ref.per_token_logps[mask]) < err(logps[mask], ref.per_token_logps[mask])
    assert err(ours.entropy[mask], ref.entropy[mask]) < err(entropy[mask], ref.entropy[mask])
    assert err(g_ours, g_ref) < err(eager_x.grad, g_ref)
    assert err(ours.loss, ref.loss) <= err(eager.loss, ref.loss) + 1e-7
    assert g_ours.dtype == torch.bfloat16


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_rows_and_fully_masked_batch(level, device):
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level=level, beta=0.1, entropy_coef=0.1)
    case = make_case(3, B, T, V, cfg=cfg, device=device, masked_row=True)
    # garbage where masked must not leak: NaN logits and inputs on the masked row
    case["logits"][B - 1] = float("nan")
    case["old_logps"][B - 1] = float("nan")
    ours, g = run(policy_loss, case, cfg)
    assert torch.isfinite(ours.loss) and torch.isfinite(g).all()
    assert torch.count_nonzero(g[B - 1]) == 0
    case["completion_mask"].zero_()
    ours, g = run(policy_loss, case, cfg)
    assert ours.loss.item() == 0.0 and torch.count_nonzero(g) == 0
    assert all(torch.isfinite(v) for v in ours.metrics.values())


def test_extreme_and_neg_inf_logits(device, monkeypatch):
    monkeypatch.setattr(launch_mod, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(launch_mod, "SMALL_BLOCK", 16)
    cfg = PolicyLossConfig(loss_type="dapo", entropy_coef=0.05, beta=0.02)
    case = make_case(4, 2, 5, 50, cfg=cfg, device=device, scale=1e4)
    x = case["logits"].float()
    x[:, :, :16] = float("-inf")  # a whole -inf block first, then mixed blocks
    x[0, 0, 20:40] = float("-inf")
    case["completion_ids"].clamp_(min=40)
    logps, _ = token_logps_and_entropy(x.double(), case["completion_ids"])
    case["old_logps"] = logps + 0.1
    case["ref_logps"] = logps - 0.1
    for dtype in (torch.float32, torch.bfloat16):
        ours, g = run(policy_loss, case, cfg, logits=x.to(dtype))
        ref, g_ref = run(naive_policy_loss, case, cfg, logits=x.to(dtype).double())
        assert torch.isfinite(ours.loss) and torch.isfinite(g.float()).all()
        assert torch.isfinite(ours.entropy).all() and torch.isfinite(ours.per_token_logps).all()
        torch.testing.assert_close(ours.per_token_logps.double(), ref.per_token_logps, rtol=1e-5, atol=1e-3)
        assert torch.count_nonzero(g[:, :, :16]) == 0


@pytest.mark.parametrize("bad", [-1, V, 10**6])
def test_bad_ids_raise(bad, device):
    """An unmasked token's id outside [0, V): the kernels flag it without a host sync (``PolicyLossOutput.check``,
    at once off CUDA); the reference raises."""
    case = make_case(5, B, T, V, cfg=PolicyLossConfig(), device=device)
    case["completion_ids"][1, 2] = bad
    case["completion_mask"][1, 2] = 1
    for fn in (policy_loss, naive_policy_loss):
        with pytest.raises(ValueError, match="completion_ids"):
            out, _ = run(fn, case, PolicyLossConfig())
            out.check()  # CUDA: the flag is read here


def test_masked_ids_may_be_anything(device):
    """Padding ids such as -100 under the mask are never read: the same loss and gradient as with valid ids."""
    cfg = PolicyLossConfig(beta=0.04, entropy_coef=0.01)
    case = make_case(6, B, T, V, cfg=cfg, masked_row=True, device=device)
    padded = dict(case, completion_ids=case["completion_ids"].masked_fill(case["completion_mask"] == 0, -100))
    for fn in (policy_loss, naive_policy_loss):
        (ref, g_ref), (out, g_out) = run(fn, case, cfg), run(fn, padded, cfg)
        out.check()
        assert_outputs_close(out, ref, g_out, g_ref, rtol=0, atol=0)


def test_inplace_grad_and_strided_logits(device):
    cfg = PolicyLossConfig(loss_type="bnpo", entropy_coef=0.02)
    case = make_case(6, B, T, V, cfg=cfg, device=device, dtype=torch.float32)
    _, g = run(policy_loss, case, cfg)
    x = case["logits"].clone().requires_grad_()
    buf = x.detach().clone()
    out = policy_loss(buf.requires_grad_(), case["completion_ids"], case["completion_mask"], case["advantages"],
                      inplace_grad=True, config=cfg, **kwargs_of(case))  # fmt: skip
    out.loss.backward()
    torch.testing.assert_close(buf.detach(), g)  # the logits buffer now holds dlogits
    torch.testing.assert_close(buf.grad, g)
    # a sliced (non-contiguous) view, as a causal LM's logits[:, :-1] is
    full = torch.randn(B, T + 1, V + 5, device=device)[:, :-1, :V]
    full.copy_(case["logits"])
    _, g_view = run(policy_loss, case, cfg, logits=full)
    torch.testing.assert_close(g_view, g)


def test_num_items_and_sequence_scale_inputs(device):
    cfg = PolicyLossConfig(loss_type="dapo")
    case = make_case(8, B, T, V, cfg=cfg, device=device)
    for n in (5.0, torch.tensor(5.0, dtype=torch.float64, device=device)):
        ours, g = run(policy_loss, case, cfg, num_items_in_batch=n)
        ref, g_ref = run(naive_policy_loss, case, cfg, num_items_in_batch=5.0)
        assert_outputs_close(ours, ref, g, g_ref, rtol=1e-10, atol=1e-12)
    scale = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64, device=device)
    ours, g = run(policy_loss, case, cfg, sequence_scale=scale)
    torch.testing.assert_close(ours.loss, (ours.sequence_loss * scale).sum())
    assert torch.count_nonzero(g[1]) == 0


def test_long_sequence(device, monkeypatch):
    """One 1,100-token sequence: the sequence kernel loops over three token blocks, logits over vocab blocks."""
    monkeypatch.setattr(launch_mod, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(launch_mod, "SMALL_BLOCK", 16)
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.01, entropy_coef=0.01)
    case = make_case(9, 1, 1100, 20, cfg=cfg, device=device, dtype=torch.float32)
    ours, g = run(policy_loss, case, cfg)
    ref, g_ref = run(naive_policy_loss, case, cfg, logits=case["logits"].double())
    assert_outputs_close(ours, ref, g, g_ref, rtol=1e-5, atol=1e-6)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    import papo_kernels._runtime as rt
    from papo_kernels.loss import logits as logits_mod

    monkeypatch.setattr(rt, "INTERPRET", False)
    monkeypatch.setattr(logits_mod.PolicyLossFunction, "apply", lambda *a: pytest.fail("kernel path taken"))
    cfg = PolicyLossConfig()
    case = make_case(10, B, T, V, cfg=cfg)
    ours, g = run(policy_loss, case, cfg)
    ref, g_ref = run(naive_policy_loss, case, cfg)
    torch.testing.assert_close(ours.loss, ref.loss)
    torch.testing.assert_close(g, g_ref)


def test_public_exports():
    assert papo_kernels.policy_loss is policy_loss
    assert {"policy_loss", "PolicyLossConfig", "PolicyLossOutput"} <= set(papo_kernels.__all__)
    assert dataclasses.is_dataclass(PolicyLossConfig)


def test_loss_can_be_scaled_in_place(device):
    """Trainers divide the loss by the accumulation steps, sometimes in place: the output is no view."""
    from papo_kernels.loss import fused_linear_policy_loss

    cfg = PolicyLossConfig(loss_type="grpo")
    case = make_case(12, B, T, V, cfg=cfg, device=device)
    _, g = run(policy_loss, case, cfg)
    x = case["logits"].clone().requires_grad_()
    out = policy_loss(
        x, case["completion_ids"], case["completion_mask"], case["advantages"], config=cfg, **kwargs_of(case)
    )
    out.loss.div_(4).backward()
    torch.testing.assert_close(x.grad, g / 4)
    h = torch.randn(B, T, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(V, 4, dtype=torch.float64, device=device)
    fused = fused_linear_policy_loss(h, w, case["completion_ids"], case["completion_mask"], case["advantages"])
    fused.loss.mul_(2).backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["rows", "split"])
def test_no_host_sync_cuda(kernel):
    """On a GPU the loss from logits never synchronises with the host, forward or backward, with either kernel of
    the single-phase pass (the target ids' check is a flag the caller reads with ``check()``)."""
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
    case = make_case(8, 4, 64, 5000, cfg=cfg, device="cuda", dtype=torch.bfloat16)
    saved, launch_mod.ROW_KERNEL = launch_mod.ROW_KERNEL, kernel
    try:
        run(policy_loss, case, cfg)  # compiles, cached parameter tensors
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        try:
            out, _ = run(policy_loss, case, cfg)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    finally:
        launch_mod.ROW_KERNEL = saved
    out.check()
