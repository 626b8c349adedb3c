"""Peer implementations that our kernels are compared with (and tested against), TRL's and Liger's ways.

* ``trl_sum_then_normalize`` / ``trl_normalize_then_sum``: the advantage code of TRL 1.16's
  ``GRPOTrainer._generate_and_score_completions``, transcribed (TRL's own ``nanstd`` when TRL is installed).
* ``trl_eager_logps_entropy``: TRL 1.16's torch branches of ``selective_log_softmax`` (bf16: a loop over rows)
  and ``entropy_from_logits`` (chunks of 128 rows), transcribed; ``trl_kernel_logps_entropy``: TRL's Triton
  ``selective_log_softmax_and_entropy`` (padded rows skipped); ``trl_chunked_logps_entropy``: TRL's fused LM head
  (``ChunkedLogProbFunction`` on the unmasked tokens, as ``add_fused_lm_head`` calls it).
* ``liger_grpo_loss`` / ``liger_fused_linear_grpo_loss``: Liger-Kernel's loss from logits and from hidden states,
  keyword arguments filtered by the installed version's signature. Neither has an entropy term.
* ``cce_token_logps``: Apple's Cut Cross-Entropy (``cut-cross-entropy``), per-token log-probs from hidden states
  and the head, whose backward takes a weight per token: every term of the loss that is a function of the log-probs
  (policy gradient and KL), not the entropy.

Quack (``quack-kernels``) is not a peer: its CuTe DSL runtime (``nvidia-cutlass-dsl-libs-*``, about 92 MB a wheel)
does not fit the 64 MiB of wheels that travel to a GPU machine without network (benchmarks/fetch_wheels.sh).

TRL, Liger and CCE are imported on first use: this module imports with torch alone.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
import torch.nn.functional as F

try:
    from trl.trainer.utils import nanstd
except ImportError:  # torch-only environments: the identical reference
    from papo_kernels.advantages.naive import nanstd


def trl_sum_then_normalize(
    rewards_per_func: torch.Tensor, G: int, weights: torch.Tensor | None = None, scale: str = "group"
) -> torch.Tensor:
    """TRL 1.16, ``multi_objective_aggregation="sum_then_normalize"``."""
    if weights is None:
        weights = torch.ones(rewards_per_func.shape[1], dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ["group", "none"]:
        if G > 1:
            std_rewards = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_normalize_then_sum(rewards_per_func: torch.Tensor, G: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """TRL 1.16, ``multi_objective_aggregation="normalize_then_sum"`` (GDPO)."""
    K = rewards_per_func.shape[1]
    if weights is None:
        weights = torch.ones(K, dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    grouped = rewards_per_func.view(-1, G, K)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, K)
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_eager_logps_entropy(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16 ``selective_log_softmax`` and ``entropy_from_logits``, torch branches (bf16: per-row loop)."""
    rows = zip(logits, ids, strict=True)
    logps = torch.stack([F.log_softmax(row, -1).gather(-1, i.unsqueeze(-1)).squeeze(-1) for row, i in rows])
    entropy = []
    for chunk in logits.reshape(-1, logits.shape[-1]).split(128, dim=0):
        lp = F.log_softmax(chunk, dim=-1)
        entropy.append(-(torch.exp(lp) * lp).sum(-1))
    return logps, torch.cat(entropy).reshape(logits.shape[:-1])


def trl_kernel_logps_entropy(logits, ids, row_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's Triton log-prob and entropy kernel (rows where ``row_mask`` is 0 are skipped)."""
    from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

    return selective_log_softmax_and_entropy(logits, ids, **_accepted(selective_log_softmax_and_entropy,
                                                                      row_mask=row_mask))  # fmt: skip


def trl_chunked_logps_entropy(hidden, weight, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's fused LM head: ``ChunkedLogProbFunction`` over the unmasked tokens, scattered back to ``[B, T]``."""
    from trl.kernels import ChunkedLogProbFunction

    m = mask > 0
    out = ChunkedLogProbFunction.apply(hidden[m], weight, None, ids[m], 1.0, TRL_CHUNK, None, 1.0, ("entropy",))
    return tuple(x.new_zeros(m.shape).masked_scatter(m, x) for x in out[:2])


TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16


def cce_token_logps(hidden, weight, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """``logp[B, T] = -linear_cross_entropy(h, W, ids, reduction="none")`` (0 at masked tokens; CCE's default
    gradient filter) and zeros for the entropy, which CCE does not compute."""
    from cut_cross_entropy import linear_cross_entropy

    logps = -linear_cross_entropy(hidden, weight, ids.masked_fill(mask == 0, CCE_IGNORE), reduction="none")
    return logps, torch.zeros_like(logps)


CCE_IGNORE = -100  # cut_cross_entropy.constants.IGNORE_INDEX


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def cce_available() -> bool:
    return importlib.util.find_spec("cut_cross_entropy") is not None


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def print_skipped_peers(triton_peers: bool = True) -> None:
    """Say which peers this run leaves out and why (a missing package, or no device for Triton kernels)."""
    if not triton_peers:
        print("note: no CUDA and no TRITON_INTERPRET=1: the Triton peers (TRL's kernel, Liger) are skipped")
        return
    if not trl_available():
        print("note: trl is not installed: TRL's kernel and chunked-head peers are skipped (pip install -e '.[trl]')")
    if not liger_available():
        print("note: liger_kernel is not installed: the Liger peer is skipped (pip install liger-kernel)")
    if not cce_available():
        print("note: cut_cross_entropy is not installed: the Cut Cross-Entropy peer is skipped (pip install "
              "cut-cross-entropy)")  # fmt: skip


def _accepted(fn, **kwargs) -> dict:
    """The keyword arguments that ``fn``'s signature takes (Liger's and TRL's change across versions)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _liger_options(config) -> dict:
    return dict(beta=config.beta, epsilon_low=config.epsilon_low, epsilon_high=config.eps_high,
                eps_low=config.epsilon_low, eps_high=config.eps_high, loss_type=config.loss_type,
                temperature=config.temperature, max_completion_length=config.max_completion_length)  # fmt: skip


def liger_grpo_loss(config):
    """``loss(full_logits[B, T + 1, V], ids, mask, advantages, ref_logps, old_logps)`` through Liger's
    ``triton_grpo_loss`` (its backward writes the gradient into ``full_logits``)."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    kw = _accepted(triton_grpo_loss, inplace=True, reduce=True, **_liger_options(config))

    def loss(full, ids, mask, adv, ref, old):
        out = triton_grpo_loss(full, old, ref, ids, adv, mask, **kw)
        value = out[0] if isinstance(out, tuple) else out
        return value if value.dim() == 0 else (value * mask).sum() / mask.sum().clamp(min=1)  # older: per token

    return loss


def liger_fused_linear_grpo_loss(config):
    """``loss(hidden, weight, ids, mask, advantages, ref_logps, old_logps)`` through Liger's
    ``LigerFusedLinearGRPOLoss`` (``torch.compile``d chunks, its default). ``torch._dynamo`` is reset first: every
    shape starts from no compiled state, as in a fresh process."""
    import torch._dynamo
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    torch._dynamo.reset()
    module = LigerFusedLinearGRPOLoss(**_accepted(LigerFusedLinearGRPOLoss, use_ref_model=True,
                                                  **_liger_options(config)))  # fmt: skip
    return lambda h, w, ids, mask, adv, ref, old: module(h, w, ids, mask, adv, ref_per_token_logps=ref,
                                                         old_per_token_logps=old)[0]  # fmt: skip
