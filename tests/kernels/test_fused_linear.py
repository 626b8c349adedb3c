"""``fused_linear_policy_loss`` against ``policy_loss`` on explicitly materialised logits and fp64 references:
loss, metrics and the hidden, weight and bias gradients (the chunk schedule itself: test_fused_linear_design.py)."""

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import papo_kernels
from papo_kernels import PolicyLossConfig
from papo_kernels.loss import chunked, fused_linear_policy_loss, linear_logits, naive_policy_loss
from tests.kernels._policy_loss_cases import configs, input_options, kwargs_of, make_case

B, T, D, V = 3, 6, 8, 37
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_head(seed, B, T, D, V, cfg, dtype=torch.float64, bias=False, device=DEVICE, **opts):
    """A case whose logits are ``hidden @ weight^T (+ bias)``, with old/ref log-probs near the current ones."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    case = make_case(seed, B, T, V, cfg=cfg, **opts)
    case["logits"] = linear_logits(hidden, weight, b)
    logps = torch.log_softmax(case["logits"] / cfg.temperature, -1).gather(-1, case["completion_ids"][..., None])
    for key, noise in (("old_logps", 0.25), ("ref_logps", 0.3)):
        if key in case:
            case[key] = logps.squeeze(-1) + noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    params = [t.to(device=device, dtype=dtype) if t is not None else None for t in (hidden, weight, b)]
    case = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    return [p.requires_grad_() if p is not None else None for p in params], case


def run_fused(params, case, cfg, **kw):
    h, w, b = params
    out = fused_linear_policy_loss(
        h, w, case["completion_ids"], case["completion_mask"], case["advantages"], bias=b, config=cfg,
        **kwargs_of(case), **kw,
    )  # fmt: skip
    out.loss.backward()
    return out, [p.grad if p is not None else None for p in params]


def run_reference(params, case, cfg, scale=1.0, cap=None):
    ps = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs_of(case).items()}
    logits = linear_logits(ps[0], ps[1], ps[2], scale, cap)
    out = naive_policy_loss(
        logits, case["completion_ids"], case["completion_mask"], case["advantages"].double(), config=cfg, **kw
    )
    out.loss.backward()
    return out, [p.grad if p is not None else None for p in ps]


def assert_close(out, grads, ref, ref_grads, rtol, atol):
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=rtol, atol=atol)
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            continue
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol * max(r.abs().max().item(), 1e-30))
    assert set(out.metrics) == set(ref.metrics)
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k].double(), ref.metrics[k], rtol=rtol, atol=atol, msg=k)
    for name in ("per_token_logps", "entropy", "sequence_loss"):
        r = getattr(ref, name)
        torch.testing.assert_close(getattr(out, name).double(), r, rtol=rtol, atol=atol * max(r.abs().max().item(), 1))
    assert (out.sequence_clip_ratio is None) == (ref.sequence_clip_ratio is None)
    if ref.sequence_clip_ratio is not None:
        torch.testing.assert_close(out.sequence_clip_ratio.double(), ref.sequence_clip_ratio, equal_nan=True)


def record_gemms(monkeypatch) -> list:
    """``(helper, output shape, output dtype)`` of every gradient GEMM of the chunk loop (G2 and G3), as they run."""
    calls = []
    for name in ("mm_into", "addmm_into"):
        real = getattr(chunked, name)

        def spy(out, a, b, name=name, real=real):
            calls.append((name, tuple(out.shape), out.dtype))
            real(out, a, b)

        monkeypatch.setattr(chunked, name, spy)
    return calls


@contextlib.contextmanager
def overlapped(on: bool = True):
    """The chunk loop with the row kernel on a second stream (in order on CPU tensors: the same schedule)."""
    old, chunked.OVERLAP_ROWS = chunked.OVERLAP_ROWS, on
    try:
        yield
    finally:
        chunked.OVERLAP_ROWS = old


@given(
    cfg=configs(T=T), opts=input_options(), seed=st.integers(0, 2**16), bias=st.booleans(),
    head=st.sampled_from([(1.0, None), (0.5, None), (1.0, 3.0), (1.7, 2.5)]), chunk=st.sampled_from([None, 1, 4, 7]),
    overlap=st.booleans(),
)  # fmt: skip
def test_matches_materialised_logits_fp64(cfg, opts, seed, bias, head, chunk, overlap):
    scale, cap = head
    params, case = make_head(seed, B, T, D, V, cfg, bias=bias, **opts)
    with overlapped(overlap):
        out, grads = run_fused(params, case, cfg, logit_scale=scale, final_logit_softcapping=cap, chunk_size=chunk)
    ref, ref_grads = run_reference(params, case, cfg, scale, cap)
    assert_close(out, grads, ref, ref_grads, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_fp32_within_1e5_of_fp64(level, loss_type):
    cfg = PolicyLossConfig(
        loss_type=loss_type, importance_sampling_level=level, beta=0.04, entropy_coef=0.01, temperature=0.9,
        epsilon_high=0.28 if loss_type != "cispo" else 1.2,
    )  # fmt: skip
    params, case = make_head(3, 4, 9, 16, 70, cfg, dtype=torch.float32, bias=True, masked_row=True, adv_2d=True)
    case = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in case.items()}
    out, grads = run_fused(params, case, cfg, logit_scale=0.8, final_logit_softcapping=6.0, chunk_size=5)
    ref, ref_grads = run_reference(params, case, cfg, 0.8, 6.0)
    assert all(g.dtype == torch.float32 for g in grads)
    assert_close(out, grads, ref, ref_grads, rtol=1e-5, atol=1e-6)


def test_bf16_and_autocast():
    cfg = PolicyLossConfig(loss_type="grpo", beta=0.04, entropy_coef=0.01)
    params, case = make_head(4, 2, 8, 16, 64, cfg, dtype=torch.bfloat16)
    out, grads = run_fused(params, case, cfg, chunk_size=6)
    ref, ref_grads = run_reference(params, case, cfg)
    assert [g.dtype for g in grads[:2]] == [torch.bfloat16, torch.bfloat16]
    assert_close(out, grads, ref, ref_grads, rtol=2e-2, atol=2e-2)
    # fp32 master weights under bf16 autocast: the GEMMs run in bf16, the gradients come back in fp32
    p32 = [p.detach().float().requires_grad_() if p is not None else None for p in params]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out32, grads32 = run_fused(p32, case, cfg, chunk_size=6)
    assert [g.dtype for g in grads32[:2]] == [torch.float32, torch.float32]
    assert_close(out32, grads32, ref, ref_grads, rtol=2e-2, atol=2e-2)


def test_frozen_head_has_no_weight_gradient_nor_accumulator(monkeypatch):
    """PEFT: every GEMM output is the hidden-state gradient's ``[chunk, D]``; nothing of the head's ``[V, D]``."""
    calls = record_gemms(monkeypatch)
    cfg = PolicyLossConfig(loss_type="dapo")
    (h, w, _), case = make_head(5, B, T, D, V, cfg)
    w.requires_grad_(False)
    out, (gh, gw, _) = run_fused([h, w, None], case, cfg, chunk_size=4)
    n = int(case["completion_mask"].sum())
    assert gw is None and [shape for _, shape, _ in calls] == [(min(4, n - c0), D) for c0 in range(0, n, 4)]
    ref, (rh, _, _) = run_reference([h, w, None], case, cfg)
    torch.testing.assert_close(gh, rh)


def test_masked_tokens_are_never_projected_and_get_zero_gradient():
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.1, beta=0.1)
    (h, w, b), case = make_head(6, B, T, D, V, cfg, bias=True, masked_row=True)
    with torch.no_grad():
        h[B - 1] = float("nan")  # a fully masked sequence full of NaN hidden states
    out, (gh, gw, gb) = run_fused([h, w, b], case, cfg, chunk_size=4)
    assert torch.isfinite(out.loss) and torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert torch.count_nonzero(gh[B - 1]) == 0
    case["completion_mask"].zero_()
    for p in (h, w, b):
        p.grad = None
    out, (gh, gw, gb) = run_fused([h, w, b], case, cfg)
    assert out.loss.item() == 0.0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dense_batch_and_single_chunk(level):
    """No masked token (chunks are plain slices), one chunk (sequence level keeps its logits) or several."""
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level=level, beta=0.02, entropy_coef=0.05)
    params, case = make_head(10, B, T, D, V, cfg, bias=True)
    case["completion_mask"].fill_(1)
    ref, ref_grads = run_reference(params, case, cfg)
    for chunk in (None, 5):
        for p in params:
            p.grad = None
        out, grads = run_fused(params, case, cfg, chunk_size=chunk)
        assert_close(out, grads, ref, ref_grads, rtol=1e-9, atol=1e-11)


def test_long_sequence_many_chunks():
    cfg = PolicyLossConfig(loss_type="luspo", importance_sampling_level="sequence", beta=0.02)
    params, case = make_head(7, 1, 700, 8, 24, cfg, dtype=torch.float32)
    case = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in case.items()}
    out, grads = run_fused(params, case, cfg, chunk_size=128)
    ref, ref_grads = run_reference(params, case, cfg)
    assert_close(out, grads, ref, ref_grads, rtol=1e-5, atol=1e-6)


def test_no_grad_forward_skips_gradient_work(monkeypatch):
    for name in ("grad_rows", "fused_rows", "prepare_weights", "mm_into", "addmm_into"):
        monkeypatch.setattr(chunked, name, lambda *a, **k: pytest.fail("gradient work launched under no_grad"))
    cfg = PolicyLossConfig(loss_type="bnpo")
    params, case = make_head(8, B, T, D, V, cfg)
    with torch.no_grad():
        out = fused_linear_policy_loss(params[0], params[1], case["completion_ids"], case["completion_mask"],
                                       case["advantages"], config=cfg, **kwargs_of(case))  # fmt: skip
    ref, _ = run_reference(params, case, cfg)
    torch.testing.assert_close(out.loss, ref.loss)


def test_input_validation():
    cfg = PolicyLossConfig()
    (h, w, _), case = make_head(9, B, T, D, V, cfg)
    ids, mask, adv = case["completion_ids"], case["completion_mask"], case["advantages"]
    with pytest.raises(ValueError, match="completion_ids"):
        fused_linear_policy_loss(h, w, ids + V, mask, adv)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_policy_loss(h, w[:, :-1], ids, mask, adv)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_policy_loss(h, w, ids, mask, adv, bias=torch.zeros(V + 1, dtype=h.dtype))
    with pytest.raises(ValueError, match="logit_scale"):
        fused_linear_policy_loss(h, w, ids, mask, adv, logit_scale=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_policy_loss(h, w, ids, mask, adv, chunk_size=0)
    for bad in (0.0, float("inf"), torch.ones(2)):
        with pytest.raises(ValueError, match="grad_scale"):
            fused_linear_policy_loss(h, w, ids, mask, adv, grad_scale=bad)


def test_exported():
    assert papo_kernels.fused_linear_policy_loss is fused_linear_policy_loss
    assert "fused_linear_policy_loss" in papo_kernels.__all__


@pytest.mark.cuda
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_qwen_head_against_fp32_and_trl_cuda(level):
    """A Qwen2.5-0.5B-sized head in bf16: as close to the fp32 loss and gradients as TRL's chunked head is."""
    from trl.kernels import ChunkedLogProbFunction

    from papo_kernels.loss import loss_from_logps

    cfg = PolicyLossConfig(loss_type="dapo", importance_sampling_level=level, beta=0.04, entropy_coef=0.01)
    g = torch.Generator(device="cuda").manual_seed(0)
    Bq, Tq, Dq, Vq = 4, 1024, 896, 151936
    h = torch.randn(Bq, Tq, Dq, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(Vq, Dq, device="cuda", generator=g) / Dq**0.5 * 2).bfloat16().requires_grad_()
    ids = torch.randint(0, Vq, (Bq, Tq), device="cuda", generator=g)
    mask = torch.ones(Bq, Tq, device="cuda", dtype=torch.int64)
    mask[:, 900:] = 0
    adv = torch.randn(Bq, device="cuda", generator=g)
    ref = -torch.rand(Bq, Tq, device="cuda", generator=g) * 5 - 8
    kw = dict(ref_logps=ref, config=cfg)

    def grads_of(loss, params):
        return [loss.detach().float()] + [x.float() for x in torch.autograd.grad(loss, params)]

    ours = grads_of(fused_linear_policy_loss(h, w, ids, mask, adv, **kw).loss, (h, w))
    m = mask > 0
    outs = ChunkedLogProbFunction.apply(h[m], w, None, ids[m], 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
    logps, entropy = (x.new_zeros(m.shape).masked_scatter(m, x) for x in outs[:2])
    trl = grads_of(loss_from_logps(logps, entropy, mask, adv, **kw).loss, (h, w))
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    exact = grads_of(naive_policy_loss(linear_logits(h32, w32), ids, mask, adv, **kw).loss, (h32, w32))
    for a, b, e in zip(ours, trl, exact, strict=True):
        err_ours = ((a - e).norm() / e.norm()).item()
        err_trl = ((b - e).norm() / e.norm()).item()
        assert err_ours < 2e-2 and err_ours <= 1.5 * err_trl + 1e-4, (err_ours, err_trl)
