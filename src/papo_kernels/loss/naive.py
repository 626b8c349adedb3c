"""Torch reference of the policy loss: the spec the kernels are tested against.

Transcribes TRL 1.16 ``GRPOTrainer._compute_loss`` for one micro-batch, before gradient-accumulation scaling.
With ``r = exp(log_ratio)`` (per token, or per sequence as ``exp(masked mean log_ratio)`` for GSPO) and advantage
``A``, the per-token loss is

* ``grpo``/``bnpo``/``dr_grpo``/``dapo``/``luspo``: ``-min(min(r, delta) * A, clip(r, 1 - eps_low, 1 + eps_high) * A)``
* ``cispo``: ``-sg(min(r, eps_high)) * A * logp``
* ``sapo``: ``-4 sigmoid(tau (r - 1)) / tau * A``, ``tau = tau_pos if A > 0 else tau_neg``
* ``vespo``: ``-sg(phi) * A * logp`` with the gamma weight ``phi = exp(lambda + k ln w - lambda w)`` of the sequence
  ratio ``ln w = clamp(sum_t m_t clamp(logp - old, -20, 20) + sum_t clamp(ln is_ratio, ln 1e-8, 20), ln 1e-8, 20)``
  (``k, lambda`` by the sign of ``A``)

then times the off-policy mask (``A >= 0`` or the sequence's masked mean of ``sampling_logps - logp`` at most
``off_policy_mask_threshold``) and the high-entropy mask (entropy at or above the ``1 - top_entropy_quantile``
quantile of the batch's token entropies, TRL's fp32 ``torch.quantile``), times the vLLM importance-sampling weight
(not for ``vespo``, whose ``w`` holds it), plus ``beta * k3`` with ``k3 = exp(ref - logp) - (ref - logp) - 1``
(times ``r`` with ``use_bias_correction_kl``). The per-sequence masked sums are aggregated per ``loss_type`` (or
weighted by ``sequence_scale``), and the entropy bonus ``entropy_coef * mean entropy`` over the tokens the policy
term keeps is subtracted. Arithmetic runs in fp32, or fp64 for fp64 inputs. Packed sequences (``cu_seqlens``) are
the same sequences padded: the reference pads them and reads the per-token outputs back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._runtime import check_tensor, compute_dtype, require
from .config import VESPO_IS_RATIO_MIN, VESPO_LAMBDA_MIN, VESPO_LN_W_MAX, PolicyLossConfig, PolicyLossOutput
from .inputs import LossInputs, check_ids, check_logits_inputs, pad_tokens


def token_logps_and_entropy(
    logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(z / T)[id]`` and the entropy ``-sum p log p`` per token, fp32 (fp64 for fp64 logits).

    Args:
        logits: ``[B, T, V]`` (``logits[b, t]`` predicts ``completion_ids[b, t]``).
        completion_ids: ``[B, T]`` integer targets in ``[0, V)``.
        temperature: ``z = logits / temperature``.

    Returns:
        ``(logps[B, T], entropy[B, T])``, differentiable w.r.t. the logits.

    Examples:
        >>> import torch
        >>> from papo_kernels.loss import token_logps_and_entropy
        >>> logps, entropy = token_logps_and_entropy(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
        >>> logps, entropy  # uniform over 4 tokens: log(1/4) and log(4)
        (tensor([[-1.3863, -1.3863]]), tensor([[1.3863, 1.3863]]))
    """
    z = logits.to(compute_dtype(logits)) / temperature
    logp_all = z - torch.logsumexp(z, dim=-1, keepdim=True)
    logps = logp_all.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    # -inf logits have p = 0 and contribute nothing; keep their 0 * -inf (and its gradient) out of the sum
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    return logps, entropy


