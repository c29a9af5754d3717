"""The tool callback API: `Tool`, `@tool`, `ToolCall`, `ToolResult`, `ToolStats`, `ToolRegistry`.

This module owns everything between "the protocol parsed a call" and "here is the text the model sees":
argument validation against the function signature, per-call timeouts, concurrent execution of the calls
of one turn, output truncation, and turning every failure into an error string (a rollout never sees an
exception from a tool). It knows nothing about tokens or chat templates (that is `rollout.protocols`).

A tool is a plain Python function, sync or async. For the chat-template protocol it needs type hints and a
Google-style docstring (transformers' `get_json_schema` builds the JSON schema from them, as TRL does). For
the paper's tag protocol it takes exactly one string argument, the body of the tag.

Timeouts. A sync tool runs in its own daemon thread; when the timeout expires the call returns an error
result and the rollout continues, but **a Python thread cannot be killed**: the abandoned thread keeps
running until the function returns (daemon threads do not block interpreter exit). Tools that can hang for
real (code execution) must enforce their own limits, as `PythonTool` does with a killable subprocess.
Async tools are cancelled with `asyncio.wait_for` on a private event loop thread.

Concurrency. A registry runs at most `max_concurrent` calls at once (default 16), over all rollouts and all
threads that share it; further calls wait for a slot, and a call's timeout starts when it starts running. A slot is
freed when the call returns or times out (an abandoned sync call's thread may still run: tools that can hang, like
`PythonTool`, kill their own work before the registry's timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_OUTPUT_CHARS = 8192
DEFAULT_MAX_CONCURRENT_CALLS = 16


@dataclass
class ToolCall:
    """One call parsed from the model's output.

    `arguments` is a dict of keyword arguments (chat-template protocol) or the raw tag body (tag protocol).
    A call the protocol could not parse carries `error` (shown to the model, counted as a failure).
    """

    name: str
    arguments: dict[str, Any] | str
    error: str | None = None


@dataclass
class ToolOutput:
    """What a tool may return instead of a plain value, to report a failure without raising.

    E.g. `PythonTool` returns the traceback as content and `failed=True` when the code raised.
    """

    content: str
    failed: bool = False


@dataclass
class ToolResult:
    """The outcome of one call: the text the model sees, and bookkeeping for `ToolStats`."""

    name: str
    content: str
    failed: bool = False
    started: float = 0.0  # time.monotonic() at start
    ended: float = 0.0
    counted: bool = True  # False for calls rejected by the per-rollout call limit (not executed)

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended - self.started)


@dataclass
class ToolStats:
    """Per-rollout tool statistics: executed calls, failures, seconds, and the same per tool name.

    `limit_hits` counts calls rejected because the rollout's tool-call budget was spent.
    """

    calls: int = 0
    failures: int = 0
    seconds: float = 0.0
    limit_hits: int = 0
    per_tool: dict[str, dict[str, float]] = field(default_factory=dict)

    def record(self, result: ToolResult) -> None:
        if not result.counted:
            self.limit_hits += 1
            return
        self.calls += 1
        self.failures += int(result.failed)
        self.seconds += result.seconds
        entry = self.per_tool.setdefault(result.name, {"calls": 0, "failures": 0, "seconds": 0.0})
        entry["calls"] += 1
        entry["failures"] += int(result.failed)
        entry["seconds"] += result.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "failures": self.failures,
            "seconds": self.seconds,
            "limit_hits": self.limit_hits,
            "per_tool": {k: dict(v) for k, v in self.per_tool.items()},
        }


def truncate_text(text: str, max_chars: int | None) -> str:
    """Keep the first `max_chars` characters and say how much was cut (the model should know)."""
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n... [output truncated: {len(text) - max_chars} more characters]"


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return str(value)


class ToolError(Exception):
    """Raise from a tool to show the model a clean error message (no exception type prefix)."""


class Tool:
    """A named callable the model may call, with its own timeout and output limit.

    Args:
        fn: sync or async function. Its signature validates the model's arguments.
        name: defaults to `fn.__name__`.
        description: overrides the docstring's first paragraph in the JSON schema.
        timeout: seconds before the call is abandoned (None: the registry's default).
        max_output_chars: output truncation (None: the registry's default).

    Subclasses may override `invoke` (e.g. to use the rollout's session key) and `prime`/`close_session`
    (stateful tools; see `PythonTool`), and set `sequential = True` to run one session's calls in call order
    (stateful environments, `rollout.environments`).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        max_output_chars: int | None = None,
    ):
        self.fn = fn
        self.name = name or fn.__name__
        self.description = description
        self.timeout = timeout
        self.max_output_chars = max_output_chars
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        self._schema: dict | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    @property
    def json_schema(self) -> dict:
        """OpenAI-style function schema from type hints and docstring (transformers' `get_json_schema`)."""
        if self._schema is None:
            from transformers.utils import get_json_schema

            schema = get_json_schema(self.fn)
            schema["function"]["name"] = self.name
            if self.description:
                schema["function"]["description"] = self.description
            self._schema = schema
        return self._schema

    def bind(self, arguments: dict[str, Any] | str) -> inspect.BoundArguments:
        """Check the model's arguments against the signature; raises TypeError with a readable message."""
        if isinstance(arguments, str):  # tag protocol: the tag body is the single positional argument
            return self.signature.bind(arguments)
        if not isinstance(arguments, dict):
            raise TypeError(f"arguments must be a JSON object, got {type(arguments).__name__}")
        return self.signature.bind(**arguments)

    def invoke(self, bound: inspect.BoundArguments, session: Any = None) -> Any:
        """Run the function (returns a value, or a coroutine for async tools). `session` is ignored here."""
        return self.fn(*bound.args, **bound.kwargs)

    def prime(self, session: Any, arguments: dict[str, Any] | str) -> None:
        """Tell a stateful tool about a call already made in a branch's prefix (default: nothing)."""

    def close_session(self, session: Any) -> None:
        """Free per-rollout state (default: nothing)."""


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    max_output_chars: int | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Decorator turning a function into a `Tool`: `@tool` or `@tool(name="calc", timeout=5)`.

    The decorated object stays callable like the original function.
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, description=description, timeout=timeout, max_output_chars=max_output_chars)

    return wrap(fn) if fn is not None else wrap


class _AsyncLoop:
    """One private event loop in a daemon thread, shared by a registry's async tools."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tool-async-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Any, timeout: float | None) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)


def _run_in_daemon_thread(fn: Callable[[], Any]) -> concurrent.futures.Future:
    # Not a ThreadPoolExecutor: its workers are joined at interpreter exit, so one hung tool would hang the
    # whole process at shutdown, and hung calls would eat the pool. A daemon thread per call costs ~50 us.
    future: concurrent.futures.Future = concurrent.futures.Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - reported to the model, never re-raised
            future.set_exception(exc)

    threading.Thread(target=target, name="tool-call", daemon=True).start()
    return future


class ToolRegistry:
    """The tools of a rollout engine, executed concurrently with timeouts; never raises into the caller.

    Args:
        tools: `Tool` instances or plain functions (wrapped with `Tool`).
        timeout: default per-call timeout in seconds.
        max_output_chars: default truncation of a result's text.
        max_concurrent: calls running at the same time, over all callers of this registry (None: unlimited).
    """

    def __init__(
        self,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        timeout: float = 60.0,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        max_concurrent: int | None = DEFAULT_MAX_CONCURRENT_CALLS,
    ):
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1 or None (unlimited), got {max_concurrent}")
        self.tools: dict[str, Tool] = {}
        for t in tools:
            t = t if isinstance(t, Tool) else Tool(t)
            if t.name in self.tools:
                raise ValueError(f"duplicate tool name {t.name!r}")
            self.tools[t.name] = t
        self.timeout = timeout
        self.max_output_chars = max_output_chars
        self._async_loop: _AsyncLoop | None = None
        self._lock = threading.Lock()
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent is not None else None

    @classmethod
    def coerce(cls, tools: ToolRegistry | Iterable[Tool | Callable[..., Any]] | None) -> ToolRegistry:
        if isinstance(tools, ToolRegistry):
            return tools
        return cls(tools or ())

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def schemas(self) -> list[dict]:
        """JSON schemas of all tools, in the format `apply_chat_template(tools=...)` accepts."""
        return [t.json_schema for t in self.tools.values()]

    # -- execution ---------------------------------------------------------------------------------------

    def execute(self, call: ToolCall, session: Any = None) -> ToolResult:
        return self.execute_many([call], [session])[0]

    def execute_many(self, calls: Sequence[ToolCall], sessions: Sequence[Any] | None = None) -> list[ToolResult]:
        """Run the calls concurrently (at most `max_concurrent` at once); results in call order. Errors become
        results with `failed=True`; each call's timeout counts from its own start."""
        sessions = list(sessions) if sessions is not None else [None] * len(calls)
        if len(sessions) != len(calls):
            raise ValueError(f"{len(sessions)} sessions for {len(calls)} calls")
        results: list[ToolResult | None] = [None] * len(calls)
        running: list[tuple[int, concurrent.futures.Future, float, float | None, _Slot]] = []
        last_in_session: dict[int, concurrent.futures.Future] = {}  # sequential tools: the session's last call
        try:
            for i, (call, session) in enumerate(zip(calls, sessions, strict=True)):
                slot = self._wait_for_slot(running)
                started = time.monotonic()
                try:
                    t, bound = self._prepare(call)
                except _CallRejected as exc:
                    slot.free()
                    results[i] = ToolResult(call.name, f"Error: {exc}", True, started, time.monotonic())
                    continue
                timeout = t.timeout if t.timeout is not None else self.timeout
                if getattr(t, "sequential", False):
                    # One session's calls to sequential tools (a stateful environment) run in call order.
                    future = _run_in_daemon_thread(
                        lambda t=t, b=bound, s=session, p=last_in_session.get(id(session)): self._after(p, t, b, s)
                    )
                    last_in_session[id(session)] = future
                elif t.is_async:
                    future = self._loop().submit(t.invoke(bound, session), timeout)
                else:
                    future = _run_in_daemon_thread(lambda t=t, b=bound, s=session: t.invoke(b, s))
                future.add_done_callback(lambda _, slot=slot: slot.free())  # the slot frees when the call ends
                running.append((i, future, started, timeout, slot))
            for i, future, started, timeout, slot in running:
                remaining = None if timeout is None else max(0.0, started + timeout - time.monotonic())
                try:
                    future.result(timeout=remaining)
                except BaseException:  # noqa: BLE001 - read by _result
                    pass
                slot.free()  # a call past its timeout gives its slot back too (its thread may still run)
                results[i] = self._result(calls[i], future, started, timeout)
        finally:
            for _, _, _, _, slot in running:  # an exception out of this method (KeyboardInterrupt)
                slot.free()
        return results  # type: ignore[return-value]

    def _wait_for_slot(self, running: list) -> _Slot:
        """A concurrency slot; while waiting, this caller's calls past their timeout give theirs back."""
        if self._slots is None:
            return _Slot(None)
        while True:
            now = time.monotonic()
            deadlines = [st + to for _, f, st, to, slot in running if to is not None and not slot.freed]
            wait = None if not deadlines else max(0.0, min(deadlines) - now)
            if self._slots.acquire(timeout=wait) if wait is not None else self._slots.acquire():
                return _Slot(self._slots)
            now = time.monotonic()
            for _, _, st, to, slot in running:
                if to is not None and now >= st + to:
                    slot.free()

    def _result(self, call: ToolCall, future: concurrent.futures.Future, started: float, timeout: float | None):
        try:
            if not future.done():
                raise concurrent.futures.TimeoutError
            value = future.result(timeout=0)
            content, failed = (value.content, value.failed) if isinstance(value, ToolOutput) else (
                _to_text(value),
                False,
            )
        except (concurrent.futures.TimeoutError, asyncio.TimeoutError, TimeoutError):
            future.cancel()
            content, failed = f"Error: tool '{call.name}' timed out after {timeout:g} s", True
        except ToolError as exc:
            content, failed = f"Error: {exc}", True
        except BaseException as exc:  # noqa: BLE001 - the model sees it; the rollout continues
            content, failed = f"Error: {type(exc).__name__}: {exc}", True
        limit = self.tools[call.name].max_output_chars or self.max_output_chars
        return ToolResult(call.name, truncate_text(content, limit), failed, started, time.monotonic())

    def validate(self, call: ToolCall) -> str | None:
        """Why the registry would refuse `call` without running it (parse error, unknown tool, bad arguments),
        or None when it would run."""
        try:
            self._prepare(call)
        except _CallRejected as exc:
            return str(exc)
        return None

    def _after(self, previous: concurrent.futures.Future | None, t: Tool, bound: Any, session: Any) -> Any:
        """Run `t` once `previous` has finished (sync or async tool; used for sequential tools)."""
        if previous is not None:
            concurrent.futures.wait([previous])
        value = t.invoke(bound, session)
        if inspect.isawaitable(value):
            value = self._loop().submit(value, None).result()
        return value

    def _prepare(self, call: ToolCall) -> tuple[Tool, inspect.BoundArguments]:
        if call.error:
            raise _CallRejected(call.error)
        t = self.tools.get(call.name)
        if t is None:
            raise _CallRejected(f"unknown tool '{call.name}'. Available tools: {', '.join(self.names) or 'none'}")
        try:
            bound = t.bind(call.arguments)
        except TypeError as exc:
            # Python's own wording for a bad call (`add() missing a required argument: 'b'`), as GRPOTrainer shows it
            raise _CallRejected(f"{call.name}() {exc}") from None
        return t, bound

    def _loop(self) -> _AsyncLoop:
        with self._lock:
            if self._async_loop is None:
                self._async_loop = _AsyncLoop()
            return self._async_loop

    # -- per-rollout state -----------------------------------------------------------------------------

    def prime(self, session: Any, calls: Iterable[ToolCall]) -> None:
        """Replay knowledge of a prefix's calls into stateful tools (branches continue a root's session)."""
        for call in calls:
            t = self.tools.get(call.name)
            if t is not None and call.error is None:
                t.prime(session, call.arguments)

    def close_session(self, session: Any) -> None:
        for t in self.tools.values():
            t.close_session(session)


class _Slot:
    """One held concurrency slot of a registry, freed exactly once (by the call's end or its timeout)."""

    def __init__(self, semaphore: threading.BoundedSemaphore | None):
        self.semaphore = semaphore
        self.freed = semaphore is None
        self._lock = threading.Lock()

    def free(self) -> None:
        with self._lock:
            if self.freed:
                return
            self.freed = True
        self.semaphore.release()


class _CallRejected(Exception):
    """A call that never reached the tool: parse error, unknown tool, wrong arguments."""
