"""TRL 1.16's batch-wide loss options in the fused kernels (``vespo``, ``top_entropy_quantile``,
``off_policy_mask_threshold``, adaptive entropy control's statistics), against TRL's own ``_compute_loss``."""

import dataclasses

import pytest
import torch

from papo_kernels import PolicyLossConfig
from papo_kernels.loss import LOSS_TYPES, fused_linear_policy_loss, naive_policy_loss, policy_loss
from papo_kernels.loss import launch as launch_mod
from tests.kernels._policy_loss_cases import kwargs_of, make_case, trl_compute_loss, trl_logps_and_entropy
from tests.kernels.test_policy_loss import assert_outputs_close, run

B, T, V = 4, 7, 13
SKIP = ("clip_ratio/low_min", "clip_ratio/high_max", "entropy_coef")
OPTIONS = {
    "vespo": (dict(loss_type="vespo"), dict(is_ratio="token")),
    "vespo-sequence-2d": (
        dict(loss_type="vespo", importance_sampling_level="sequence", use_bias_correction_kl=True),
        dict(adv_2d=True, is_ratio="sequence"),
    ),
    "vespo-on-policy": (dict(loss_type="vespo", vespo_k_pos=0.7, vespo_lambda_neg=1e-6), dict(off_policy=False)),
    "vespo-no-is": (dict(loss_type="vespo", vespo_lambda_pos=1.3), {}),
    "quantile-0.2": (dict(top_entropy_quantile=0.2), {}),
    "quantile-0": (dict(loss_type="grpo", top_entropy_quantile=0.0), dict(adv_2d=True)),
    "quantile-0.9-sequence": (dict(top_entropy_quantile=0.9, importance_sampling_level="sequence"), {}),
    "off-policy": (dict(off_policy_mask_threshold=0.0), dict(sampling=True, adv_2d=True)),
    "off-policy-old": (dict(loss_type="grpo", off_policy_mask_threshold=0.02), {}),
    "off-policy-on-policy": (dict(loss_type="bnpo", off_policy_mask_threshold=-0.01), dict(off_policy=False)),
    "all": (
        dict(loss_type="vespo", importance_sampling_level="sequence", top_entropy_quantile=0.4,
             off_policy_mask_threshold=0.0, use_bias_correction_kl=True),
        dict(sampling=True, is_ratio="token", num_items=9.0),
    ),
}  # fmt: skip


def _config(**overrides) -> PolicyLossConfig:
    base = dict(loss_type="dapo", beta=0.04, entropy_coef=0.01, temperature=0.8, max_completion_length=T + 2)
    return PolicyLossConfig(**(base | overrides))


def _cpu(case: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def trl_run(case, cfg, adaptive=None):
    """TRL's loss, metrics and dlogits (fp64, through its torch log-softmax), and the stand-in trainer after it."""
    x = case["logits"].double().clone().requires_grad_()
    logps, entropy = trl_logps_and_entropy(x, case["completion_ids"], cfg.temperature)
    loss, metrics, trainer = trl_compute_loss(logps, entropy, case, cfg, adaptive)
    loss.backward()
    return loss, {k: v for k, v in metrics.items() if k not in SKIP}, x.grad, trainer


def assert_matches_trl(ours, grad, trl, rtol, atol):
    loss, metrics, trl_grad, _ = trl  # TRL ran on CPU copies of the case
    torch.testing.assert_close(ours.loss.double().cpu(), loss, rtol=rtol, atol=atol)
    scale = trl_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), trl_grad, rtol=rtol, atol=atol * scale)
    assert set(metrics) == set(ours.metrics)
    for k, v in metrics.items():  # TRL logs floats; its clip flags are fp32
        assert ours.metrics[k].item() == pytest.approx(v, rel=max(rtol, 1e-6), abs=atol), k


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_matches_trl_fp64(name, device):
    overrides, opts = OPTIONS[name]
    cfg = _config(**overrides)
    case = make_case(17, B, T, V, cfg=cfg, device=device, masked_row=True, **opts)
    ours, grad = run(policy_loss, case, cfg)
    trl = trl_run(_cpu(case), cfg)
    assert_matches_trl(ours, grad.cpu(), trl, rtol=1e-10, atol=1e-12)
    ref, ref_grad = run(naive_policy_loss, case, cfg)
    assert_outputs_close(ours, ref, grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_with_both_masks_fp64(loss_type, device):
    cfg = _config(loss_type=loss_type, top_entropy_quantile=0.5, off_policy_mask_threshold=0.0)
    case = make_case(18, B, T, V, cfg=cfg, device=device, sampling=True, is_ratio="token")
    ours, grad = run(policy_loss, case, cfg)
    trl = trl_run(_cpu(case), cfg)
    assert_matches_trl(ours, grad.cpu(), trl, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vespo-sequence-2d", "quantile-0.2", "off-policy", "all"])
def test_option_fp32_within_1e5_of_fp64(name, device, monkeypatch):
    """fp32 logits over several vocabulary blocks; the quantile's rank is fractional, so no token's entropy sits
    on the threshold (there fp32 and fp64 may legitimately disagree)."""
    monkeypatch.setattr(launch_mod, "MAX_BLOCK_V", 32)
    monkeypatch.setattr(launch_mod, "SMALL_BLOCK", 32)
    overrides, opts = OPTIONS[name]
    cfg = _config(**overrides)
    case = make_case(19, B, 9, 77, cfg=cfg, device=device, masked_row=True, **opts)
    n = int(case["completion_mask"].sum())
    assert (1 - cfg.top_entropy_quantile) * (n - 1) % 1 != 0 or cfg.top_entropy_quantile == 1.0
    case32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in case.items()}
    ours, grad = run(policy_loss, case32, cfg)
    assert grad.dtype == torch.float32
    trl = trl_run(_cpu(case), cfg)
    assert_matches_trl(ours, grad.cpu(), trl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 1 - 1e-9])
