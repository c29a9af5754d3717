"""Bounded tool calls (issue 16 item 6): one chat message with 24 python calls used to start 24 sandboxes at once.

Calls per model turn are capped (`max_tool_calls_per_turn`, default 8; the rest are answered with an error the model
sees), and a registry runs at most `max_concurrent` calls at the same time (default 16) over all rollouts. The
sandbox test runs real `PythonTool` calls: run this file as root and as an unprivileged uid (setpriv).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from trl_appo.config import APPOConfig
from trl_appo.rollout import ChatTemplateProtocol, Prefix, RolloutEngine, TagProtocol
from trl_appo.testing import encode
from trl_appo.tools import PythonTool, Tool, ToolCall, ToolRegistry


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


class Gauge:
    """A tool that records how many of its calls run at the same time."""

    def __init__(self, seconds: float = 0.05):
        self.seconds, self.now, self.peak, self.calls = seconds, 0, 0, 0
        self.lock = threading.Lock()

    def run(self, code: str) -> str:
        """Run code.

        Args:
            code: anything
        """
        with self.lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        return "ok"


class Script:
    def __init__(self, tok, turns):
        self.turns, self.i = [encode(tok, t) for t in turns], 0

    def __call__(self, contexts, num_generations, max_new_tokens):
        ids = self.turns[min(self.i, len(self.turns) - 1)]
        self.i += 1
        return [list(ids) for _ in contexts], None


def _many_calls(n: int) -> str:
    calls = "".join(
        f"<tool_call>\n{json.dumps({'name': 'python', 'arguments': {'code': f'print({i})'}})}\n</tool_call>"
        for i in range(n)
    )
    return calls + "<|im_end|>"


def test_one_message_with_24_calls_runs_8_by_default(tok):
    gauge = Gauge()
    engine = RolloutEngine(
        Script(tok, [_many_calls(24), "done<|im_end|>"]), tok, ChatTemplateProtocol(tok),
        [Tool(gauge.run, name="python")], max_completion_length=8192,
    )
    (r,) = engine.run(engine.tokenize_prompts([[{"role": "user", "content": "go"}]]))
    assert gauge.calls == 8 and r.executed_tool_calls == {"python": 8}
    tool_messages = [m for m in r.messages if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages[:8]] == ["ok"] * 8
    refused = [m["content"] for m in tool_messages[8:]]
    assert len(refused) == 16 and all("at most 8 tool calls run per turn" in c for c in refused)
    assert r.tool_stats.calls == 8 and r.tool_stats.limit_hits == 16


def test_per_turn_cap_is_configurable_and_prefix_replay_counts_the_same_calls(tok):
    gauge = Gauge(0.0)
    turns = [_many_calls(5), "done<|im_end|>"]
    engine = RolloutEngine(Script(tok, turns), tok, ChatTemplateProtocol(tok), [Tool(gauge.run, name="python")],
                           max_completion_length=8192, max_tool_calls_per_turn=2, max_tool_calls=10)
    (root,) = engine.run(engine.tokenize_prompts([[{"role": "user", "content": "go"}]]))
    assert root.executed_tool_calls == {"python": 2} and gauge.calls == 2
    # A branch of the whole trajectory: its prefix's executed calls are counted as they were (2, not 5).
    (branch,) = RolloutEngine(Script(tok, ["x<|im_end|>"]), tok, ChatTemplateProtocol(tok),
                              [Tool(gauge.run, name="python")], max_completion_length=8192, max_tool_calls_per_turn=2).run(
        [root.prompt_ids], [Prefix(root.completion_ids, root.model_mask)])
    assert branch.executed_tool_calls == {"python": 2} and gauge.calls == 2
    with pytest.raises(ValueError, match="max_tool_calls_per_turn"):
        RolloutEngine(None, tok, TagProtocol(tok), max_tool_calls_per_turn=0)


def test_registry_bounds_concurrent_calls_and_times_each_from_its_start():
    gauge = Gauge(0.2)
    registry = ToolRegistry([Tool(gauge.run, name="python", timeout=1.0)])
    assert registry.max_concurrent == 16  # the default bound
    results = ToolRegistry([Tool(gauge.run, name="python", timeout=1.0)], max_concurrent=3).execute_many(
        [ToolCall("python", "x")] * 12)
    # 12 calls of 0.2 s, 3 at a time: 0.8 s in all, so a timeout counted from the batch start (1 s) would still
    # pass, but the last calls waited 0.6 s for a slot: none of them may be reported as timed out.
    assert gauge.peak == 3 and [r.content for r in results] == ["ok"] * 12
    shared = ToolRegistry([Tool(gauge.run, name="python")], max_concurrent=4)
    gauge.peak = 0
    threads = [threading.Thread(target=shared.execute_many, args=([ToolCall("python", "x")] * 6,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert gauge.peak <= 4  # the bound holds over all callers of one registry
    with pytest.raises(ValueError, match="max_concurrent"):
        ToolRegistry(max_concurrent=0)


def _config(**kw):
    return APPOConfig(output_dir="/tmp/appo-limits", bf16=False, use_cpu=True, report_to="none", **kw)


def test_config_fields_bound_calls_by_default():
    assert (_config().max_tool_calls_per_turn, _config().max_concurrent_tool_calls) == (8, 16)
    args = _config(max_tool_calls_per_turn=3, max_concurrent_tool_calls=None)
    assert (args.max_tool_calls_per_turn, args.max_concurrent_tool_calls) == (3, None)
    with pytest.raises(ValueError, match="max_concurrent_tool_calls"):
        _config(max_concurrent_tool_calls=0)


SANDBOX_CODE = "import time\nprint(time.time())\ntime.sleep(0.3)\nprint(time.time())"


def test_sandboxes_of_one_turn_are_bounded(tok):
    """24 python calls in one message through the real sandbox: 8 run, never more than `max_concurrent` at once."""
    python = PythonTool(timeout=20.0)
    calls = "".join(
        f"<tool_call>\n{json.dumps({'name': 'python', 'arguments': {'code': SANDBOX_CODE}})}\n</tool_call>"
        for _ in range(24)
    )
    engine = RolloutEngine(
        Script(tok, [calls + "<|im_end|>", "done<|im_end|>"]), tok, ChatTemplateProtocol(tok),
        ToolRegistry([python], max_concurrent=3), max_completion_length=16384,
    )
    (r,) = engine.run(engine.tokenize_prompts([[{"role": "user", "content": "go"}]]))
    outputs = [m["content"] for m in r.messages if m["role"] == "tool"]
    spans = [tuple(float(x) for x in out.split()) for out in outputs[:8]]
    assert len(spans) == 8 and all(len(s) == 2 for s in spans), outputs[:8]
    assert all("at most 8 tool calls run per turn" in out for out in outputs[8:]) and len(outputs) == 24
    peak = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert peak <= 3
