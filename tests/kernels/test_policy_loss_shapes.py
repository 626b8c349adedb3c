"""Shapes are runtime arguments: new completion lengths compile no new kernel variants; large shapes work."""

import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from papo_kernels import PolicyLossConfig, policy_loss
from papo_kernels.loss.batch import _count_kernel, _finalize_kernel, _quantile_kernel, _sequence_kernel
from papo_kernels.loss.rows import _rows, _scale_rows
from tests.kernels._policy_loss_cases import kwargs_of, make_case

KERNELS = (_rows, _scale_rows, _sequence_kernel, _finalize_kernel, _quantile_kernel, _count_kernel)
OPTIONS = dict(top_entropy_quantile=0.3, off_policy_mask_threshold=0.0)  # two phases, the quantile kernel


def _step(T: int, V: int, device: str, cfg: PolicyLossConfig, B: int = 1, dtype=torch.float32):
    case = make_case(T, B, T, V, cfg=cfg, device=device, dtype=dtype, is_ratio="sequence", adv_2d=True)
    x = case["logits"].requires_grad_()
    out = policy_loss(x, case["completion_ids"], case["completion_mask"], case["advantages"], config=cfg,
                      **kwargs_of(case))  # fmt: skip
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    return out


def _specialization_keys(kernel, calls) -> set[str]:
    """Triton's own specialization key (the compile-cache key minus options) for each recorded launch."""
    fn = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"))
    binder = create_function_from_signature(fn.signature, fn.params, BaseBackend)
    return {str(binder(*args, **kwargs)[1]) for args, kwargs in calls}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's kernel objects; CUDA counts real variants")
@pytest.mark.parametrize("level", ["token", "sequence", "vespo-masks"])
def test_completion_length_does_not_specialize(level):
    """Every launch of a completion length has a launch of the same specialisation at the other lengths."""
    calls = {k: {} for k in KERNELS}
    length = [0]
    for k in KERNELS:
        k.add_pre_run_hook(lambda *a, _k=k, **kw: calls[_k].setdefault(length[0], []).append((a, kw)))
    try:
        if level == "vespo-masks":
            cfg = PolicyLossConfig(loss_type="vespo", beta=0.1, entropy_coef=0.01, **OPTIONS)
        else:
            cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level=level, beta=0.1, entropy_coef=0.01)
        for T in (100, 101, 257):
            length[0] = T
            _step(T, 24, "cpu", cfg)  # 24 * T is a multiple of 16 for some T and not others
    finally:
        for k in KERNELS:
            k.pre_run_hooks.clear()
    assert bool(calls[_quantile_kernel]) == (level == "vespo-masks")
    assert bool(calls[_count_kernel]) == (level == "token")  # the single-phase pre-pass
    assert all(calls[k] for k in KERNELS if k not in (_quantile_kernel, _count_kernel))
    for k in KERNELS:
        keys = [_specialization_keys(k, launches) for launches in calls[k].values()]
        assert all(key == keys[0] for key in keys), k.__name__
        assert len({len(launches) for launches in calls[k].values()}) <= 1, k.__name__


def _variants(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    return sum(len(c) for c in kernel.cache.values())


def _big_step(B: int, T: int, V: int, cfg: PolicyLossConfig):
    """A large case built directly on the GPU in bf16 (no fp64 host copy), fwd + bwd with in-place gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(B, T, V, device="cuda", dtype=torch.bfloat16, generator=g) * 3
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.ones(B, T, device="cuda", dtype=torch.int64)
    mask[:, T - T // 4 :] = 0
    adv = torch.randn(B, device="cuda", generator=g)
    ref = torch.full((B, T), -float(torch.log(torch.tensor(V))), device="cuda")
    expect = torch.cat([torch.log_softmax(c.float(), -1).gather(-1, i[..., None]).squeeze(-1)
                        for c, i in zip(logits.split(1024, 1), ids.split(1024, 1), strict=True)], 1)  # fmt: skip
    x = logits.requires_grad_()
    out = policy_loss(x, ids, mask, adv, ref_logps=ref, config=cfg, inplace_grad=True)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad[:, :8].float()).all()
    m = mask > 0
    torch.testing.assert_close(out.per_token_logps[m], expect[m], rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(x.grad[:, T - 1]) == 0


@pytest.mark.cuda
def test_completion_length_compiles_once_cuda():
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
    _step(64, 32000, "cuda", cfg, B=2, dtype=torch.bfloat16)
    before = {k: _variants(k) for k in KERNELS}
    for T in (100, 101, 257, 4096):
        _step(T, 32000, "cuda", cfg, B=2, dtype=torch.bfloat16)
    assert {k: _variants(k) for k in KERNELS} == before


@pytest.mark.cuda
def test_options_compile_once_cuda():
    cfg = PolicyLossConfig(loss_type="vespo", beta=0.04, entropy_coef=0.01, **OPTIONS)
    _step(64, 32000, "cuda", cfg, B=2, dtype=torch.bfloat16)
    before = {k: _variants(k) for k in KERNELS}
    for T in (100, 101, 257, 4096):
        _step(T, 32000, "cuda", cfg, B=2, dtype=torch.bfloat16)
    assert {k: _variants(k) for k in KERNELS} == before


@pytest.mark.cuda
def test_one_sequence_of_65536_tokens_cuda():
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, entropy_coef=0.01)
    _big_step(1, 65536, 32000, cfg)


@pytest.mark.cuda
def test_vocabulary_262144_cuda():
    _big_step(4, 1024, 262144, PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01))