def test_entropy_quantile_with_ties_keeps_what_trl_keeps(q, device):
    """Rows repeated so entropies tie exactly, with the threshold landing on a tie: the kept tokens (the entropy
    statistics' count) and the loss are TRL's."""
    cfg = _config(loss_type="bnpo", top_entropy_quantile=q)
    case = make_case(20, B, T, V, cfg=cfg, device=device)
    case["logits"][:, 1::2] = case["logits"][:, :1]  # half the tokens share the first token's entropy
    ours, grad = run(policy_loss, case, cfg)
    trl = trl_run(_cpu(case), cfg)
    assert_matches_trl(ours, grad.cpu(), trl, rtol=1e-10, atol=1e-12)
    _, ent = trl_logps_and_entropy(case["logits"].cpu(), case["completion_ids"].cpu(), cfg.temperature)
    mask = case["completion_mask"].cpu() > 0
    threshold = torch.quantile(ent[mask].float(), 1 - q)
    kept = (ent >= threshold) & mask
    assert ours.entropy_stats[1].item() == kept.sum().item()
    torch.testing.assert_close(ours.entropy_stats[0].cpu(), (ent * kept).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 2500])
def test_quantile_kernel_is_torch_quantile(n, device):
    """The high-entropy threshold is bit for bit ``torch.quantile`` of the unmasked fp32 entropies (ties,
    fractional and whole ranks, one token, a NaN entropy), and +inf with no unmasked token."""
    g = torch.Generator().manual_seed(n)
    values = torch.randint(0, 50, (n,), generator=g).float() / 7  # ties
    mask = torch.rand(n, generator=g) < 0.8
    mask[0] = True
    for top in (0.0, 0.2, 0.37, 0.5, 1 - 1e-9, 1.0):
        expected = torch.quantile(values[mask], 1 - top)
        assert _threshold(values, mask, top, device).item() == expected.item(), top
    values[n // 2] = float("nan")
    mask[n // 2] = True
    assert torch.isnan(_threshold(values, mask, 0.2, device))
    assert _threshold(values, torch.zeros_like(mask), 0.2, device).item() == float("inf")


def _threshold(values, mask, top, device):
    from papo_kernels.loss.batch import _quantile_kernel
    from papo_kernels.loss.plan import params_tensor
    from papo_kernels.loss.terms import N_OUT, O_THRESHOLD

    params = params_tensor(PolicyLossConfig(top_entropy_quantile=top), torch.float64, device)
    keys = torch.where(mask, values, float("inf")).sort().values.to(device)
    out = torch.zeros(N_OUT, dtype=torch.float64, device=device)
    _quantile_kernel[(1,)](keys, mask.to(device=device, dtype=torch.uint8), out, params, values.numel(), BLOCK=256)
    return out[O_THRESHOLD.value].float().cpu()


def test_entropy_stats_are_trls_adaptive_window(device):
    """``entropy_stats`` are what TRL's adaptive entropy control accumulates, with and without the entropy mask,
    and the loss is TRL's with the coefficient the controller applies."""
    for q in (1.0, 0.3):
        cfg = _config(top_entropy_quantile=q, entropy_coef=0.05)
        case = make_case(22, B, T, V, cfg=cfg, device=device, masked_row=True)
        state = dict(entropy_coef=0.05, _last_world_entropy=0.1, entropy_target=0.5, sync_gradients=False)
        trl = trl_run(_cpu(case), cfg, state)
        ours, grad = run(policy_loss, case, cfg)
        assert_matches_trl(ours, grad.cpu(), trl, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.entropy_stats.cpu(), trl[3]._entropy_window_stats, rtol=1e-12, atol=0)


def test_fused_linear_head_with_every_option(device):
    """The chunked linear head runs the options in two phases; fp64 against TRL on the materialised logits."""
    cfg = _config(**OPTIONS["all"][0])
    case = make_case(23, B, T, V, cfg=cfg, device=device, **OPTIONS["all"][1])
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(V, 5, generator=g, dtype=torch.float64).to(device)
    case["logits"] = (h @ w.t()).detach()
    out = fused_linear_policy_loss(h, w, case["completion_ids"], case["completion_mask"], case["advantages"],
                                   config=cfg, chunk_size=5, **kwargs_of(case))  # fmt: skip
    out.loss.backward()
    loss, metrics, dlogits, _ = trl_run(_cpu(case), cfg)
    torch.testing.assert_close(out.loss.cpu(), loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h.grad.cpu(), dlogits @ w.cpu(), rtol=1e-10, atol=1e-12)
    assert out.metrics["vespo/phi_seq_mean"].item() == pytest.approx(metrics["vespo/phi_seq_mean"], rel=1e-10)


def test_option_validation():
    for kw, name in (
        (dict(top_entropy_quantile=1.5), "top_entropy_quantile"), (dict(top_entropy_quantile=-0.1), "top_entropy"),
        (dict(off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold"),
        (dict(vespo_k_pos=float("inf")), "vespo_k_pos"), (dict(vespo_lambda_neg="2"), "vespo_lambda_neg"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            PolicyLossConfig(**kw)
    cfg = _config(off_policy_mask_threshold=0.1)
    case = make_case(24, B, T, V, cfg=cfg)
    with pytest.raises(ValueError, match="sampling_logps"):
        policy_loss(case["logits"], case["completion_ids"], case["completion_mask"], case["advantages"], config=cfg,
                    ref_logps=case["ref_logps"], sampling_logps=torch.zeros(B, T + 1, dtype=torch.float64))  # fmt: skip
    assert dataclasses.replace(cfg, loss_type="vespo").two_phase and not _config().two_phase
