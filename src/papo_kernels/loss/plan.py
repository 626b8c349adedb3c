"""The plan shared by the logits and fused-linear paths: prepared inputs, the scalar parameters and the O(B*T)
buffers the kernels read and write (``launch.py`` runs the kernels on it).

Two views of the same flat tokens. The row kernel's: token ``p`` is row ``p // T`` of a ``[B, T]`` batch (its
aggregation weight ``w[p // T]``); a packed batch is ``[N, 1]`` there, with the per-sequence values (advantage, IS
ratio, weight) spread over their tokens. The batch kernels' (:class:`Sequences`): sequence ``b`` is the tokens
``cu[b]`` to ``cu[b + 1]``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._runtime import cached_tensor
from .config import VESPO_IS_RATIO_MIN, VESPO_LAMBDA_MIN, PolicyLossConfig, PolicyLossOutput
from .inputs import LossInputs
from .terms import (
    C_HIGH_RATIO,
    C_LOSS,
    C_LOW_RATIO,
    LOSS_IDS,
    N_OUT,
    N_PARAMS,
    N_PART,
    O_BONUS,
    O_ENT,
    O_HIGH,
    O_KL,
    O_LOW,
    O_PHI,
    O_POLICY,
    O_REGION,
)


def params_tensor(cfg: PolicyLossConfig, dtype, device, logit_scale: float = 1.0, softcap: float | None = None):
    """The scalar parameters as a small tensor of the arithmetic dtype (cached: no copy per call)."""
    key = (cfg, dtype, str(device), float(logit_scale), softcap)
    make = lambda: torch.tensor(_params(cfg, dtype, logit_scale, softcap), dtype=dtype, device=device)  # noqa: E731
    return cached_tensor(key, make)


def _params(cfg: PolicyLossConfig, dtype, logit_scale: float, softcap: float | None) -> list[float]:
    inv_t = 1.0 / cfg.temperature
    k2 = math.log2(math.e) * inv_t * (logit_scale if softcap is None else 1.0)
    # TRL builds the SAPO temperatures and VESPO's k and lambda with torch.where over Python floats (fp32 values),
    # and torch.quantile takes its q as a tensor of the (fp32) entropies' dtype
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    vespo = [f32(cfg.vespo_k_pos), max(f32(cfg.vespo_lambda_pos), f32(VESPO_LAMBDA_MIN))]
    vespo += [f32(cfg.vespo_k_neg), max(f32(cfg.vespo_lambda_neg), f32(VESPO_LAMBDA_MIN))]
    opm = cfg.off_policy_mask_threshold
    values = [
        cfg.epsilon_low, cfg.eps_high, cfg.delta or 0.0, cfg.beta, f32(cfg.sapo_temperature_pos),
        f32(cfg.sapo_temperature_neg), cfg.entropy_coef, k2, logit_scale * inv_t, logit_scale, softcap or 1.0,
        float(cfg.max_completion_length or 1), *vespo, math.log(VESPO_IS_RATIO_MIN), 0.0 if opm is None else opm,
        f32(1.0 - cfg.top_entropy_quantile), torch.finfo(dtype).max,
    ]  # fmt: skip
    assert len(values) == N_PARAMS
    return values


def scalar_tensor(value: float, dtype, device) -> torch.Tensor:
    """A one-element tensor holding ``value`` (cached like the parameters: no host-to-device copy per call)."""
    key = ("scalar", float(value), dtype, str(device))
    return cached_tensor(key, lambda: torch.tensor([value], dtype=dtype, device=device))


@dataclass
class Sequences:
    """The batch kernels' view: ``n`` sequences, sequence ``b`` the flat tokens ``cu[b]`` to ``cu[b + 1]``; its
    advantage and IS ratio at ``b * strides[0] + p * strides[1]`` for token ``p``; ``w`` its aggregation weight."""

    n: int
    cu: torch.Tensor
    width: int  # T of the padded batch (packed: of the same sequences padded, at least 1)
    adv: torch.Tensor
    adv_strides: tuple[int, int]
    isr: torch.Tensor | None
    isr_strides: tuple[int, int]
    isr_per_seq: bool
    w: torch.Tensor
    token_seq: torch.Tensor | None  # packed: each token's sequence (to spread ``w`` over the row kernel's weights)


@dataclass
class Plan:
    """Everything the kernels need besides the logits, for one batch (``B``, ``T``, ``adv``, ``isr``, ``w``: the row
    kernel's view; ``seqs``: the batch kernels')."""

    cfg: PolicyLossConfig
    B: int
    T: int
    acc: torch.dtype
    ids: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    adv_strides: tuple[int, int]
    old: torch.Tensor | None
    ref: torch.Tensor | None
    isr: torch.Tensor | None
    isr_strides: tuple[int, int]
    samp: torch.Tensor | None
    seq_scale: torch.Tensor | None
    num_items: torch.Tensor | float | None
    params: torch.Tensor
    softcap: bool
    # O(B*T) buffers
    logp: torch.Tensor
    ent: torch.Tensor
    rmax: torch.Tensor
    log2s: torch.Tensor
    dlogp: torch.Tensor  # per token dL/dlogp, before the aggregation weight
    ptl: torch.Tensor
    kl: torch.Tensor
    flags: torch.Tensor
    part: torch.Tensor
    w: torch.Tensor
    out: torch.Tensor
    loss: torch.Tensor
    err: torch.Tensor  # int32 [1]: 1 when an unmasked token's target id lies outside [0, V)
    seqs: Sequences

    @property
    def seq_level(self) -> bool:
        return self.cfg.importance_sampling_level == "sequence"

    @property
    def two_phase(self) -> bool:
        return self.cfg.two_phase

    @property
    def ent_mask(self) -> bool:
        return self.cfg.top_entropy_quantile < 1.0

    def flags_kw(self) -> dict:
        c = self.cfg
        return dict(
            LOSS=LOSS_IDS[c.loss_type], HAS_OLD=self.old is not None, HAS_KL=c.beta != 0.0,
            BIAS_KL=c.use_bias_correction_kl, HAS_ISR=self.isr is not None and c.loss_type != "vespo",
            HAS_DELTA=c.delta is not None,
        )  # fmt: skip


def metrics_from_out(out: torch.Tensor, cfg: PolicyLossConfig) -> dict[str, torch.Tensor]:
    """The metric dict (0-dim views of the finalize kernel's output vector), keyed as TRL logs them."""
    at = lambda slot: out[slot.value]  # noqa: E731
    metrics = {"entropy": at(O_ENT)}
    if cfg.beta != 0.0:
        metrics["kl"] = at(O_KL)
    if cfg.clipped:
        metrics["clip_ratio/low_mean"] = at(O_LOW)
        metrics["clip_ratio/high_mean"] = at(O_HIGH)
        metrics["clip_ratio/region_mean"] = at(O_REGION)
    elif cfg.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = at(O_HIGH)
    elif cfg.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = at(O_PHI)
    metrics["policy_loss"] = at(O_POLICY)
    return metrics


def output_from(loss, logps, entropy, part, out, err, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """The public output from the autograd function's outputs: per-sequence values are views of ``part``, the
    metrics and entropy statistics views of ``out``. Off CUDA (Triton's interpreter) the id check raises at once."""
    stats = out[O_BONUS.value : O_BONUS.value + 2]
    clip = part[:, C_LOW_RATIO.value : C_HIGH_RATIO.value + 1] if cfg.clipped else None
    output = PolicyLossOutput(loss, logps, entropy, metrics_from_out(out, cfg), part[:, C_LOSS.value], stats, clip, err)
    if not err.is_cuda:
        output.check()
    return output


def make_plan(
    completion_ids: torch.Tensor, inputs: LossInputs, cfg: PolicyLossConfig, acc: torch.dtype, device,
    logit_scale: float = 1.0, softcap: float | None = None, zeroed: bool = False,
) -> Plan:  # fmt: skip
    """Prepared inputs and buffers; ``zeroed`` when the row kernel will not visit every token (compacted rows)."""
    S = inputs.num_sequences
    N = inputs.completion_mask.numel()
    mask = inputs.completion_mask.to(device).contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    num_items = inputs.num_items_in_batch
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(device=device, dtype=acc).reshape(1)
    dense = lambda t: None if t is None else t.to(device).contiguous()  # noqa: E731
    adv, isr = dense(inputs.advantages), dense(inputs.importance_sampling_ratio)
    isr_per_seq = isr is not None and tuple(isr.shape) != inputs.shape  # [B, 1] (the same when T = 1)
    # one allocation, every segment 16-element aligned (pointer alignment is part of Triton's specialization key)
    sizes = [N] * 7 + [N_PART.value * S, S, N_OUT] + ([N] if inputs.packed else [])
    padded = [-(-n // 16) * 16 for n in sizes]
    alloc = torch.zeros if zeroed else torch.empty
    flat = alloc(sum(padded), dtype=acc, device=device)
    views = [v[:n] for v, n in zip(flat.split(padded), sizes, strict=True)]
    seqs = Sequences(
        n=S, cu=_offsets(inputs, device), width=max(inputs.max_seqlen, 1), adv=adv,
        adv_strides=(adv.stride(0), 0) if adv.dim() == 1 else (0, 1), isr=isr,
        isr_strides=(0, 0) if isr is None else ((isr.stride(0), 0) if isr_per_seq else (0, 1)),
        isr_per_seq=isr_per_seq, w=views[8], token_seq=inputs.sequence_index.to(device) if inputs.packed else None,
    )  # fmt: skip
    B, T, w = (*inputs.shape, views[8])
    if inputs.packed:  # the row kernel's view: a row per token, the per-sequence values spread over the tokens
        B, T, w = N, 1, views[10]
        adv = adv[seqs.token_seq] if adv.dim() == 1 else adv.view(N)
        isr = None if isr is None else (isr[seqs.token_seq, 0] if isr_per_seq else isr.view(N))
    return Plan(
        cfg=cfg, B=B, T=T, acc=acc, ids=completion_ids.to(device).contiguous(), mask=mask, adv=adv,
        adv_strides=_row_strides(adv), old=dense(inputs.old_logps), ref=dense(inputs.ref_logps), isr=isr,
        isr_strides=(0, 0) if isr is None else _row_strides(isr), samp=dense(inputs.sampling_logps),
        seq_scale=dense(inputs.sequence_scale), num_items=num_items,
        params=params_tensor(cfg, acc, device, logit_scale, softcap), softcap=softcap is not None, logp=views[0],
        ent=views[1], rmax=views[2], log2s=views[3], dlogp=views[4], ptl=views[5], kl=views[6],
        flags=alloc(N, dtype=torch.int32, device=device), part=views[7].view(S, N_PART.value), w=w,
        out=views[9], loss=alloc((), dtype=acc, device=device), seqs=seqs,  # loss not a view: scaled in place
        err=torch.zeros(1, dtype=torch.int32, device=device),
    )  # fmt: skip


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    """Strides of a per-sequence (``[B]``, ``[B, 1]``) or per-token (``[B, T]``) input in the row kernel's view."""
    return t.stride(0), t.stride(1) if t.dim() == 2 and t.shape[1] > 1 else 0


def _offsets(inputs: LossInputs, device) -> torch.Tensor:
    """The sequences' flat token offsets: ``cu_seqlens`` packed, ``b * T`` padded (cached)."""
    if inputs.packed:
        return inputs.cu_seqlens.to(device)
    B, T = inputs.shape
    return cached_tensor(("offsets", B, T, str(device)), lambda: torch.arange(B + 1, device=device) * T)
