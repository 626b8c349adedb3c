"""The policy-loss kernels compile for an H100 (sm_90) on a machine without a GPU, with vectorised row I/O and
no register spills: the interpreter alone would not catch code the GPU compiler rejects."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from papo_kernels import PolicyLossConfig, fused_linear_policy_loss, policy_loss
from papo_kernels.loss import launch, split
from papo_kernels.loss.batch import _count_kernel, _finalize_kernel, _quantile_kernel, _sequence_kernel
from papo_kernels.loss.rows import _rows, _scale_rows
from papo_kernels.loss.split import _split_rows
from tests.kernels import _aot_compile

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs compile the kernels for real")

KERNELS = {
    "papo_kernels.loss.rows:_rows": _rows,
    "papo_kernels.loss.rows:_scale_rows": _scale_rows,
    "papo_kernels.loss.batch:_count_kernel": _count_kernel,
    "papo_kernels.loss.batch:_sequence_kernel": _sequence_kernel,
    "papo_kernels.loss.batch:_finalize_kernel": _finalize_kernel,
    "papo_kernels.loss.batch:_quantile_kernel": _quantile_kernel,
    "papo_kernels.loss.split:_split_rows": _split_rows,
}
SM90_SMS = 132  # an H100 SXM's or H200's SMs
CONFIGS = [
    PolicyLossConfig(loss_type="dapo"),
    PolicyLossConfig(
        loss_type="grpo",
        importance_sampling_level="sequence",
        beta=0.04,
        entropy_coef=0.01,
        delta=1.5,
        use_bias_correction_kl=True,
    ),  # fmt: skip
    PolicyLossConfig(loss_type="cispo", epsilon_high=5.0, beta=0.1),
    PolicyLossConfig(loss_type="sapo", entropy_coef=0.1),
    PolicyLossConfig(loss_type="vespo", importance_sampling_level="sequence", beta=0.04, entropy_coef=0.01,
                     top_entropy_quantile=0.2, off_policy_mask_threshold=0.1, use_bias_correction_kl=True),
]  # fmt: skip


def _run_cases():
    g = torch.Generator().manual_seed(0)
    for cfg in CONFIGS:
        for dtype, V in ((torch.bfloat16, 2 * 4096 + 64), (torch.float32, 100)):
            B, T = 2, 4
            x = torch.randn(B, T, V, dtype=dtype, generator=g).requires_grad_()
            ids = torch.randint(0, V, (B, T), generator=g)
            kw = {"ref_logps": torch.randn(B, T, generator=g)} if cfg.beta else {}
            if cfg.loss_type in ("cispo", "vespo"):
                kw |= {"old_logps": torch.randn(B, T, generator=g), "importance_sampling_ratio": torch.rand(B, 1)}
            if cfg.off_policy_mask_threshold is not None:
                kw["sampling_logps"] = torch.randn(B, T, generator=g)
            out = policy_loss(x, ids, torch.ones(B, T, dtype=torch.bool), torch.randn(B, generator=g), config=cfg, **kw)
            out.loss.backward()
    # the benchmark's vocabularies in bf16 (DAPO, k3 KL, entropy; padded), in place, and a forward without gradient,
    # on both tiles (the one-warp tile, and the wide one that wider vocabularies take)
    cfg = PolicyLossConfig(loss_type="dapo", beta=0.04, entropy_coef=0.01)
    small_v = launch.SMALL_V
    try:
        for V, launch.SMALL_V in ((151936, small_v), (32000, small_v), (151936, 0)):
            x = torch.randn(1, 3, V, dtype=torch.bfloat16, generator=g).requires_grad_()
            ids, adv, ref = torch.randint(0, V, (1, 3), generator=g), torch.randn(1, generator=g), torch.randn(1, 3)
            mask = torch.tensor([[1, 1, 0]])
            policy_loss(x, ids, mask, adv, ref_logps=ref, config=cfg, inplace_grad=True).loss.backward()
            with torch.no_grad():
                policy_loss(x, ids, mask, adv, ref_logps=ref, config=cfg)
    finally:
        launch.SMALL_V = small_v
    # the split-row kernel: the benchmark's vocabularies, with and without the KL and the entropy bonus, softcapped
    # compacted rows below (the interpreter walks the slices; the GPU variant is compiled from these launches)
    launch.ROW_KERNEL = "split"
    try:
        for V, split_cfg in ((151936, cfg), (32000, PolicyLossConfig(loss_type="dapo"))):
            x = torch.randn(1, 2, V, dtype=torch.bfloat16, generator=g).requires_grad_()
            ids, adv, ref = torch.randint(0, V, (1, 2), generator=g), torch.randn(1, generator=g), torch.randn(1, 2)
            policy_loss(x, ids, torch.ones(1, 2), adv, ref_logps=ref, config=split_cfg).loss.backward()
        _fused_linear_cases(g)
    finally:
        launch.ROW_KERNEL = "rows"
    _fused_linear_cases(g)


def _fused_linear_cases(g):
    # the fused linear head: compacted rows, softcapping, bf16 chunks
    h = torch.randn(2, 4, 16, dtype=torch.bfloat16, generator=g).requires_grad_()
    w = torch.randn(4096 + 64, 16, dtype=torch.bfloat16, generator=g).requires_grad_()
    for cfg in CONFIGS[:2] + CONFIGS[-1:]:
        ids = torch.randint(0, w.shape[0], (2, 4), generator=g)
        kw = {"ref_logps": torch.randn(2, 4, generator=g)} if cfg.beta else {}
        kw |= {"old_logps": torch.randn(2, 4, generator=g)} if cfg.loss_type == "vespo" else {}
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # padding: compacted rows
        out = fused_linear_policy_loss(h, w, ids, mask, torch.randn(2, generator=g), config=cfg,
                                       final_logit_softcapping=30.0, chunk_size=3, **kw)  # fmt: skip
        out.loss.backward()
    # packed sequences (one empty), single and two phases, per-sequence IS ratio
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32)
    for cfg in CONFIGS[:1] + CONFIGS[-1:]:
        x = torch.randn(1, 5, 100, generator=g).requires_grad_()
        kw = {name: torch.randn(1, 5, generator=g) for name in ("old_logps", "sampling_logps", "ref_logps")}
        kw["importance_sampling_ratio"] = torch.rand(3, 1, generator=g)
        ids, adv = torch.randint(0, 100, (1, 5), generator=g), torch.randn(3, generator=g)
        policy_loss(x, ids, torch.ones(1, 5), adv, cu_seqlens=cu, config=cfg, **kw).loss.backward()


def gpu_variants(calls):
    """The split kernel's launches as the GPU makes them (cooperative, not walked), holding the slice in registers
    and reading it again."""
    for key, args, kwargs in calls:
        if key.endswith(":_split_rows"):
            for reread in (False, True):
                yield key, args, dict(kwargs, WALK=False, REREAD=reread)
        else:
            yield key, args, kwargs


def test_kernels_compile_for_sm90(tmp_path):
    calls = _aot_compile.record(KERNELS)
    try:
        _run_cases()
    finally:
        _aot_compile.stop(KERNELS)
    calls = list(gpu_variants(calls))
    path = tmp_path / "calls.pkl"
    path.write_bytes(pickle.dumps(calls))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._aot_compile", str(path)], capture_output=True, text=True, env=env,
        timeout=600, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    if "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("this Triton build has no CUDA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {k.split(":")[1] for k in KERNELS}
    for r in rows:
        assert r["local_bytes"] == 0, r  # no spills
    assert any(r["constexprs"].get("HAS_ROWS") and r["constexprs"].get("HAS_SOFTCAP") for r in rows)
    # aligned rows of at least 8 elements a thread (a 16-byte bf16 vector; the linear head's gradients have rows of D)
    wide = [r for r in rows if r["kernel"] in ("_rows", "_scale_rows") and r["constexprs"]["ALIGNED"]
            and r["constexprs"]["BLOCK"] >= 8 * 32 * r["num_warps"]]  # fmt: skip
    assert wide and all(r["vector_loads"] > 0 for r in wide), wide
    assert all(r["vector_stores"] > 0 for r in wide if r["constexprs"].get("GRAD", True)), wide
    modes = {(r["constexprs"]["STATS"], r["constexprs"]["GRAD"]) for r in rows if r["kernel"] == "_rows"}
    assert modes == {(True, True), (True, False), (False, True)}
    assert {r["constexprs"]["LANES"] for r in rows if r["kernel"] == "_rows"} == {True, False}  # both tiles
    for r in rows:  # one program of the widest blocks fits an SM's registers: rows in flight are what we ask
        assert r["registers"] * 32 * r["num_warps"] <= 65536, r
    # the split kernel: within the register budget its occupancy assumes, so a grid of whole groups sized from the
    # compiled kernel is co-resident; vector loads and stores of the slices
    splits = [r for r in rows if r["kernel"] == "_split_rows"]
    assert {r["constexprs"]["REREAD"] for r in splits} == {False, True}
    assert any("ROWS" not in r["constexprs"] and r["constexprs"]["HAS_SOFTCAP"] for r in splits)  # ROWS: a tensor
    for r in splits:
        assert r["registers"] <= split.REGISTER_BUDGET, r
        per_sm = split.programs_per_sm(r["registers"], r["num_warps"], r["shared"])
        assert per_sm * r["num_warps"] >= 16, r  # 16 warps an SM, the occupancy the budget is for
        K = r["constexprs"]["K"]
        groups = split.split_groups(16384, K, SM90_SMS * per_sm)
        assert groups >= 1 and groups * K <= SM90_SMS * per_sm, r
        if r["constexprs"]["V"] >= split.SLICE:  # full slices: 16-byte loads and stores
            assert r["vector_loads"] > 0 and r["vector_stores"] > 0, r
