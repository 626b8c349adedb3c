"""RubricJudge throughput against a local OpenAI-compatible server that takes 50 ms per request.

The server (``papo_trl.rewards.judge_server``) runs in its own process so that it does not share the
client's interpreter; every completion is distinct and the cache is off, so each one is one HTTP request.
For concurrency c the ideal rate is ``c / latency``; ``efficiency`` is the measured fraction of it, and
``client_cpu_ms`` the judge process's CPU time per request (the cost a trainer process pays). CPU only.

    python benchmarks/bench_judge.py            # concurrency 1, 16, 64
    python benchmarks/bench_judge.py --quick    # smoke test
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from harness import arg_parser, write_result

from papo_trl.rewards import RubricJudge

LATENCY_S = 0.05
CONCURRENCY = (1, 16, 64)


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "papo_trl.rewards.judge_server", "--port", "0", "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"judge server did not start: {line!r}")
    return proc, line.removeprefix("listening on ")


def measure(base_url: str, concurrency: int, n: int) -> dict:
    judge = RubricJudge(base_url, max_concurrency=concurrency, cache_size=0, request_timeout=30.0, batch_deadline=600.0)

    async def run() -> tuple[list, float, float]:
        try:
            await judge(prompts=["warm-up"] * concurrency, completions=[f"w{i}" for i in range(concurrency)])
            judge.reset()
            wall, cpu = time.perf_counter(), time.process_time()
            scores = await judge(prompts=["What is 2 + 2?"] * n, completions=[f"2 + 2 = 4 (#{i})" for i in range(n)])
            return scores, time.perf_counter() - wall, time.process_time() - cpu
        finally:
            await judge.aclose()

    scores, wall, cpu = asyncio.run(run())
    stats = judge.stats()
    if scores.count(1.0) != n or stats["judge/requests"] != n:
        raise RuntimeError(f"concurrency {concurrency}: expected {n} scored requests, got {stats}")
    return {
        "method": "RubricJudge",
        "concurrency": concurrency,
        "requests": n,
        "seconds": wall,
        "requests_per_s": n / wall,
        "ideal_requests_per_s": concurrency / LATENCY_S,
        "efficiency": n / wall / (concurrency / LATENCY_S),
        "client_cpu_ms": 1e3 * cpu / n,
        "latency_p50_ms": 1e3 * stats["judge/latency_p50"],
        "latency_p99_ms": 1e3 * stats["judge/latency_p99"],
    }


def main() -> None:
    args = arg_parser(__doc__, rows=False).parse_args()
    proc, base_url = start_server(LATENCY_S)
    try:
        rows = [measure(base_url, c, (10 if c == 1 else 4 * c) if args.quick else max(60, 20 * c)) for c in CONCURRENCY]
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"{'conc':>5} {'req':>6} {'req/s':>8} {'ideal':>7} {'eff':>6} {'cpu ms/req':>10} {'p50 ms':>7} {'p99 ms':>7}")
    for r in rows:
        print(
            f"{r['concurrency']:>5} {r['requests']:>6} {r['requests_per_s']:>8.1f} {r['ideal_requests_per_s']:>7.0f} "
            f"{r['efficiency']:>6.2f} {r['client_cpu_ms']:>10.2f} {r['latency_p50_ms']:>7.1f} "
            f"{r['latency_p99_ms']:>7.1f}"
        )
    path = write_result(
        "judge", {"server_latency_s": LATENCY_S, "cpu_count": os.cpu_count(), "quick": args.quick, "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
