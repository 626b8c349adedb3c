"""The torch reference (``papo_kernels.loss.naive``) against TRL 1.16's own ``_compute_loss``, in fp64."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from trl.trainer.utils import nanmax, nanmin

from papo_kernels import PolicyLossConfig, PolicyLossOutput
from papo_kernels.loss import loss_from_logps, naive_policy_loss, token_logps_and_entropy
from tests.kernels._policy_loss_cases import (
    configs,
    input_options,
    kwargs_of,
    make_case,
    trl_compute_loss,
    trl_logps_and_entropy,
)

B, T, V = 3, 6, 11


@given(cfg=configs(T=T), opts=input_options(), seed=st.integers(0, 2**16))
def test_reference_matches_trl(cfg, opts, seed):
    opts["sequence_scale"] = False  # not a TRL input
    case = make_case(seed, B, T, V, cfg=cfg, **opts)
    ours_logits = case["logits"].clone().requires_grad_()
    out = naive_policy_loss(
        ours_logits, case["completion_ids"], case["completion_mask"], case["advantages"],
        config=cfg, **kwargs_of(case),
    )  # fmt: skip
    out.loss.backward()

    trl_logits = case["logits"].clone().requires_grad_()
    logps, entropy = trl_logps_and_entropy(trl_logits, case["completion_ids"], cfg.temperature)
    trl_loss, trl_metrics, _ = trl_compute_loss(logps, entropy, case, cfg)
    trl_loss.backward()

    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours_logits.grad, trl_logits.grad, rtol=1e-10, atol=1e-13)
    if cfg.clipped:  # TRL's extreme per-sequence clip fractions, from ours per sequence
        low, high = out.sequence_clip_ratio.unbind(-1)
        assert nanmin(low).item() == pytest.approx(trl_metrics["clip_ratio/low_min"], rel=1e-6, nan_ok=True)
        assert nanmax(high).item() == pytest.approx(trl_metrics["clip_ratio/high_max"], rel=1e-6, nan_ok=True)
    else:
        assert out.sequence_clip_ratio is None
    for name, value in trl_metrics.items():
        if name in ("clip_ratio/low_min", "clip_ratio/high_max", "entropy_coef"):
            continue
        assert name in out.metrics, name
        assert out.metrics[name].item() == pytest.approx(value, rel=1e-6, abs=1e-9), name  # TRL: fp32 flags
    expected = {"entropy", "policy_loss"} | ({"kl"} if cfg.beta else set())
    assert expected <= set(out.metrics)
    mask = case["completion_mask"] > 0
    torch.testing.assert_close(out.per_token_logps, torch.where(mask, logps, 0.0).detach())
    torch.testing.assert_close(out.entropy, torch.where(mask, entropy, 0.0).detach())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_sequence_scale_reproduces_each_aggregation(loss_type):
    cfg = PolicyLossConfig(loss_type=loss_type, max_completion_length=T + 2, beta=0.1)
    case = make_case(5, B, T, V, cfg=cfg)
    logps, entropy = token_logps_and_entropy(case["logits"], case["completion_ids"])
    mask = case["completion_mask"].double()
    tokens = mask.sum(-1)
    scale = {
        "grpo": 1 / (B * tokens.clamp(min=1)),
        "bnpo": torch.full((B,), 1 / mask.sum().item(), dtype=torch.float64),
        "dr_grpo": torch.full((B,), 1 / (B * (T + 2)), dtype=torch.float64),
        "dapo": torch.full((B,), 1 / mask.sum().item(), dtype=torch.float64),
        "luspo": torch.full((B,), 1 / B, dtype=torch.float64),
    }[loss_type].double()
    args = (logps, entropy, case["completion_mask"], case["advantages"])
    plain = loss_from_logps(*args, config=cfg, **kwargs_of(case))
    scaled = loss_from_logps(*args, config=cfg, sequence_scale=scale, **kwargs_of(case))
    torch.testing.assert_close(scaled.loss, plain.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plain.sequence_loss @ scale, plain.loss, rtol=1e-12, atol=1e-14)


def test_entropy_bonus_and_policy_loss_metric():
    base = PolicyLossConfig(loss_type="grpo")
    case = make_case(1, B, T, V, cfg=base)
    logps, entropy = token_logps_and_entropy(case["logits"], case["completion_ids"])
    args = (logps, entropy, case["completion_mask"], case["advantages"])
    plain = loss_from_logps(*args, config=base, **kwargs_of(case))
    bonus = loss_from_logps(*args, config=dataclasses.replace(base, entropy_coef=0.5), **kwargs_of(case))
    mask = case["completion_mask"].double()
    mean_entropy = (entropy * mask).sum() / mask.sum()
    torch.testing.assert_close(bonus.loss, plain.loss - 0.5 * mean_entropy)
    torch.testing.assert_close(bonus.metrics["policy_loss"], plain.loss)
    torch.testing.assert_close(bonus.metrics["entropy"], mean_entropy)


def test_fully_masked_batch_is_finite_and_output_is_typed():
    cfg = PolicyLossConfig(loss_type="bnpo", entropy_coef=0.1)
    case = make_case(2, B, T, V, cfg=cfg)
    case["completion_mask"].zero_()
    logits = case["logits"].clone().requires_grad_()
    out = naive_policy_loss(logits, case["completion_ids"], case["completion_mask"], case["advantages"], config=cfg)
    assert isinstance(out, PolicyLossOutput)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    assert out.per_token_logps.abs().sum() == 0 and out.sequence_loss.abs().sum() == 0


def test_neg_inf_logits_give_finite_reference():
    logits = torch.randn(2, 3, 8, dtype=torch.float64)
    logits[..., 5:] = float("-inf")
    ids = torch.randint(0, 5, (2, 3))
    logits.requires_grad_()
    logps, entropy = token_logps_and_entropy(logits, ids)
    (logps.sum() + entropy.sum()).backward()
    assert torch.isfinite(logps).all() and torch.isfinite(entropy).all() and torch.isfinite(logits.grad).all()


def test_config_validation_and_trainer_args():
    with pytest.raises(ValueError, match="loss_type"):
        PolicyLossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        PolicyLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        PolicyLossConfig(importance_sampling_level="batch")
    with pytest.raises(ValueError, match="temperature"):
        PolicyLossConfig(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        PolicyLossConfig(beta=float("nan"))
    assert PolicyLossConfig().eps_high == 0.2 and PolicyLossConfig(epsilon_high=0.28).eps_high == 0.28

    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir="/tmp/papo-test", loss_type="dr_grpo", epsilon=0.1, epsilon_high=0.28, beta=0.01, delta=1.5,
        importance_sampling_level="sequence", temperature=0.9, max_completion_length=64, entropy_coef=0.02,
        use_bias_correction_kl=False, report_to=[], use_cpu=True, bf16=False,
    )  # fmt: skip
    cfg = PolicyLossConfig.from_trainer_args(args)
    assert cfg == PolicyLossConfig(
        loss_type="dr_grpo", epsilon_low=0.1, epsilon_high=0.28, delta=1.5, beta=0.01,
        importance_sampling_level="sequence", temperature=0.9, max_completion_length=64, entropy_coef=0.02,
    )  # fmt: skip


def test_input_validation():
    cfg = PolicyLossConfig(beta=0.1)
    case = make_case(3, B, T, V, cfg=PolicyLossConfig())
    logits, ids, mask, adv = (case[k] for k in ("logits", "completion_ids", "completion_mask", "advantages"))
    with pytest.raises(ValueError, match="ref_logps"):
        naive_policy_loss(logits, ids, mask, adv, config=cfg)
    with pytest.raises(ValueError, match="advantages"):
        naive_policy_loss(logits, ids, mask, adv[:-1])
    with pytest.raises(ValueError, match="importance_sampling_ratio"):
        naive_policy_loss(logits, ids, mask, adv, importance_sampling_ratio=torch.ones(B, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="completion_ids"):
        naive_policy_loss(logits, ids + V, mask, adv)
    with pytest.raises(ValueError, match="completion_mask"):
        naive_policy_loss(logits, ids, mask[:, :-1], adv)