def loss_from_logps(
    per_token_logps: Tensor, entropy: Tensor, completion_mask: Tensor, advantages: Tensor, *,
    old_logps: Tensor | None = None, ref_logps: Tensor | None = None, importance_sampling_ratio: Tensor | None = None,
    sampling_logps: Tensor | None = None, num_items_in_batch: Tensor | float | None = None,
    sequence_scale: Tensor | None = None, cu_seqlens: Tensor | None = None,
    config: PolicyLossConfig = PolicyLossConfig(),  # noqa: B008 (frozen, immutable default)
) -> PolicyLossOutput:  # fmt: skip
    """The policy loss from per-token log-probs and entropies (both differentiable): the torch path of
    ``PAPOTrainer`` when the fused loss does not run, and the reference of the kernels. The keyword form of
    :func:`logps_loss`.

    Args:
        per_token_logps: ``[B, T]`` log-probs of the completion tokens under the policy.
        entropy: ``[B, T]`` the policy's entropy at each token.
        completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
            num_items_in_batch, sequence_scale, cu_seqlens: the fields of :class:`~papo_kernels.loss.LossInputs`.
        config: the hyper-parameters, :class:`~papo_kernels.PolicyLossConfig`.

    Returns:
        :class:`~papo_kernels.PolicyLossOutput` (the loss, per-token log-probs and entropies, TRL's metrics).

    Examples:
        >>> import torch
        >>> from papo_kernels import PolicyLossConfig
        >>> from papo_kernels.loss import loss_from_logps
        >>> logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
        >>> entropy, mask = torch.ones(2, 2), torch.tensor([[1, 1], [1, 0]])
        >>> out = loss_from_logps(logps, entropy, mask, torch.tensor([1.0, -1.0]), config=PolicyLossConfig("bnpo"))
        >>> out.loss.detach()  # on-policy: -sum A over the 3 tokens / 3
        tensor(-0.3333)
        >>> out.sequence_loss
        tensor([-2.,  1.])
    """
    inputs = LossInputs(
        completion_mask, advantages, old_logps, ref_logps, importance_sampling_ratio, sampling_logps,
        num_items_in_batch, sequence_scale, cu_seqlens,
    )  # fmt: skip
    return logps_loss(per_token_logps, entropy, inputs, config)


