"""Exact references for benchmark parity, computed in the benchmark from the very inputs the methods see.

The loss is ``loss_from_logps`` (TRL 1.16 semantics) on exact per-token log-probs ``logp_t = z_t[id] - lse(z_t)``
and entropies ``H_t = -sum_j p_tj log p_tj``. Its gradient with respect to the logits follows from the per-token
coefficients ``a_t = dL/dlogp_t`` and ``b_t = dL/dH_t`` (autograd through the O(B*T) loss):

    dL/dz_tj = (a_t (onehot_j - p_tj) - b_t p_tj (log p_tj + H_t)) / temperature

so no more than one chunk of rows is ever upcast: fp64 for logits (``LogitsReference``), fp32 GEMMs without TF32
for hidden states and a head (``linear_reference``). A method's deviation is ``||x - x_ref|| / ||x_ref||`` for the
loss and each gradient (``harness.rel_err``).

A parity check only sees a term whose gradient is a visible part of the whole. The benchmarks' reference and old
log-probs are therefore drawn near the policy's own (``near_policy``: ``logp + NEAR * N(0, 1)``, so the k3 KL
term and the clipping are of the size they have in training), and ``term_cases`` adds cases where one term is
all there is: the policy gradient alone, the KL term alone (advantages 0), the entropy bonus alone (advantages 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from papo_kernels import PolicyLossConfig
from papo_kernels.loss import loss_from_logps

CHUNK_ROWS = 1024
NEAR = 0.1  # std of the reference and old log-probs around the policy's own: k3 KL ~ NEAR**2 / 2, some tokens clipped


def _softmax_stats(z: torch.Tensor, ids: torch.Tensor):
    """``log p`` over the vocabulary, ``p``, the target log-prob and the entropy of each row of ``z``."""
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    p = logp.exp()
    return logp, p, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(p * logp).sum(-1)


def _dlogits(z, ids, a, b, temperature: float) -> torch.Tensor:
    """The logits gradient of a chunk of rows from their coefficients ``a = dL/dlogp`` and ``b = dL/dH``."""
    logp, p, _, entropy = _softmax_stats(z, ids)
    d = -(a.unsqueeze(-1) * p) - b.unsqueeze(-1) * p * (logp + entropy.unsqueeze(-1))
    d.scatter_add_(-1, ids.unsqueeze(-1), a.unsqueeze(-1))
    return d / temperature


@dataclass
class Coefficients:
    loss: torch.Tensor
    a: torch.Tensor  # dL/dlogp, flat [B*T]
    b: torch.Tensor  # dL/dH, flat [B*T]


def loss_coefficients(logps, entropy, shape, completion_mask, advantages, config: PolicyLossConfig,
                      **loss_kwargs) -> Coefficients:  # fmt: skip
    """The exact loss and its per-token coefficients, from exact flat log-probs and entropies."""
    lp = logps.view(shape).detach().requires_grad_()
    ent = entropy.view(shape).detach().requires_grad_()
    loss = loss_from_logps(lp, ent, completion_mask, advantages, config=config, **loss_kwargs).loss
    a, b = torch.autograd.grad(loss, (lp, ent), allow_unused=True)  # no entropy term: b is None
    return Coefficients(loss.detach(), a.reshape(-1), torch.zeros_like(logps) if b is None else b.reshape(-1))


class LogitsReference:
    """The exact policy loss of ``logits[B, T, V]`` (any float dtype) and, for any method's output, its deviation."""

    def __init__(self, logits, completion_ids, completion_mask, advantages, *, dtype=torch.float64,
                 chunk_rows: int = CHUNK_ROWS, **loss_kwargs):  # fmt: skip
        self.logits = logits.detach()
        self.flat = self.logits.reshape(-1, logits.shape[-1])
        self.ids = completion_ids.reshape(-1).long()
        self.mask, self.advantages, self.loss_kwargs = completion_mask, advantages, loss_kwargs
        self.dtype, self.chunk_rows = dtype, chunk_rows
        self._stats: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._coefficients: dict[PolicyLossConfig, Coefficients] = {}

    def _chunks(self):
        for s in range(0, self.flat.shape[0], self.chunk_rows):
            yield slice(s, min(s + self.chunk_rows, self.flat.shape[0]))

    def _z(self, rows: slice, temperature: float) -> torch.Tensor:
        return self.flat[rows].to(self.dtype) / temperature

    def stats(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        if temperature not in self._stats:
            n = self.flat.shape[0]
            logps = torch.empty(n, dtype=self.dtype, device=self.flat.device)
            entropy = torch.empty_like(logps)
            for rows in self._chunks():
                _, _, logps[rows], entropy[rows] = _softmax_stats(self._z(rows, temperature), self.ids[rows])
            self._stats[temperature] = logps, entropy
        return self._stats[temperature]

    def coefficients(self, config: PolicyLossConfig) -> Coefficients:
        if config not in self._coefficients:
            logps, entropy = self.stats(config.temperature)
            self._coefficients[config] = loss_coefficients(
                logps, entropy, self.logits.shape[:-1], self.mask, self.advantages, config, **self.loss_kwargs
            )
        return self._coefficients[config]

    def loss(self, config: PolicyLossConfig) -> torch.Tensor:
        return self.coefficients(config).loss

    def grad_error(self, grad: torch.Tensor, config: PolicyLossConfig) -> float:
        """``||grad - dL/dlogits|| / ||dL/dlogits||`` for a method's logits gradient ``grad[B, T, V]``."""
        c = self.coefficients(config)
        flat_grad = grad.detach().reshape(-1, grad.shape[-1])
        num = den = 0.0
        for rows in self._chunks():
            d = _dlogits(self._z(rows, config.temperature), self.ids[rows], c.a[rows], c.b[rows], config.temperature)
            num += float((flat_grad[rows].to(self.dtype) - d).square().sum())
            den += float(d.square().sum())
        return (num / max(den, 1e-300)) ** 0.5

    def parity(self, loss: torch.Tensor, grad: torch.Tensor, config: PolicyLossConfig) -> dict:
        ref = self.loss(config)
        return {"rel_err_loss": float((loss.detach().to(ref.dtype) - ref).abs() / ref.abs().clamp(min=1e-30)),
                "rel_err_grad": self.grad_error(grad, config)}  # fmt: skip


@contextlib.contextmanager
def exact_fp32_matmul():
    """fp32 GEMMs in full fp32 (no TF32) inside the block."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])


def linear_reference(hidden, weight, completion_ids, completion_mask, advantages, config: PolicyLossConfig, *,
                     chunk_rows: int = CHUNK_ROWS, **loss_kwargs) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The exact loss of ``hidden[B, T, D] @ weight[V, D]^T`` and its gradients ``(loss, d_hidden, d_weight)``, fp32
    (two passes of chunked fp32 GEMMs: statistics, then gradients)."""
    h = hidden.detach().reshape(-1, hidden.shape[-1]).float()
    w = weight.detach().float()
    ids = completion_ids.reshape(-1).long()
    n, t = h.shape[0], config.temperature
    chunks = [slice(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]
    logps, entropy = torch.empty(n, device=h.device), torch.empty(n, device=h.device)
    with exact_fp32_matmul():
        for rows in chunks:
            _, _, logps[rows], entropy[rows] = _softmax_stats(h[rows] @ w.t() / t, ids[rows])
        c = loss_coefficients(logps, entropy, hidden.shape[:-1], completion_mask, advantages, config, **loss_kwargs)
        d_h, d_w = torch.empty_like(h), torch.zeros_like(w)
        for rows in chunks:
            d = _dlogits(h[rows] @ w.t() / t, ids[rows], c.a[rows], c.b[rows], t)
            d_h[rows] = d @ w
            d_w.addmm_(d.t(), h[rows])
    return c.loss, d_h.view(hidden.shape), d_w


def without_entropy_bonus(config: PolicyLossConfig) -> PolicyLossConfig:
    """The semantics of a peer that has no entropy term (Liger): the same loss with ``entropy_coef = 0``."""
    return replace(config, entropy_coef=0.0)


def token_logps(logits_of: Callable[[slice], torch.Tensor], ids: torch.Tensor, n: int, temperature: float,
                chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:  # fmt: skip
    """Flat fp32 log-probs of ``ids[n]`` under the logits that ``logits_of(rows)`` gives for a chunk of rows."""
    out = torch.empty(n, dtype=torch.float32, device=ids.device)
    for s in range(0, n, chunk_rows):
        rows = slice(s, min(s + chunk_rows, n))
        out[rows] = _softmax_stats(logits_of(rows).float() / temperature, ids[rows])[2]
    return out


def near_policy(logits_of: Callable[[slice], torch.Tensor], ids: torch.Tensor, temperature: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Reference and old log-probs ``[B, T]`` near the policy's own (``NEAR`` apart, independently)."""
    flat = ids.reshape(-1)
    logps = token_logps(logits_of, flat, flat.numel(), temperature).view(ids.shape)
    return tuple(logps + NEAR * torch.randn(ids.shape, device=ids.device, generator=generator) for _ in range(2))


@dataclass
class LossInputs:
    """A benchmark's loss inputs besides the logits (or hidden states and head)."""

    ids: torch.Tensor
    mask: torch.Tensor
    adv: torch.Tensor
    ref: torch.Tensor  # reference log-probs near the policy's own
    old: torch.Tensor  # old log-probs near the policy's own

    def loss_kwargs(self) -> dict:
        return dict(old_logps=self.old, ref_logps=self.ref)


TERMS = ("policy_gradient", "kl", "entropy_bonus")


def term_cases(config: PolicyLossConfig) -> dict[str, tuple[PolicyLossConfig, float]]:
    """case -> (config, scale of the advantages): ``mixed`` (``config`` itself) and each term of it alone."""
    return {
        "mixed": (config, 1.0),
        "policy_gradient_only": (replace(config, beta=0.0, entropy_coef=0.0), 1.0),
        "kl_only": (replace(config, entropy_coef=0.0), 0.0),
        "entropy_bonus_only": (replace(config, beta=0.0), 0.0),
    }


def has_terms(config: PolicyLossConfig, advantage_scale: float) -> bool:
    """Whether a case leaves any term to check (a method without the entropy bonus has none in its own case)."""
    return advantage_scale != 0 or config.beta != 0 or config.entropy_coef != 0


def term_rows(results, inputs, config: PolicyLossConfig, methods_of: Callable, check_of: Callable,
              allowed: tuple[str, ...], key: dict, limit_s: float | None = None) -> None:  # fmt: skip
    """Parity rows (``results.run(..., timed=False)``) of the ``allowed`` methods in every case of ``term_cases``:
    ``methods_of(inputs, config)`` gives ``{name: (make, semantics, note)}`` and ``check_of(inputs)`` the check
    ``(output, semantics) -> fields``, both for the case's inputs (advantages scaled) and config."""
    for case, (case_config, scale) in term_cases(config).items():
        case_inputs = replace(inputs, adv=inputs.adv * scale)
        check = check_of(case_inputs)
        for name, (make, semantics, note) in methods_of(case_inputs, case_config).items():
            if name in allowed and has_terms(semantics, scale):
                results.run({"case": case, "method": name, **key}, make, check=partial(check, semantics=semantics),
                            limit_s=limit_s, timed=False, note=note)  # fmt: skip
