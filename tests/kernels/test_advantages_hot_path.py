"""The advantage functions on the hot path: what one call dispatches, what reaches the kernel, value errors
carried in a flag instead of a host sync, and (on CUDA) no sync, few launches and CUDA-graph capture.

On CPU the dispatched torch ops are recorded with a ``TorchDispatchMode`` while the kernel itself is left out of
the record (the interpreter copies its tensors through torch; a CUDA launch dispatches no aten op). The flag is
read at once on CPU, so the CUDA behaviour (``validate=False``: leave it in the result) is selected by patching
``api._raise_now``.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from papo_kernels import dynamic_sampling_mask, gdpo_advantages, grpo_advantages, papo_advantages, pass_rate_buckets
from papo_kernels.advantages import GRPO_EPS, PAPO_EPS, api, fused, naive, types

KERNELS = ("_grpo_kernel", "_gdpo_kernel", "_papo_kernel", "_group_count_kernel")
# allocation by shape and views: what a call may dispatch besides its kernel
ALLOWED = {"empty", "empty_strided", "view", "slice", "select", "split", "split_with_sizes", "alias", "detach"}
NAN, INF = float("nan"), float("inf")
PAPO_07 = dict(lambda_process=0.7, eps=PAPO_EPS, scale_by_std=True, process_norm="correct")  # the reference's options


class _Recorder(TorchDispatchMode):
    """Records the aten ops dispatched outside kernel launches, and every launch with its arguments by name."""

    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.in_kernel = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _Launch:
    def __init__(self, name, kernel, recorder):
        self.name, self.kernel, self.recorder = name, kernel, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.recorder.launches.append((self.name, dict(zip(self.kernel.arg_names, args, strict=False)) | kwargs))
            self.recorder.in_kernel = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.recorder.in_kernel = False

        return launch


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    for name in KERNELS:
        monkeypatch.setattr(fused, name, _Launch(name, getattr(fused, name), rec))
    return rec


@pytest.fixture
def cuda_flag_semantics(monkeypatch):
    """Read the value-error flag only when asked (``validate=True``), as on CUDA."""
    monkeypatch.setattr(api, "_raise_now", lambda error, validate: validate)


def _inputs(dtype, device, N=8 * 40, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(N, 3, generator=g, dtype=torch.float64).round(decimals=1)
    r[torch.rand(N, 3, generator=g) < 0.1] = NAN
    o = (torch.rand(N, generator=g) < 0.5).double()
    p = torch.rand(N, generator=g, dtype=torch.float64).round(decimals=1)
    return [t.to(dtype).to(device) for t in (r, o, p)]


def _calls(dtype, device, validate=False):
    """One call per function and variant, on inputs that need no copy: strided views, a bool and a float
    ``correct``, weights in another dtype than the rewards."""
    r, o, p = _inputs(dtype, device)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, device=device)
    c, finite = o > 0, r[:, 0].nan_to_num()
    kw = dict(validate=validate)
    return {
        "grpo/group": lambda: grpo_advantages(r, 8, weights=w, **kw),
        "grpo/batch": lambda: grpo_advantages(r, 8, scale="batch", **kw),
        "grpo/none/strided-column": lambda: grpo_advantages(r[:, 1], 8, scale="none", **kw),
        "gdpo": lambda: gdpo_advantages(r, 8, weights=w, **kw),
        "papo/bool-correct": lambda: papo_advantages(o, p, c, 8, lambda_process=0.7, **kw),
        "papo/float-correct": lambda: papo_advantages(finite, r[:, 1], o, 8, process_norm="all", **kw),
        "dynamic_sampling_mask": lambda: dynamic_sampling_mask(o, 8, **kw),
        "pass_rate_buckets": lambda: pass_rate_buckets(o, 8, **kw),
    }


CASES = list(_calls(torch.float32, "cpu"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_call_dispatches_one_kernel_and_no_torch_compute(case, dtype, recorder, cuda_flag_semantics, device):
    call = _calls(dtype, device)[case]
    call()  # first call: compiles, creates the cached per-device state and scalar tensors
    recorder.ops.clear(), recorder.launches.clear()
    with recorder:
        call()
    assert len(recorder.launches) == 1
    assert set(recorder.ops) <= ALLOWED, f"{case} dispatched {sorted(set(recorder.ops) - ALLOWED)}"
    # validate=True adds exactly one read of the flag (the one sync on CUDA) and nothing else
    call = _calls(dtype, device, validate=True)[case]
    recorder.ops.clear()
    with recorder:
        call()
    assert [op for op in recorder.ops if op not in ALLOWED] == ["_local_scalar_dense"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scalars_reach_the_kernel_as_tensors_of_the_compute_dtype(dtype, recorder, device):
    for call in _calls(dtype, device).values():
        call()
    out = torch.float64 if dtype == torch.float64 else torch.float32
    scalars = {"papo/bool-correct": [1e-6, 0.7], "papo/float-correct": [1e-6, 1.0]}  # eps, lambda_process
    assert len(recorder.launches) == len(CASES)
    for case, (kernel, args) in zip(CASES, recorder.launches, strict=True):
        floats = {n: v for n, v in args.items() if isinstance(v, float)}
        assert not floats, f"{kernel}: Python floats {floats} would be fp32 on the GPU"
        if "PARAM" in args:  # exactly the scalars, in the output dtype
            assert args["PARAM"].dtype == out
            assert args["PARAM"].tolist() == torch.tensor(scalars.get(case, [1e-4]), dtype=out).tolist()
        if dtype == torch.float64:  # fp64 end to end: every floating tensor the kernel sees is fp64
            for n, v in args.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and n != "W":
                    assert v.dtype == torch.float64, f"{kernel}: {n} is {v.dtype}"


BAD_VALUES = {  # function, its tensor arguments, its other arguments, the flag bits
    "rewards inf": (grpo_advantages, dict(rewards=[1.0, INF]), dict(G=2), types.REWARDS_INF),
    "rewards -inf, batch": (grpo_advantages, dict(rewards=[[1.0], [-INF]]), dict(G=2, scale="batch"),
                            types.REWARDS_INF),
    "gdpo weights nan": (gdpo_advantages, dict(rewards=[[0.0, 1.0]] * 4, weights=[1.0, NAN]), dict(G=2),
                         types.WEIGHTS_NONFINITE),
    "outcome nan": (papo_advantages, dict(outcome=[NAN, 1.0], process=[0.0, 0.0], correct=[1.0, 1.0]), dict(G=2),
                    types.OUTCOME_NONFINITE),
    "process inf": (papo_advantages, dict(outcome=[1.0, 1.0], process=[0.5, INF], correct=[1.0, 1.0]), dict(G=2),
                    types.PROCESS_INF),
    "correct nan, outcome inf": (papo_advantages, dict(outcome=[INF, 1.0], process=[0.0, 0.0], correct=[NAN, 1.0]),
                                 dict(G=2), types.CORRECT_NAN | types.OUTCOME_NONFINITE),
}  # fmt: skip


def _bad_call(case, device, validate=False):
    fn, tensors, kwargs, bits = BAD_VALUES[case]
    tensors = {k: torch.tensor(v, device=device) for k, v in tensors.items()}
    return fn(**tensors, **kwargs, validate=validate), tensors, bits


def _pattern(msg: str) -> str:
    return msg.replace("+", r"\+").replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_value_errors_are_carried_in_the_result(case, cuda_flag_semantics, device):
    out, tensors, bits = _bad_call(case, device)  # no raise: on CUDA nothing has been read back yet
    assert int(out.error) == bits
    assert int(naive.value_errors(**tensors)) == bits  # the reference computes the same flag
    for bit, msg in types.MESSAGES.items():
        if bit & bits:
            with pytest.raises(ValueError, match=_pattern(msg)):
                out.check()
    # the state the programs share is reset in-kernel: the next clean call reports no error
    clean = grpo_advantages(torch.zeros(8, device=device), 4, scale="batch", validate=False)
    assert int(clean.error) == 0 and clean.check() is clean
    assert all(int(s.abs().sum()) == 0 for s in fused._states.values())


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_cpu_raises_at_once_even_without_validate(case):
    bits = BAD_VALUES[case][3]
    with pytest.raises(ValueError, match=_pattern(types.MESSAGES[bits & -bits])):
        _bad_call(case, "cpu")


def test_flagged_tensor_results_check_only_when_asked(recorder, cuda_flag_semantics, device):
    bad = torch.tensor([1.0, NAN, 0.0, 1.0], device=device)
    assert dynamic_sampling_mask(bad, 2, validate=False).tolist() == [True, True]
    assert pass_rate_buckets(bad, 2, validate=False).tolist() == [2, 1]
    with pytest.raises(ValueError, match="`outcome` must be finite"):
        dynamic_sampling_mask(bad, 2, validate=True)
    with pytest.raises(ValueError, match="`correct` contains NaN"):
        pass_rate_buckets(bad, 2, validate=True)
    flags = bad > 0
    with recorder:  # bool values have nothing to check: validate=True reads nothing back either
        buckets, keep = pass_rate_buckets(flags, 2, validate=True), dynamic_sampling_mask(flags, 2, validate=True)
    assert set(recorder.ops) <= ALLOWED and buckets.tolist() == [1, 1] and keep.tolist() == [True, True]


@pytest.mark.parametrize("G", [3, 8])
def test_batch_statistics_merge_across_many_programs(G, monkeypatch, device):
    """Small tiles, so the last program merges many partials, one of them from an all-NaN tile; fp64 at 1e-12."""
    monkeypatch.setattr(fused, "TILE", 16)
    r, o, p = _inputs(torch.float64, device, N=G * 48, seed=G)
    r[: 2 * 16] = NAN  # the first programs hold only unscorable rows: empty partials
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64, device=device)
    tol = dict(atol=1e-12, rtol=1e-12, equal_nan=True)
    pairs = [
        (grpo_advantages(r, G, weights=w, scale="batch"), naive.naive_grpo_advantages(r.cpu(), G, weights=w.cpu(),
                                                                               scale="batch", eps=GRPO_EPS)),
        (gdpo_advantages(r, G, weights=w), naive.naive_gdpo_advantages(r.cpu(), G, weights=w.cpu(), eps=GRPO_EPS)),
        (papo_advantages(o, p, o > 0, G, lambda_process=0.7),
         naive.naive_papo_advantages(o.cpu(), p.cpu(), o.cpu() > 0, G, **PAPO_07)),
    ]  # fmt: skip
    for got, ref in pairs:
        for x, y in zip(got, ref, strict=True):
            torch.testing.assert_close(x.cpu(), y.cpu().to(x.dtype), **tol)


# ------------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
def test_cuda_no_sync_and_at_most_two_launches():
    from benchmarks.harness import device_profile

    calls = _calls(torch.float32, "cuda")
    for name, call in calls.items():
        call()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts = device_profile(call)  # the profiler's kernels and memcpy/memset operations of one call
        assert counts["kernels"] + counts["copies"] <= 2 and counts["syncs"] == 0, (name, counts)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_graph_capture_and_replay(dtype):
    r, o, p = _inputs(dtype, "cuda")
    c = o > 0
    w = torch.tensor([1.0, 0.5, 2.0], dtype=dtype, device="cuda")

    def run():
        return (
            grpo_advantages(r, 8, weights=w, scale="batch", validate=False),
            gdpo_advantages(r, 8, weights=w, validate=False),
            papo_advantages(o, p, c, 8, lambda_process=0.7, validate=False),
        )

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile; create this stream's state and the scalar tensors outside the capture
            run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        outs = run()
    r2, o2, p2 = _inputs(dtype, "cuda", seed=1)
    r.copy_(r2), o.copy_(o2), p.copy_(p2), c.copy_(o2 > 0)
    graph.replay()
    torch.cuda.synchronize()
    refs = (
        naive.naive_grpo_advantages(r.cpu(), 8, weights=w.cpu(), scale="batch", eps=GRPO_EPS),
        naive.naive_gdpo_advantages(r.cpu(), 8, weights=w.cpu(), eps=GRPO_EPS),
        naive.naive_papo_advantages(o.cpu(), p.cpu(), c.cpu(), 8, **PAPO_07),
    )
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for got, ref in zip(outs, refs, strict=True):
        for x, y in zip(got, ref, strict=True):
            torch.testing.assert_close(x.cpu(), y.to(x.dtype), equal_nan=True, **tol)
    r[0, 0] = INF  # a value error inside a replay is flagged, and the next replay is clean again
    graph.replay()
    with pytest.raises(ValueError, match="`rewards` contains"):
        outs[0].check()
    r[0, 0] = 1.0
    graph.replay()
    assert outs[0].check() is outs[0] and int(outs[1].error) == 0