def logps_loss(per_token_logps: Tensor, entropy: Tensor, inputs: LossInputs, config: PolicyLossConfig):
    """:func:`loss_from_logps` on :class:`~papo_kernels.loss.LossInputs`."""
    check_tensor("per_token_logps", per_token_logps, ndim=2, floating=True)
    check_tensor("entropy", entropy, ndim=2, floating=True)
    require(
        entropy.shape == per_token_logps.shape,
        f"`entropy` must have shape {tuple(per_token_logps.shape)}, got {tuple(entropy.shape)}",
    )
    inputs.check_tokens("per_token_logps", per_token_logps.shape)
    inputs.check_config(config.beta)
    if inputs.packed:  # the same sequences padded (see LossInputs); the per-token outputs read back
        padded, index = inputs.padded()
        pad = lambda x: pad_tokens(x, index, padded.shape)  # noqa: E731
        out = logps_loss(pad(per_token_logps), pad(entropy), padded, config)
        unpad = lambda x: x.reshape(-1)[index].view(inputs.shape)  # noqa: E731
        return out._replace(per_token_logps=unpad(out.per_token_logps), entropy=unpad(out.entropy))
    completion_mask, advantages = inputs.completion_mask, inputs.advantages
    old_logps, ref_logps, sampling_logps = inputs.old_logps, inputs.ref_logps, inputs.sampling_logps
    importance_sampling_ratio, sequence_scale = inputs.importance_sampling_ratio, inputs.sequence_scale
    num_items_in_batch = inputs.num_items_in_batch
    dtype = compute_dtype(per_token_logps)
    logps = per_token_logps.to(dtype)
    mask = completion_mask.to(dtype)
    adv = advantages.to(dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    B = logps.shape[0]

    old = logps.detach() if old_logps is None else old_logps.to(dtype)
    entropy = entropy.to(dtype)
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy.detach(), completion_mask, 1 - config.top_entropy_quantile)
    log_ratio = logps - old
    tokens = mask.sum(-1)
    if config.importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / tokens.clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)

    kl = None
    if config.beta != 0.0:
        d = ref_logps.to(dtype) - logps
        kl = torch.exp(d) - d - 1
        if config.use_bias_correction_kl:
            kl = kl * coef_1

    eps_low, eps_high = config.epsilon_low, config.eps_high
    if config.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * logps
    elif config.loss_type == "sapo":
        tau = torch.where(adv > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        per_token_loss = -(torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau) * adv
    elif config.loss_type == "vespo":
        phi = gamma_weights(adv, log_ratio, mask, importance_sampling_ratio, config)
        per_token_loss = -phi * adv * logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if config.delta is not None:
            coef_1 = torch.clamp(coef_1, max=config.delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    if config.off_policy_mask_threshold is not None:
        sampling = old if sampling_logps is None else sampling_logps.to(dtype)
        per_token_loss = per_token_loss * off_policy_mask(adv, logps, sampling, mask, config.off_policy_mask_threshold)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and config.loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio.to(dtype)
    if kl is not None:
        per_token_loss = per_token_loss + config.beta * kl

    sequence_loss = (per_token_loss * mask).sum(-1)
    count = mask.sum()
    if sequence_scale is not None:
        loss = (sequence_scale.to(dtype).detach() * sequence_loss).sum()
    elif config.loss_type in ("grpo", "sapo"):
        loss = (sequence_loss / tokens.clamp(min=1.0)).mean()
    elif config.loss_type == "bnpo":
        loss = sequence_loss.sum() / count.clamp(min=1.0)
    elif config.loss_type == "dr_grpo":
        loss = sequence_loss.sum() / (B * config.max_completion_length)
    elif config.loss_type in ("dapo", "cispo", "vespo"):
        normalizer = count.clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        loss = sequence_loss.sum() / torch.as_tensor(normalizer, dtype=dtype, device=sequence_loss.device)
    else:  # luspo
        loss = sequence_loss.mean()
    policy = loss.detach()

    entropy_mean = (entropy * mask).sum() / count.clamp(min=1.0)
    bonus_mask = mask if entropy_mask is None else mask * entropy_mask
    bonus_sum, bonus_count = (entropy * bonus_mask).sum(), bonus_mask.sum()
    if config.entropy_coef != 0.0:
        loss = loss - config.entropy_coef * (bonus_sum / bonus_count.clamp(min=1.0))

    def masked_mean(x: torch.Tensor) -> torch.Tensor:  # TRL's global_masked_mean of a clip flag, on this process
        if x.shape[1] == 1:  # one value per sequence (sequence-level ratio and [B] advantages): mean over B
            return (x * mask if mask.shape[1] == 1 else x).sum() / max(B, 1)
        return (x * mask).sum() / count.clamp(min=1.0)

    def sequence_mean(x: torch.Tensor) -> torch.Tensor:  # TRL's masked_seq_mean of a clip flag
        if x.shape[1] == 1:
            return (x * mask if mask.shape[1] == 1 else x).squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    metrics = {"entropy": entropy_mean.detach()}
    sequence_clip_ratio = None
    if kl is not None:
        metrics["kl"] = (kl.detach() * mask).sum() / count.clamp(min=1.0)
    if config.clipped:
        low = ((coef_1 < 1 - eps_low) & (adv < 0)).to(dtype).detach()
        high = ((coef_1 > 1 + eps_high) & (adv > 0)).to(dtype).detach()
        metrics["clip_ratio/low_mean"] = masked_mean(low)
        metrics["clip_ratio/high_mean"] = masked_mean(high)
        metrics["clip_ratio/region_mean"] = masked_mean(torch.maximum(low, high))
        sequence_clip_ratio = torch.stack([sequence_mean(low), sequence_mean(high)], dim=-1)
    elif config.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = masked_mean(((coef_1 > eps_high) & (adv > 0)).to(dtype).detach())
    elif config.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = masked_mean(phi)
    metrics["policy_loss"] = policy

    keep = mask > 0
    return PolicyLossOutput(
        loss=loss,
        per_token_logps=torch.where(keep, logps.detach(), 0.0),
        entropy=torch.where(keep, entropy.detach(), 0.0),
        metrics=metrics,
        sequence_loss=sequence_loss.detach(),
        entropy_stats=torch.stack([bonus_sum, bonus_count]).detach(),
        sequence_clip_ratio=sequence_clip_ratio,
    )


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """Tokens whose entropy is at or above the ``q`` quantile of the unmasked entropies (fp32, linear
    interpolation, as ``torch.quantile``); none when no token is unmasked."""
    local = entropy[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.bool)
    threshold = torch.quantile(local, q)
    return (entropy * mask.float() >= threshold) & mask.bool()


def off_policy_mask(adv, logps, sampling_logps, mask, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask: keep unless ``A < 0`` and the sequence's masked mean of
    ``sampling_logps - logp`` (NaN counted as 0) exceeds ``threshold``. Detached; shaped like ``adv``."""
    kl = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (mean_kl <= threshold)).to(mask.dtype)


@torch.no_grad()
def gamma_weights(adv, log_ratio, mask, importance_sampling_ratio, cfg: PolicyLossConfig) -> torch.Tensor:
    """VESPO's detached gamma weight ``phi(w) = exp(lambda + k ln w - lambda w)`` of the sequence ratio ``w``
    (every IS-ratio entry counts, masked or not, as in TRL); ``k`` and ``lambda`` (fp32, ``lambda >= 1e-4``) by the
    sign of the advantage; non-finite weights are 0."""
    low, high = math.log(VESPO_IS_RATIO_MIN), VESPO_LN_W_MAX
    ln_w = (torch.clamp(log_ratio, -high, high) * mask).sum(-1, keepdim=True)
    if importance_sampling_ratio is not None:
        ln_w = ln_w + torch.clamp(torch.log(importance_sampling_ratio), low, high).sum(-1, keepdim=True)
    ln_w = torch.clamp(ln_w, low, high)
    nonneg = adv >= 0
    k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=VESPO_LAMBDA_MIN)
    return torch.exp(lam + k * ln_w - lam * torch.exp(ln_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def naive_policy_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    config: PolicyLossConfig = PolicyLossConfig(),  # noqa: B008
    **kwargs,
) -> PolicyLossOutput:
    """The reference of :func:`~papo_kernels.policy_loss`: :func:`loss_from_logps` on the log-probs and entropies
    of ``logits[B, T, V]`` (:func:`token_logps_and_entropy`), differentiable w.r.t. the logits.

    Args:
        logits: ``[B, T, V]``; ``logits[b, t]`` predicts ``completion_ids[b, t]``.
        completion_ids, completion_mask, advantages: as for :func:`~papo_kernels.policy_loss`.
        config: the hyper-parameters (``config.temperature`` divides the logits).
        **kwargs: the optional fields of :class:`~papo_kernels.loss.LossInputs` (``old_logps``, ``ref_logps``, ...).

    Returns:
        :class:`~papo_kernels.PolicyLossOutput`, as :func:`~papo_kernels.policy_loss` returns it.

    Examples:
        >>> import torch
        >>> from papo_kernels.loss import naive_policy_loss
        >>> logits = torch.zeros(1, 2, 4, requires_grad=True)
        >>> out = naive_policy_loss(logits, torch.tensor([[0, 3]]), torch.ones(1, 2), torch.tensor([2.0]))
        >>> out.loss.backward()
        >>> logits.grad[0, 0]  # dapo: -A * d logp / dz / 2 tokens
        tensor([-0.7500,  0.2500,  0.2500,  0.2500])
    """
    return naive_logits_loss(logits, completion_ids, LossInputs(completion_mask, advantages, **kwargs), config)


def naive_logits_loss(logits: Tensor, completion_ids: Tensor, inputs: LossInputs, config: PolicyLossConfig):
    """:func:`naive_policy_loss` on :class:`~papo_kernels.loss.LossInputs`."""
    check_logits_inputs(logits, completion_ids)
    inputs.check_tokens("logits", logits.shape[:2])
    live = inputs.completion_mask.to(completion_ids.device) != 0
    check_ids(completion_ids[live], logits.shape[-1])  # a masked token's id may be anything (-100, ...)
    ids = torch.where(live, completion_ids, 0)
    logps, entropy = token_logps_and_entropy(logits, ids, config.temperature)
    return logps_loss(logps, entropy, inputs, config)
