"""The split-row loss kernel on a GPU, in at most 4 minutes: parity, a barrier stress run, then timings side by side.

Stages, each a subprocess under its own time limit (a hang loses that stage only):

1. ``parity`` (60 s): ``tests/kernels/test_split_rows.py`` on CUDA (the real barrier with K = 3 and 5 programs a row,
   and K = 1), the sm_90 occupancy arithmetic, and no host sync in the loss with either kernel.
2. ``stress`` (60 s): 200 launches at V = 151,936, 4,096 rows, random masks and ids: every run must give the same
   bits (a race shows as a moving result), within bf16 rounding of the row kernel.
3. ``timing`` (100 s): forward + backward of DAPO + k3 KL (+ entropy bonus) from bf16 logits, on-policy: V = 151,936
   at 16k tokens (0% and 25% padding) and 32k (25%), V = 32,000 at 16k: the row kernel, the split kernel (slice in
   registers, and read again) in place and out of place, with and without the entropy bonus, and Liger's
   ``triton_grpo_loss`` (in place, no entropy term: like for like with ours in place without the bonus) where installed;
   ``triton.testing.do_bench`` medians of >= 10 samples with min and max, and the fraction of the one-read-one-write
   floor at the measured copy rate (the zeros written to padded rows counted).

    python -m benchmarks.split_check [--out DIR] [--only parity|stress|timing]

Writes ``DIR/split_check.json`` (default ``$OUT`` or ``benchmarks/results/<device>/``) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"parity": 60, "stress": 60, "timing": 100}
KERNELS = ("rows", "split", "split-reread")


def _stage_parity() -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_split_rows.py",
         "tests/kernels/test_split_barrier.py", "tests/kernels/test_policy_loss.py::test_no_host_sync_cuda"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    return {"returncode": proc.returncode, "summary": tail, "failures": [
        line for line in proc.stdout.splitlines() if line.startswith("FAILED")]}  # fmt: skip


def _inputs(tokens: int, V: int, pad: float, seed: int = 0, extra_position: bool = False):
    """bf16 logits ``[B, T (+ 1), V]`` (sequences of 1,024 tokens, the last ``pad`` of each padded), ids, mask,
    advantages, and reference and old log-probs near the policy's own (every loss term matters)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    T = min(1024, tokens)
    B = tokens // T
    logits = torch.randn(B, T + extra_position, V, device="cuda", dtype=torch.bfloat16, generator=g) * 2
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    mask = torch.ones(B, T, device="cuda", dtype=torch.int64)
    mask[:, T - int(T * pad) :] = 0
    adv = torch.randn(B, device="cuda", generator=g)
    logps = torch.log_softmax(logits[:, :T].float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    ref = logps + 0.1 * torch.randn(B, T, device="cuda", generator=g)
    old = logps + 0.05 * torch.randn(B, T, device="cuda", generator=g)
    return logits, ids, mask, adv, ref, old


def _use(kernel: str) -> None:
    from papo_kernels.loss import launch

    launch.ROW_KERNEL = kernel


def _stage_stress() -> dict:
    import torch

    from papo_kernels import PolicyLossConfig, policy_loss

    cfg = PolicyLossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=0.01)
    logits, ids, mask, adv, ref, old = _inputs(4096, 151936, 0.25, seed=1)
    mask[:, ::7] = 0  # masked rows among the live ones
    runs = {}
    for kernel in KERNELS:
        _use(kernel)
        outs = []
        for _ in range(200 if kernel != "rows" else 2):
            x = logits.clone().requires_grad_()
            out = policy_loss(x, ids, mask, adv, old_logps=old, ref_logps=ref, config=cfg)
            out.loss.backward()
            outs.append((out.loss.detach(), x.grad))
        torch.cuda.synchronize()
        first_loss, first_grad = outs[0]
        runs[kernel] = {
            "same_bits_every_run": all(torch.equal(l, first_loss) and torch.equal(g, first_grad) for l, g in outs),
            "loss": first_loss.item(), "grad": first_grad,
        }  # fmt: skip
    base = runs["rows"]
    result = {}
    for kernel, r in runs.items():
        g, g0 = r.pop("grad").float(), base["grad"].float()
        result[kernel] = dict(r, rel_loss=abs(r["loss"] - base["loss"]) / abs(base["loss"]),
                              rel_grad=((g - g0).norm() / g0.norm()).item())  # fmt: skip
    return result


def _copy_rate() -> float:
    """Device-to-device copy rate, bytes read plus written a second (the floor's bandwidth)."""
    import torch
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def _stage_timing() -> dict:
    import torch

    rate = _copy_rate()
    rows = []
    for V, tokens, pad in ((151936, 16384, 0.0), (151936, 16384, 0.25), (151936, 32768, 0.25), (32000, 16384, 0.0)):
        rows += _time_case(V, tokens, pad, rate)
        torch.cuda.empty_cache()
    _use("rows")
    return {"copy_rate_bytes_per_s": rate, "rows": rows, "device": torch.cuda.get_device_name()}


