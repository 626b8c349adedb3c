r"""A scripted OpenAI-compatible judge server on localhost, for tests, benchmarks and offline dry runs.

It speaks just enough HTTP/1.1 (keep-alive, ``Content-Length`` bodies) to serve ``POST /v1/chat/completions``,
``GET /v1/models`` and ``GET /health`` with the standard library's asyncio. It does not grade anything: it
answers ``Analysis ... Score: \boxed{s}`` and follows *directives* written anywhere in the last user message
(normally inside the student solution), ``[[judge: key=value ...]]``:

* ``score=s`` - the score to answer (default ``default_score``);
* ``delay=t`` or ``delay=txn`` - sleep ``t`` seconds before answering (only the first ``n`` attempts);
* ``fail=codexn`` - answer HTTP ``code`` to the first ``n`` attempts of this exact request (always without
  ``xn``), e.g. ``fail=500x2`` then succeed;
* ``reply=mode`` - ``ok`` (default), ``fallback`` (``Score: s`` without a box), ``think`` (a decoy
  ``\boxed{0}`` inside a trailing ``<think>``), ``reasoning`` (a decoy in vLLM's ``reasoning_content``
  field), ``garbage`` (no score), ``empty`` (empty content), ``null`` (``content: null``), ``badjson`` (a 200
  that is not JSON) or ``drop`` (close the connection without answering).

Every response also waits ``latency`` seconds (a stand-in for model time). Run in a thread with
``with LocalJudgeServer() as server: server.base_url``, or as a process:
``python -m papo_trl.rewards.judge_server --port 8000 --latency 0.05``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import re
import sys
import threading
import time
from collections import Counter

__all__ = ["LocalJudgeServer"]

_DIRECTIVE = re.compile(r"\[\[judge:([^\]]*)\]\]")
_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

logger = logging.getLogger(__name__)


def _directives(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for block in _DIRECTIVE.findall(text):
        for item in block.split():
            key, _, value = item.partition("=")
            found[key.strip()] = value.strip()
    return found


def _first_n(value: str) -> tuple[str, int | None]:
    """``"500x2"`` -> ``("500", 2)``; ``"500"`` -> ``("500", None)`` (every attempt)."""
    head, sep, count = value.partition("x")
    return head, (int(count) if sep else None)


class LocalJudgeServer:
    """Scripted ``/v1/chat/completions`` server; ``requests`` holds every chat body received, ``attempts``
    counts attempts per distinct body, ``max_in_flight`` is the most chat requests served at once."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        default_score: float = 1.0,
        model: str = "openai/gpt-oss-20b",
        record: bool = True,
    ):
        self.host, self.port, self.latency = host, port, latency
        self.default_score, self.model, self.record = default_score, model, record
        self.requests: list[dict] = []
        self.attempts: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._handlers: set[asyncio.Task] = set()
        self.in_flight = self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # ---------------------------------------------------------------- lifecycle
    async def serve(self) -> None:
        """Open the listening socket on the running loop (``port=0`` picks a free port)."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def start(self) -> LocalJudgeServer:
        """Serve from a daemon thread with its own event loop; returns once the port is open."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(self.serve())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="local-judge-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("local judge server did not start")
        return self

    def stop(self) -> None:
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> LocalJudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- HTTP
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line.strip():
                    break
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    key, _, value = h.decode("latin-1").partition(":")
                    headers[key.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                reply = await self._respond(method, path.split("?", 1)[0], body)
                if reply is None:  # "drop": vanish without an answer
                    break
                status, payload = reply
                head = (
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError) as err:
            logger.debug("connection ended: %r", err)  # the client went away, or the server is shutting down
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _respond(self, method: str, path: str, body: bytes) -> tuple[int, bytes] | None:
        if method == "GET" and path in ("/health", "/v1/models"):
            data = {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "local"}]}
            return 200, json.dumps(data).encode()
        if method != "POST" or path != "/v1/chat/completions":
            return 404, json.dumps({"error": {"message": f"no route {method} {path}", "code": 404}}).encode()
        request = json.loads(body or b"{}")
        if self.record:
            self.requests.append(request)
        messages = request.get("messages") or [{}]
        text = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
        signature = hashlib.sha256(body).hexdigest()
        self.attempts[signature] += 1
        attempt = self.attempts[signature]
        d = _directives(text)
        delay, upto = _first_n(d.get("delay", "0"))
        wait = self.latency + (float(delay) if upto is None or attempt <= upto else 0.0)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if wait > 0:
                await asyncio.sleep(wait)
        finally:
            self.in_flight -= 1
        if "fail" in d:
            code, upto = _first_n(d["fail"])
            if upto is None or attempt <= upto:
                error = {"object": "error", "message": f"scripted {code}", "type": "scripted", "code": int(code)}
                return int(code), json.dumps(error).encode()
        mode = d.get("reply", "ok")
        if mode == "drop":
            return None
        if mode == "badjson":
            return 200, b"<html>not json</html>"
        return 200, json.dumps(self._completion(request, d.get("score", str(self.default_score)), mode)).encode()

    def _completion(self, request: dict, score: str, mode: str) -> dict:
        analysis = "Analysis:\nEach step follows from the previous one.\n\n"
        message: dict = {"role": "assistant", "content": f"{analysis}Score: \\boxed{{{score}}}"}
        if mode == "fallback":
            message["content"] = f"{analysis}Score: {score}"
        elif mode == "think":
            message["content"] = f"{analysis}Score: \\boxed{{{score}}}\n<think>Or is it \\boxed{{0}}?</think>"
        elif mode == "reasoning":
            message["reasoning_content"] = "A first guess would be \\boxed{0.25}."
        elif mode == "garbage":
            message["content"] = "The solution is interesting; I have no verdict."
        elif mode in ("empty", "null"):
            message["content"] = "" if mode == "empty" else None
        return {
            "id": f"chatcmpl-{sum(self.attempts.values())}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", self.model),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }


def main(argv: list[str] | None = None) -> None:
    """``python -m papo_trl.rewards.judge_server``: serve until interrupted, announcing the address on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m papo_trl.rewards.judge_server",
        description="A stand-in OpenAI-compatible judge for dry runs without a GPU: it grades every response "
        "--default-score (no model behind it) unless the response holds [[judge: ...]] directives (see the "
        "module docstring). Point the trainer at it with --judge_base_url http://HOST:PORT/v1.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every response (default: 0)")
    parser.add_argument("--default-score", type=float, default=1.0, help="the score of every response "
                        "without a directive (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    server = LocalJudgeServer(
        args.host, args.port, latency=args.latency, default_score=args.default_score, record=False
    )

    async def run() -> None:
        await server.serve()
        logger.info("listening on %s", server.base_url)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
