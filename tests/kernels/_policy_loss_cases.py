"""Shared policy-loss test cases: random inputs, a hypothesis strategy over the config space, and TRL itself as
the oracle (``GRPOTrainer._compute_loss`` run on a stand-in trainer, in fp64)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from hypothesis import strategies as st

from papo_kernels.loss import LOSS_TYPES, PolicyLossConfig

KW = ("old_logps", "ref_logps", "importance_sampling_ratio", "sampling_logps", "num_items_in_batch", "sequence_scale")
KW += ("cu_seqlens",)
VESPO = {"paper": (2.0, 3.0, 3.0, 2.0), "fp32-rounded": (0.7, 1.3, 1.5, 0.5), "sharp": (4.0, 0.9, 0.3, 1e-6)}


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
        **dict(zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                   VESPO[draw(st.sampled_from(sorted(VESPO)))], strict=True)),
        top_entropy_quantile=draw(st.sampled_from([1.0, 1.0, 0.6, 0.25, 0.0])),
        off_policy_mask_threshold=draw(st.sampled_from([None, None, 0.0, 0.05])),
    )  # fmt: skip


@st.composite
def input_options(draw) -> dict:
    return {
        "adv_2d": draw(st.booleans()),
        "off_policy": draw(st.booleans()),
        "is_ratio": draw(st.sampled_from([None, "token", "sequence"])),
        "num_items": draw(st.sampled_from([None, 7.0])),
        "sequence_scale": draw(st.booleans()) and draw(st.booleans()),
        "masked_row": draw(st.booleans()),
        "sampling": draw(st.booleans()),
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
    sampling=False,
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
    if sampling:  # the sampler's log-probs, with one token vLLM could not score (NaN)
        case["sampling_logps"] = logps + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
        case["sampling_logps"][0, 0] = float("nan")
    if num_items is not None and cfg.loss_type in ("dapo", "cispo", "vespo"):
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


def trl_logps_and_entropy(logits, ids, temperature):
    """Log-probs and entropies as TRL's torch path computes them (``selective_log_softmax``,
    ``entropy_from_logits``)."""
    logp_all = torch.log_softmax(logits / temperature, -1)
    return logp_all.gather(-1, ids[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def trl_compute_loss(per_token_logps, entropies, case: dict, cfg: PolicyLossConfig, adaptive: dict | None = None):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` on given log-probs/entropies; returns (loss, metrics, trainer).

    ``adaptive`` switches on adaptive entropy control with the given trainer state (``entropy_coef``,
    ``_last_world_entropy``, ``_entropy_window_stats``, ``sync_gradients``) and ``args`` fields (``entropy_target``...);
    ``cfg.entropy_coef`` is the static coefficient otherwise."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    mask = case["completion_mask"]
    B = mask.shape[0]
    adaptive = dict(adaptive or {})
    has_is = "importance_sampling_ratio" in case
    ident = lambda x, **_: x  # noqa: E731
    accel = SimpleNamespace(
        num_processes=1, gather=ident, gather_for_metrics=ident, reduce=ident, pad_across_processes=ident,
        sync_gradients=adaptive.pop("sync_gradients", True),
    )  # fmt: skip
    args = SimpleNamespace(
        use_bias_correction_kl=cfg.use_bias_correction_kl, delta=cfg.delta, steps_per_generation=1,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg, entropy_target=adaptive.pop("entropy_target", 0.2),
        entropy_coef_min=adaptive.pop("entropy_coef_min", 0.0), entropy_coef_max=adaptive.pop("entropy_coef_max", 1.0),
        entropy_coef_delta=adaptive.pop("entropy_coef_delta", 0.005),
    )  # fmt: skip
    metrics = {"train": defaultdict(list)}
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, entropies, None),
        top_entropy_quantile=cfg.top_entropy_quantile, off_policy_mask_threshold=cfg.off_policy_mask_threshold,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask, get_gamma_weights=GRPOTrainer.get_gamma_weights,
        beta=cfg.beta, importance_sampling_level=cfg.importance_sampling_level, args=args, loss_type=cfg.loss_type,
        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.eps_high,
        use_vllm=has_is, vllm_importance_sampling_correction=has_is, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=cfg.max_completion_length, accelerator=accel,
        _entropy_bonus_enabled=cfg.entropy_coef != 0.0 or bool(adaptive), use_adaptive_entropy=bool(adaptive),
        entropy_coef=cfg.entropy_coef, _last_world_entropy=float("inf"), _entropy_window_stats=None,
        _metrics=metrics, aux_loss_enabled=False,
    )  # fmt: skip
    trainer.__dict__.update(adaptive)
    trainer.get_high_entropy_mask = lambda *a: GRPOTrainer.get_high_entropy_mask(trainer, *a)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": case["completion_ids"], "completion_mask": mask, "advantages": case["advantages"],
    }  # fmt: skip
    for ours, theirs in (("old_logps", "old_per_token_logps"), ("ref_logps", "ref_per_token_logps"),
                         ("sampling_logps", "sampling_per_token_logps")):  # fmt: skip
        if ours in case:
            inputs[theirs] = case[ours]
    if has_is:
        inputs["importance_sampling_ratio"] = case["importance_sampling_ratio"]
    n = case.get("num_items_in_batch", mask.sum().item())
    inputs["num_items_in_batch"] = torch.tensor(float(n), dtype=per_token_logps.dtype)
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[0] for k, v in metrics["train"].items()}, trainer


def pack_case(case: dict, lengths: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """``case`` with sequence ``b`` cut to its first ``lengths[b]`` tokens, and the same sequences packed into one row
    (``cu_seqlens``): ``(packed case, keep)``, ``keep[B, T]`` the packed tokens. Beyond its length a sequence of the
    padded case gets mask 0, IS ratio 1 and advantage 0, as ``LossInputs.padded`` pads; per-sequence inputs are
    shared."""
    mask = case["completion_mask"]
    B, T = mask.shape
    keep = torch.arange(T, device=mask.device)[None, :] < lengths.to(mask.device)[:, None]
    case["completion_mask"] = mask * keep
    if case["advantages"].dim() == 2:
        case["advantages"] = case["advantages"] * keep
    isr = case.get("importance_sampling_ratio")
    if isr is not None and isr.shape[1] == T > 1:
        case["importance_sampling_ratio"] = torch.where(keep, isr, torch.ones_like(isr))
    packed = {}
    for name, value in case.items():
        per_token = isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (B, T)
        packed[name] = value[keep][None] if per_token and (T > 1 or name != "importance_sampling_ratio") else value
    cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = lengths.to(mask.device).cumsum(0)
    packed["cu_seqlens"] = cu
    return packed, keep
