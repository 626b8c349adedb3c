"""The fused linear head's chunk schedule: chunk sizes under TRL's memory bound, which GEMM writes where (no zero
fill, no accumulator for one chunk, none for a frozen head), the gradient announced in the forward and a backward
that only checks it, the overlapped schedule, tied embeddings."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from papo_kernels import PolicyLossConfig, fused_linear_policy_loss
from papo_kernels.loss import chunked, launch, linear_logits, naive_policy_loss
from papo_kernels.loss.rows import _rows, _scale_rows
from tests.kernels._policy_loss_cases import kwargs_of
from tests.kernels.test_fused_linear import (
    B,
    D,
    T,
    V,
    assert_close,
    make_head,
    overlapped,
    record_gemms,
    run_fused,
    run_reference,
)

DAPO = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
GSPO = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, entropy_coef=0.01)
HEADS = {"qwen2.5-7b": (3584, 152064), "qwen2.5-0.5b": (896, 151936)}
MiB = 1 << 20


@given(n=st.integers(0, 70000), limit=st.integers(128, 16384))
def test_chunks_are_near_equal_aligned_and_within_the_limit(n, limit):
    spans = chunked.chunk_spans(n, limit)
    assert [c0 for c0, _ in spans] == [0, *(c1 for _, c1 in spans[:-1])][: len(spans)]
    assert (spans[-1][1] if spans else 0) == n
    sizes = [c1 - c0 for c0, c1 in spans]
    assert len(spans) == -(-n // limit) and all(0 < s <= limit for s in sizes)
    assert len(set(sizes[:-1])) <= 1 and (not sizes or sizes[-1] <= sizes[0])
    if len(sizes) > 1:  # aligned to 128 tokens unless that passes the limit
        even = -(-n // len(sizes))
        assert even <= sizes[0] and (sizes[0] % 128 == 0 or -(-even // 128) * 128 > limit)


def peaks(n: int, D: int, V: int, C: int, chunks: int, e: int = 2) -> tuple[int, int]:
    """Bytes at the peak (beyond the inputs, no padding) of our call and of TRL 1.16's chunked path (with its
    caller's ``hidden[mask]``), from the formulas of ``chunked.py``: ours, the loop or the casts at its end."""
    head = 4 * V * D if chunks > 1 else e * V * D  # the accumulator, or grad_W written at once
    loop = C * V * e + 4 * n * D + head
    end = max(4 * n * D + e * n * D + head, e * n * D + head + (e * V * D if chunks > 1 else 0))
    trl = 4 * V * D + 4 * n * D + min(n, 4096) * 32768 * e + e * V * D + 2 * e * n * D
    return max(loop, end), trl


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("n", [4096, 16384, 65536])
def test_default_chunks_keep_the_peak_at_or_below_trl(head, n):
    """The benchmark's heads: chunks of 4,096 tokens on the 7B head (one chunk at 4k tokens), as many as the bound
    allows on the 0.5B head, and a peak at or below TRL's at every size."""
    D, V = HEADS[head]
    limit = chunked.chunk_limit(n, V, D, 2, 2, True)
    assert limit * V * 2 <= 2 * V * D + 2 * n * D + 4096 * 32768 * 2 < (limit + 1) * V * 2
    spans = chunked.chunk_spans(n, limit)
    ours, trl = peaks(n, D, V, spans[0][1], len(spans))
    assert ours <= trl
    if head == "qwen2.5-7b" and n <= 16384:
        assert {c1 - c0 for c0, c1 in spans} == {4096}
    assert chunked.chunk_limit(n, V, D, 2, 2, True, free_bytes=64 * MiB) == 128  # a nearly full device: the minimum
    assert chunked.chunk_limit(n, V, D, 2, 2, False) < limit  # a frozen head saves TRL no accumulator either