def _time_case(V: int, tokens: int, pad: float, rate: float) -> list[dict]:
    import dataclasses

    from benchmarks.peers import liger_available, liger_grpo_loss
    from papo_kernels import PolicyLossConfig, policy_loss

    # Liger reads [B, T + 1, V] and shifts; ours reads the first T positions of the same buffer
    full, ids, mask, adv, ref, _ = _inputs(tokens, V, pad, extra_position=True)
    floor_s = (int(mask.sum()) + mask.numel()) * V * full.element_size() / rate  # read the live rows, write all
    rows = []
    for bonus in (0.01, 0.0):
        cfg = PolicyLossConfig(loss_type="dapo", epsilon_high=0.28, beta=0.04, entropy_coef=bonus)
        for inplace in (False, True):
            for kernel in KERNELS:
                _use(kernel)

                def ours(inplace=inplace, cfg=cfg):
                    x = full.detach().requires_grad_()
                    out = policy_loss(x[:, :-1], ids, mask, adv, ref_logps=ref, config=cfg, inplace_grad=inplace)
                    out.loss.backward()

                rows.append(_time(ours, f"ours-{kernel}", V, tokens, pad, bonus, inplace, floor_s))
        if liger_available() and bonus == 0.0:  # Liger has no entropy term, and writes its gradient in place
            loss_fn = liger_grpo_loss(dataclasses.replace(cfg, entropy_coef=0.0))

            def liger(loss_fn=loss_fn):
                x = full.detach().requires_grad_()
                loss_fn(x, ids, mask, adv, ref).backward()

            try:
                rows.append(_time(liger, "liger", V, tokens, pad, bonus, True, floor_s))
            except Exception as e:  # noqa: BLE001 - a peer's failure is a row, not the end
                rows.append({"method": "liger", "V": V, "tokens": tokens, "pad": pad, "error": repr(e)[:300]})
    return rows


def _time(fn, method, V, tokens, pad, bonus, inplace, floor_s) -> dict:
    import triton.testing

    fn()
    samples = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="all")
    samples = sorted(samples)
    median = samples[len(samples) // 2]
    return {
        "method": method, "V": V, "tokens": tokens, "pad": pad, "entropy_coef": bonus, "inplace": inplace,
        "ms_median": median, "ms_min": samples[0], "ms_max": samples[-1], "samples": len(samples),
        "fraction_of_floor": floor_s * 1e3 / median,
    }  # fmt: skip


def _run_stage(name: str) -> dict:
    return {"parity": _stage_parity, "stress": _stage_stress, "timing": _stage_timing}[name]()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--only", choices=sorted(STAGES))
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # one stage in this process (the parent's subprocess)
    args = parser.parse_args(argv)
    if args.stage:
        print("RESULT " + json.dumps(_run_stage(args.stage), default=str))
        return 0
    import torch

    assert torch.cuda.is_available(), "split_check needs a CUDA GPU"
    device = torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / device
    out.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("PAPO_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # fmt: skip
    result = {"device": torch.cuda.get_device_name(), "commit": commit, "torch": torch.__version__, "stages": {}}
    for name, limit in STAGES.items():
        if args.only and name != args.only:
            continue
        start = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.split_check", "--stage", name], cwd=ROOT,
                                  capture_output=True, text=True, timeout=limit)  # fmt: skip
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            stage = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            stage = {"error": f"timed out after {limit} s (a hang or a slow stage)"}
        stage["seconds"] = round(time.time() - start, 1)
        result["stages"][name] = stage
        (out / "split_check.json").write_text(json.dumps(result, indent=1, default=str))
    for name, stage in result["stages"].items():
        print(f"== {name} ({stage['seconds']} s)")
        if name == "timing" and "rows" in stage:
            for r in stage["rows"]:
                if "error" in r:
                    print(f"{r['method']:>18} V={r['V']} {r['tokens']} error {r['error'][:80]}")
                    continue
                print(f"{r['method']:>18} V={r['V']:>6} tok={r['tokens']:>5} pad={r['pad']:.2f} "
                      f"ent={r['entropy_coef']} inpl={int(r['inplace'])} {r['ms_median']:7.3f} ms "
                      f"[{r['ms_min']:.3f}, {r['ms_max']:.3f}] floor {r['fraction_of_floor']:.2f}")  # fmt: skip
        else:
            print(json.dumps({k: v for k, v in stage.items() if k != "seconds"}, default=str)[:1500])
    return 0


if __name__ == "__main__":
    sys.exit(main())
