"""Shared policy-loss test cases: random inputs, a hypothesis strategy over the config space, and TRL itself as
the oracle (``GRPOTrainer._compute_loss`` run on a stand-in trainer, in fp64)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from hypothesis import strategies as st

from papo_kernels.loss import LOSS_TYPES, PolicyLossConfig

KW = ("old_logps", "ref_logps", "importance_sampling_ratio", "num_items_in_batch", "sequence_scale")


@st.composite
def configs(draw, T: int = 8) -> PolicyLossConfig:
    loss_type = draw(st.sampled_from(LOSS_TYPES))
    eps_high = draw(st.sampled_from([None, 0.28] + ([5.0, 1.2] if loss_type == "cispo" else [])))
    return PolicyLossConfig(
        loss_type=loss_type,
        epsilon_low=draw(st.sampled_from([0.2, 0.1])),
        epsilon_high=eps_high,
        delta=draw(st.sampled_from([None, 1.4])),
        beta=draw(st.sampled_from([0.0, 0.04])),
        use_bias_correction_kl=draw(st.booleans()),
        importance_sampling_level=draw(st.sampled_from(["token", "sequence"])),
        temperature=draw(st.sampled_from([1.0, 0.7])),
        max_completion_length=T + 3,
        entropy_coef=draw(st.sampled_from([0.0, 0.01])),
        sapo_temperature_pos=draw(st.sampled_from([1.0, 0.8])),
        sapo_temperature_neg=1.05,
    )


@st.composite
def input_options(draw) -> dict:
    return {
        "adv_2d": draw(st.booleans()),
        "off_policy": draw(st.booleans()),
        "is_ratio": draw(st.sampled_from([None, "token", "sequence"])),
        "num_items": draw(st.sampled_from([None, 7.0])),
        "sequence_scale": draw(st.booleans()) and draw(st.booleans()),
        "masked_row": draw(st.booleans()),
    }


def make_case(
    seed: int,
    B: int,
    T: int,
    V: int,
    *,
    cfg: PolicyLossConfig,
    adv_2d=False,
    off_policy=True,
    is_ratio=None,
    num_items=None,
    sequence_scale=False,
    masked_row=False,
    dtype=torch.float64,
    device="cpu",
    scale=3.0,
) -> dict:
    """Random logits ``[B, T, V]`` and everything else; old/ref log-probs sit near the current ones so ratios
    straddle the clip range."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.int64)
    if masked_row and B > 1:
        mask[B - 1] = 0
    adv = torch.randn((B, T) if adv_2d else (B,), generator=g, dtype=torch.float64)
    logps = torch.log_softmax(logits / cfg.temperature, -1).gather(-1, ids[..., None]).squeeze(-1)
    case = {"logits": logits, "completion_ids": ids, "completion_mask": mask, "advantages": adv}
    if off_policy:
        case["old_logps"] = logps + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)
    if cfg.beta != 0.0:
        case["ref_logps"] = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    if is_ratio is not None:
        shape = (B, T) if is_ratio == "token" else (B, 1)
        case["importance_sampling_ratio"] = torch.rand(shape, generator=g, dtype=torch.float64) * 0.6 + 0.7
    if num_items is not None and cfg.loss_type in ("dapo", "cispo"):
        case["num_items_in_batch"] = num_items
    if sequence_scale:
        case["sequence_scale"] = torch.rand(B, generator=g, dtype=torch.float64)
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            case[k] = v.to(dtype) if v.is_floating_point() else v
    return case


def kwargs_of(case: dict) -> dict:
    return {k: case[k] for k in KW if k in case}


def trl_compute_loss(per_token_logps, entropies, case: dict, cfg: PolicyLossConfig):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` on given log-probs/entropies; returns (loss, metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    mask = case["completion_mask"]
    B = mask.shape[0]
    has_is = "importance_sampling_ratio" in case
    ident = lambda x, **_: x  # noqa: E731
    accel = SimpleNamespace(num_processes=1, gather=ident, gather_for_metrics=ident, reduce=ident, sync_gradients=True)
    args = SimpleNamespace(
        use_bias_correction_kl=cfg.use_bias_correction_kl, delta=cfg.delta, steps_per_generation=1,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
    )  # fmt: skip
    metrics = {"train": defaultdict(list)}
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, entropies, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, beta=cfg.beta,
        importance_sampling_level=cfg.importance_sampling_level, args=args, loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.eps_high,
        use_vllm=has_is, vllm_importance_sampling_correction=has_is, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=cfg.max_completion_length, accelerator=accel,
        _entropy_bonus_enabled=cfg.entropy_coef != 0.0, use_adaptive_entropy=False, entropy_coef=cfg.entropy_coef,
        _metrics=metrics, aux_loss_enabled=False,
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": case["completion_ids"], "completion_mask": mask, "advantages": case["advantages"],
    }  # fmt: skip
    if "old_logps" in case:
        inputs["old_per_token_logps"] = case["old_logps"]
    if "ref_logps" in case:
        inputs["ref_per_token_logps"] = case["ref_logps"]
    if has_is:
        inputs["importance_sampling_ratio"] = case["importance_sampling_ratio"]
    n = case.get("num_items_in_batch", mask.sum().item())
    inputs["num_items_in_batch"] = torch.tensor(float(n), dtype=per_token_logps.dtype)
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[0] for k, v in metrics["train"].items()}