@pytest.mark.parametrize("chunk, dtype", [(4, torch.float64), (None, torch.float64), (None, torch.bfloat16)])
def test_weight_gradient_gemms(chunk, dtype, monkeypatch):
    """Several chunks: the first writes the accumulator (no zero fill), the others add to it. One chunk: grad_W is
    written once, in the weight's dtype (no accumulator, no cast). G2 writes each chunk's rows once."""
    calls = record_gemms(monkeypatch)
    cfg = PolicyLossConfig(loss_type="grpo", beta=0.04)
    params, case = make_head(11, B, T, D, V, cfg, dtype=dtype)
    out, grads = run_fused(params, case, cfg, chunk_size=chunk)
    n = int(case["completion_mask"].sum())
    k = 1 if chunk is None else -(-n // chunk)
    head = [(name, dt) for name, shape, dt in calls if shape == (V, D)]
    assert head == [("mm_into", dtype)] + [("addmm_into", torch.float64)] * (k - 1)
    assert sum(shape[0] for name, shape, _ in calls if shape != (V, D) and name == "mm_into") == n
    ref, ref_grads = run_reference(params, case, cfg)
    tol = (1e-9, 1e-11) if dtype == torch.float64 else (2e-2, 2e-2)
    assert_close(out, grads, ref, ref_grads, *tol)


@pytest.fixture
def launches():
    """The row and scale kernels' launches: ``rows`` or ``scale``."""
    seen = []
    _rows.add_pre_run_hook(lambda *a, **kw: seen.append("rows"))
    _scale_rows.add_pre_run_hook(lambda *a, **kw: seen.append("scale"))
    yield seen
    _rows.pre_run_hooks.clear()
    _scale_rows.pre_run_hooks.clear()


@pytest.mark.parametrize("cfg", [DAPO, GSPO], ids=["single", "two-phase"])
def test_announced_and_other_upstream_gradients(cfg, launches):
    """``grad_scale`` (a float or a device tensor) is the upstream gradient the forward computes the gradients for;
    the backward is one launch per gradient, which leaves them as they are when it is the upstream gradient and
    rescales them otherwise."""
    params, case = make_head(12, B, T, D, V, cfg, bias=True, masked_row=True)
    ref, ref_grads = run_reference(params, case, cfg)
    on_device = torch.tensor(0.5, dtype=torch.float64, device=params[0].device)
    for announced, applied in ((0.25, 0.25), (on_device, 0.5), (1.0, 3.0), (0.5, -2)):
        for p in params:
            p.grad = None
        out = fused_linear_policy_loss(
            params[0], params[1], case["completion_ids"], case["completion_mask"], case["advantages"],
            bias=params[2], config=cfg, chunk_size=4, grad_scale=announced, **kwargs_of(case),
        )  # fmt: skip
        launches.clear()
        (out.loss * applied).backward()
        assert launches == ["scale"] * 3
        for g, r in zip((p.grad for p in params), ref_grads, strict=True):
            torch.testing.assert_close(g, r * applied, rtol=1e-9, atol=1e-11 * r.abs().max().item())


def test_second_backward_raises():
    (h, w, _), case = make_head(13, B, T, D, V, DAPO)
    out = fused_linear_policy_loss(h, w, case["completion_ids"], case["completion_mask"], case["advantages"],
                                   config=DAPO, **kwargs_of(case))  # fmt: skip
    out.loss.backward(retain_graph=True)
    with pytest.raises(ValueError, match="second backward"):
        out.loss.backward()


@pytest.mark.parametrize("chunk", [1, 3, 5, None])
def test_overlapped_schedule_is_the_same_loss(chunk, monkeypatch):
    """Halves of each chunk, the row kernel on the second stream (in order here): the same loss and gradients,
    with one row-kernel launch a half."""
    params, case = make_head(14, B, T, D, V, DAPO, bias=True, masked_row=True)
    halves = []

    def fused_rows(plan, z, *args, **kw):
        halves.append(z.shape[0])
        launch.fused_rows(plan, z, *args, **kw)

    monkeypatch.setattr(chunked, "fused_rows", fused_rows)
    with overlapped():
        out, grads = run_fused(params, case, DAPO, chunk_size=chunk)
    n = int(case["completion_mask"].sum())
    assert sum(halves) == n and len(halves) == sum(1 + (c1 - c0 > 1) for c0, c1 in chunked.chunk_spans(n, chunk or n))
    ref, ref_grads = run_reference(params, case, DAPO)
    assert_close(out, grads, ref, ref_grads, 1e-9, 1e-11)


def test_tied_embeddings():
    """The head is the input embedding: its gradient is the sum of both uses, as with materialised logits."""
    g = torch.Generator().manual_seed(15)
    params, case = make_head(15, B, T, D, V, DAPO)
    weight = params[1].detach().clone().requires_grad_()
    inputs = torch.randint(0, V, (B, T), generator=g).to(weight.device)
    mix = (torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5).to(weight.device)

    def loss_of(head):
        hidden = torch.tanh(torch.nn.functional.embedding(inputs, weight) @ mix)
        return head(hidden)

    fused = loss_of(lambda h: fused_linear_policy_loss(
        h, weight, case["completion_ids"], case["completion_mask"], case["advantages"], config=DAPO, chunk_size=5,
        **kwargs_of(case),
    ).loss)  # fmt: skip
    (got,) = torch.autograd.grad(fused, weight)
    exact = loss_of(lambda h: naive_policy_loss(
        linear_logits(h, weight), case["completion_ids"], case["completion_mask"], case["advantages"], config=DAPO,
        **kwargs_of(case),
    ).loss)  # fmt: skip
    (want,) = torch.autograd.grad(exact, weight)
    torch.testing.assert_close(fused, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_token_rows_are_the_unmasked_positions():
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]])
    assert chunked.token_rows(mask, 4).tolist() == [0, 2, 3, 6]
    assert chunked.token_rows(mask.bool(), 4).tolist() == [0, 2, 3, 6]


