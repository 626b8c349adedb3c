r"""``RubricJudge``: PAPO's process reward, an LLM judge over any OpenAI-compatible server, as a TRL async reward.

For every completion the judge renders the rubric prompt (:mod:`.rubric`) from the problem (a ``problem`` /
``question`` column, else the prompt's last user message), the reference solution when the dataset has one
(``reference_solution`` / ``solution`` column) and the student solution with its ``<think>`` removed, and
reads ``s in valid_scores`` (default {0, 0.5, 1}) from the reply. TRL awaits ``judge(prompts=...,
completions=..., completion_ids=..., **columns)`` on its reward event loop; ``PAPOTrainer`` calls it on the
correct responses only. A ``None`` completion comes back ``None`` without a request.

Robustness, per call (one training step's batch): at most ``max_concurrency`` requests in flight, each bounded
by ``request_timeout``; timeouts, connection errors, 5xx and 429 are retried ``max_retries`` times after
``min(backoff_max, backoff_base * 2**(k-1)) * U(0.5, 1)`` seconds (other 4xx are not); identical requests are
sent once and successful scores are cached (LRU, keyed on the full judge prompt, hence on problem, reference,
completion and rubric, plus the model); whatever is still pending ``batch_deadline`` seconds after the call
began is cancelled. Every failure - transport, HTTP, unparseable or empty verdict, deadline - yields ``None``
(TRL's NaN: left out of the process statistics) and is counted by kind, never scored 0. :meth:`stats` returns
the counters as a flat ``{"judge/...": float}`` dict for the trainer's logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any

import openai

from .rubric import DEFAULT_VALID_SCORES, RUBRIC_3_TIER, build_judge_prompt, message_text, parse_score, prompt_problem
from .rubric import strip_think as _strip_think

__all__ = ["FAILURE_KINDS", "RubricJudge"]

logger = logging.getLogger(__name__)

FAILURE_KINDS = (
    "timeout",
    "connection",
    "server_error",
    "rate_limited",
    "client_error",
    "invalid_response",
    "empty",
    "unparseable",
    "deadline",
    "other",
)
"""Why a completion got ``None``: the keys of ``judge/failures/<kind>``."""


def _classify(err: BaseException) -> tuple[str, bool]:
    """(failure kind, retry?) of an exception raised by one request."""
    if isinstance(err, (asyncio.TimeoutError, openai.APITimeoutError)):
        return "timeout", True
    if isinstance(err, openai.APIConnectionError):
        return "connection", True
    if isinstance(err, openai.APIStatusError):
        if err.status_code >= 500:
            return "server_error", True
        return ("rate_limited", True) if err.status_code == 429 else ("client_error", False)
    if isinstance(err, (openai.APIResponseValidationError, ValueError)):
        return "invalid_response", False
    return "other", False


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    return float(sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)])


class RubricJudge:
    """Async rubric-judge reward function (see the module docstring); pass it in ``process_reward_funcs``.

    Args:
        base_url: the server's OpenAI API root, e.g. ``"http://localhost:8000/v1"`` for ``vllm serve``.
        model: the served model name (``openai/gpt-oss-20b`` in the paper).
        api_key: sent as a bearer token (vLLM ignores it unless started with ``--api-key``).
        rubric: the scoring-rubric section of the prompt (default: the official 3-tier rubric).
        valid_scores: the scores a verdict may take; anything else is unparseable.
        max_concurrency: requests in flight at once (per event loop, shared by concurrent calls).
        request_timeout: seconds for one request, connection to last byte.
        max_retries: extra attempts after a timeout, connection error, 5xx or 429.
        backoff_base, backoff_max: exponential backoff bounds in seconds (jittered by ``U(0.5, 1)``).
        batch_deadline: seconds for a whole call; pending requests then return ``None`` (``None``: no limit).
        temperature, max_tokens: sampling settings sent with every request (``None``: server default).
        system_prompt: an optional system message before the rubric prompt.
        request_kwargs: extra keyword arguments for ``chat.completions.create`` (``reasoning_effort``,
            ``extra_body``, ...).
        problem_keys, reference_keys: dataset columns tried, in order, for the problem and the reference.
        cache_size: successful verdicts kept (LRU); 0 disables the cache.
        metrics_prefix: prefix of the :meth:`stats` keys.
        log_metrics: also report each call's counters through TRL's ``log_metric`` hook when it is passed
            (for a plain ``GRPOTrainer``; ``PAPOTrainer`` logs :meth:`stats` itself).
        name: the reward's ``__name__`` (TRL's logging key).
        seed: seeds the backoff jitter.

    Returns:
        An async callable with TRL's reward signature: ``await judge(prompts=..., completions=..., **columns)``
        gives one score in ``valid_scores`` or ``None`` per completion; :meth:`stats` gives its counters.

    Examples:
        >>> import asyncio
        >>> from papo_trl.rewards import RubricJudge
        >>> from papo_trl.rewards.judge_server import LocalJudgeServer
        >>> with LocalJudgeServer(default_score=0.5) as server:  # a local stand-in for `vllm serve`
        ...     judge = RubricJudge(server.base_url, model="openai/gpt-oss-20b")
        ...     asyncio.run(judge(prompts=["What is 17 * 3?"], completions=["17 * 3 = 51, so 51."]))
        [0.5]
        >>> judge.stats()["judge/requests"], judge.stats()["judge/failures"]
        (1.0, 0.0)
    """

    def __init__(
        self,
        base_url: str,
        model: str = "openai/gpt-oss-20b",
        api_key: str = "EMPTY",
        *,
        rubric: str = RUBRIC_3_TIER,
        valid_scores: Sequence[float] = DEFAULT_VALID_SCORES,
        max_concurrency: int = 64,
        request_timeout: float = 300.0,
        max_retries: int = 3,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        batch_deadline: float | None = 900.0,
        temperature: float | None = 0.1,
        max_tokens: int | None = None,
        system_prompt: str | None = None,
        request_kwargs: Mapping[str, Any] | None = None,
        problem_keys: Sequence[str] = ("problem", "question"),
        reference_keys: Sequence[str] = ("reference_solution", "solution"),
        cache_size: int = 100_000,
        metrics_prefix: str = "judge",
        log_metrics: bool = False,
        name: str = "rubric_judge",
        seed: int | None = None,
    ):
        for arg, value, low in (
            ("max_concurrency", max_concurrency, 1),
            ("max_retries", max_retries, 0),
            ("cache_size", cache_size, 0),
        ):
            if int(value) != value or value < low:
                raise ValueError(f"{arg}: expected an integer >= {low}, got {value!r}")
        for arg, value in (
            ("request_timeout", request_timeout),
            ("backoff_base", backoff_base),
            ("backoff_max", backoff_max),
            ("batch_deadline", batch_deadline),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{arg}: expected a positive number of seconds, got {value!r}")
        if not valid_scores or not all(math.isfinite(float(v)) for v in valid_scores):
            raise ValueError(f"valid_scores: expected a non-empty set of finite scores, got {valid_scores!r}")
        if not base_url:
            raise ValueError("base_url: expected the server's OpenAI API root, e.g. http://localhost:8000/v1")
        self.base_url, self.model, self.api_key = base_url, model, api_key
        self.rubric, self.valid_scores = rubric, tuple(sorted(float(v) for v in valid_scores))
        self.max_concurrency, self.request_timeout, self.max_retries = max_concurrency, request_timeout, max_retries
        self.backoff_base, self.backoff_max, self.batch_deadline = backoff_base, backoff_max, batch_deadline
        self.temperature, self.max_tokens, self.system_prompt = temperature, max_tokens, system_prompt
        self.request_kwargs = dict(request_kwargs or {})
        self.problem_keys, self.reference_keys = tuple(problem_keys), tuple(reference_keys)
        self.cache_size, self.metrics_prefix, self.log_metrics = cache_size, metrics_prefix, log_metrics
        self.__name__ = name
        self._rng = random.Random(seed)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._init_runtime()

    def _init_runtime(self) -> None:
        """Loop-bound state (client, semaphore) is made lazily on the loop that awaits the judge."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._lock = threading.Lock()
        self._totals: Counter[str] = Counter()
        self._latencies: deque[float] = deque(maxlen=100_000)
        self._last_batch_seconds = float("nan")

    def __getstate__(self) -> dict:  # picklable for TRL's spawned rollout workers: drop the runtime
        state = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_loop", "_client", "_semaphore", "_lock", "_totals", "_latencies")
        }
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def _runtime(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio primitives and pooled connections belong to one loop
            self._loop = loop
            # An explicit HTTP client: openai's default one schedules its own closing on whatever loop runs
            # when it is garbage-collected, which fails once its loop is closed (asyncio.run per call).
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self.api_key,
                timeout=self.request_timeout,
                max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(),
            )
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._client, self._semaphore

    async def aclose(self) -> None:
        """Close the HTTP client of the current loop (a later call opens a new one)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._loop = self._client = self._semaphore = None

    # ---------------------------------------------------------------- the reward function
    async def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any] | None = None, **kwargs
    ) -> list[float | None]:
        """One score in ``valid_scores`` or ``None`` per completion (``None`` completions are skipped)."""
        n = len(completions)
        if prompts is None or len(prompts) != n:
            raise ValueError(
                f"prompts: expected {n} prompts (one per completion), got {None if prompts is None else len(prompts)}"
            )
        started = time.perf_counter()
        batch: Counter[str] = Counter(completions=n)
        latencies: list[float] = []
        results: list[float | None] = [None] * n
        problems = self._column(kwargs, self.problem_keys, n)
        references = self._column(kwargs, self.reference_keys, n)
        to_send: dict[bytes, tuple[str, list[int]]] = {}
        for i, completion in enumerate(completions):
            if completion is None:
                batch["skipped"] += 1
                continue
            problem = problems[i] if problems is not None and problems[i] is not None else prompt_problem(prompts[i])
            text = build_judge_prompt(
                str(problem),
                _strip_think(message_text(completion)),
                None if references is None else references[i],
                self.rubric,
            )
            key = self._key(text)
            if key in self._cache:
                self._cache.move_to_end(key)
                results[i] = self._cache[key]
                batch["cache_hits"] += 1
            elif key in to_send:
                to_send[key][1].append(i)
                batch["deduplicated"] += 1
            else:
                to_send[key] = (text, [i])
        tasks = {asyncio.ensure_future(self._grade(text, batch, latencies)): key for key, (text, _) in to_send.items()}
        done: set = set()
        try:
            if tasks:
                done, _ = await asyncio.wait(tasks, timeout=self.batch_deadline)
        finally:  # the deadline passed, or the caller was cancelled: no request outlives the call
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task, key in tasks.items():
            score, kind = self._outcome(task) if task in done else (None, "deadline")
            if score is not None:
                self._remember(key, score)
            for i in to_send[key][1]:
                results[i] = score
                batch["scored" if score is not None else "failures"] += 1
                if kind is not None:
                    batch[f"failures/{kind}"] += 1
        scores = [r for r in results if r is not None]
        batch.update(score_sum=sum(scores), score_count=len(scores))
        self._merge(batch, latencies, time.perf_counter() - started)
        if batch["failures"]:
            kinds = {k.split("/", 1)[1]: v for k, v in batch.items() if k.startswith("failures/")}
            logger.warning("rubric judge: %d of %d completions got no score %s", batch["failures"], n, kinds)
        log_metric = kwargs.get("log_metric")
        if self.log_metrics and log_metric is not None:
            for key, value in self._format(batch, sorted(latencies)).items():
                log_metric(key, value)
        return results

    async def _grade(self, text: str, batch: Counter[str], latencies: list[float]) -> tuple[float | None, str | None]:
        """(score, failure kind) for one judge prompt, retrying transient failures; appends each request's
        seconds to ``latencies``."""
        client, semaphore = self._runtime()
        messages = [{"role": "user", "content": text}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        options = dict(self.request_kwargs)
        for arg in ("temperature", "max_tokens"):
            if getattr(self, arg) is not None:
                options.setdefault(arg, getattr(self, arg))
        for attempt in range(self.max_retries + 1):
            if attempt:
                batch["retries"] += 1
                cap = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
                await asyncio.sleep(cap * self._rng.uniform(0.5, 1.0))
            async with semaphore:
                batch["requests"] += 1
                start = time.perf_counter()
                try:
                    reply = await asyncio.wait_for(
                        client.chat.completions.create(model=self.model, messages=messages, **options),
                        self.request_timeout,
                    )
                except Exception as err:  # every failure is classified and counted, none escapes
                    latencies.append(time.perf_counter() - start)
                    kind, retry = _classify(err)
                    logger.debug("rubric judge request failed (%s, attempt %d): %r", kind, attempt + 1, err)
                    if retry and attempt < self.max_retries:
                        continue
                    return None, kind
                latencies.append(time.perf_counter() - start)
            choices = getattr(reply, "choices", None) or []
            output = _strip_think(choices[0].message.content if choices and choices[0].message else None)
            if not output:
                return None, "empty"
            score = parse_score(output, self.valid_scores)
            return score, (None if score is not None else "unparseable")

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _outcome(task: asyncio.Task) -> tuple[float | None, str | None]:
        if task.exception() is not None:  # a bug, not a judge verdict: report it, score nothing
            logger.error("rubric judge: unexpected error", exc_info=task.exception())
            return None, "other"
        return task.result()

    @staticmethod
    def _column(kwargs: Mapping[str, Any], keys: Sequence[str], n: int) -> Sequence[Any] | None:
        for key in keys:
            column = kwargs.get(key)
            if column is not None:
                if len(column) != n:
                    raise ValueError(f"{key}: expected {n} values (one per completion), got {len(column)}")
                return column
        return None

    def _key(self, text: str) -> bytes:
        return hashlib.sha256("\x00".join((self.model, self.system_prompt or "", text)).encode()).digest()

    def _remember(self, key: bytes, score: float) -> None:
        if self.cache_size:
            self._cache[key] = score
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _merge(self, batch: Counter[str], latencies: list[float], seconds: float) -> None:
        with self._lock:
            self._totals.update(batch)
            self._latencies.extend(latencies)
            self._last_batch_seconds = seconds

    def _format(self, counts: Mapping[str, float], latencies: Sequence[float]) -> dict[str, float]:
        p = self.metrics_prefix
        keys = ("completions", "skipped", "cache_hits", "deduplicated", "scored", "failures", "requests", "retries")
        out = {f"{p}/{k}": float(counts.get(k, 0)) for k in keys}
        out.update({f"{p}/failures/{k}": float(counts.get(f"failures/{k}", 0)) for k in FAILURE_KINDS})
        n_scores = counts.get("score_count", 0)
        out[f"{p}/score_mean"] = counts.get("score_sum", 0.0) / n_scores if n_scores else float("nan")
        for q in (50, 90, 99):
            out[f"{p}/latency_p{q}"] = _percentile(latencies, q / 100)
        out[f"{p}/latency_max"] = float(latencies[-1]) if latencies else float("nan")
        return out

    def stats(self, reset: bool = False) -> dict[str, float]:
        """Counters since the last reset as ``{"judge/<name>": float}``: completions, skipped (``None`` inputs),
        cache_hits, deduplicated, scored, failures and ``failures/<kind>``, requests (HTTP attempts), retries,
        score_mean (of the scores returned), latency_p50/p90/p99/max (seconds per HTTP request, failed ones
        included; nearest rank over the last 100k), batch_seconds (the last call since the reset), cache_size.
        ``completions = skipped + cache_hits + scored + failures``; latency keys are NaN before any request."""
        with self._lock:
            out = self._format(self._totals, sorted(self._latencies))
            out[f"{self.metrics_prefix}/batch_seconds"] = self._last_batch_seconds
            out[f"{self.metrics_prefix}/cache_size"] = float(len(self._cache))
            if reset:
                self._totals.clear()
                self._latencies.clear()
                self._last_batch_seconds = float("nan")
        return out

    def reset(self) -> None:
        """Zero the counters (the cache is kept); e.g. once per logged step."""
        self.stats(reset=True)

    def clear_cache(self) -> None:
        self._cache.clear()

    def __repr__(self) -> str:
        return (
            f"RubricJudge(base_url={self.base_url!r}, model={self.model!r}, "
            f"max_concurrency={self.max_concurrency}, valid_scores={self.valid_scores})"
        )