@pytest.mark.cuda
def test_one_host_sync_and_the_overlapped_streams_cuda():
    """On a GPU: the forward syncs once (the token count that sizes the chunks), the backward never; the overlapped
    schedule (row kernel on a second stream) gives the serial schedule's loss and gradients. Only torch's sync warnings
    count, not the notice it gives once a process when the debug mode is first set ("... does not yet detect all
    synchronizing operations")."""
    import warnings

    g = torch.Generator(device="cuda").manual_seed(0)
    Bq, Tq, Dq, Vq = 4, 512, 256, 32000
    h = torch.randn(Bq, Tq, Dq, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(Vq, Dq, device="cuda", generator=g) / Dq**0.5 * 2).bfloat16().requires_grad_()
    ids = torch.randint(0, Vq, (Bq, Tq), device="cuda", generator=g)
    mask = (torch.arange(Tq, device="cuda") < torch.tensor([[512], [400], [300], [17]], device="cuda")).long()
    adv = torch.randn(Bq, device="cuda", generator=g)
    ref = -torch.rand(Bq, Tq, device="cuda", generator=g) * 5
    for overlap in (False, True):  # first calls: compiles, cached parameter tensors, the second stream
        with overlapped(overlap):
            fused_linear_policy_loss(h, w, ids, mask, adv, ref_logps=ref, config=DAPO, chunk_size=384).loss.backward()
    results = []
    for overlap in (False, True):
        with overlapped(overlap), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fused_linear_policy_loss(h, w, ids, mask, adv, ref_logps=ref, config=DAPO, chunk_size=384)
                forward_syncs = sum("called a synchronizing CUDA operation" in str(c.message) for c in caught)
                torch.cuda.set_sync_debug_mode("error")
                grads = torch.autograd.grad(out.loss, (h, w))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert forward_syncs == 1
        results.append((out.loss.float(), *(x.float() for x in grads)))
    for a, b in zip(*results, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-2
