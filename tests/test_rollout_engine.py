"""RolloutEngine + protocols + ToolRegistry with a scripted generator (no model): exact ids, masks and log-probs
around tool output, continuation from every kind of prefix, budgets, call limits, concurrency, bad input."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from trl_appo.rollout import ChatTemplateProtocol, Prefix, RolloutEngine, TagProtocol, model_runs
from trl_appo.testing import encode
from trl_appo.tools import Tool, ToolCall, ToolError, ToolRegistry, tool

# ---------------------------------------------------------------------------------------------------------------
# Scripted generation: the continuation depends only on the context, so rows can be batched in any way.


class Scripted:
    """A fake `generate_fn` playing a script of model turns (token ids), chosen from the context.

    The turn index is the number of `marker` occurrences after the prompt (a marker ends a tool result and
    starts a new model turn); the tokens of the current turn already present (a branch prefix) are skipped.
    `overrun` ids are appended to every continuation, as a backend that runs past a stop would.
    Log-probs are -(position in the turn + 1) / 100, so tests can check their alignment.
    """

    def __init__(self, tokenizer, prompt_len: int, turns: list[str], marker: str, overrun: str = ""):
        self.tok = tokenizer
        self.prompt_len = prompt_len
        self.turns = [encode(tokenizer, t) for t in turns]
        self.marker = encode(tokenizer, marker)
        self.overrun = encode(tokenizer, overrun) if overrun else []
        self.calls: list[list[list[int]]] = []

    def _turn(self, completion: list[int]) -> tuple[int, int]:
        m = len(self.marker)
        hits = [i + m for i in range(len(completion) - m + 1) if completion[i : i + m] == self.marker]
        start = hits[-1] if hits else 0
        return len(hits), len(completion) - start

    def __call__(self, contexts, num_generations, max_new_tokens):
        self.calls.append([list(c) for c in contexts])
        ids, lps = [], []
        for c in contexts:
            turn, done = self._turn(list(c[self.prompt_len :]))
            rest = self.turns[min(turn, len(self.turns) - 1)][done:] + self.overrun
            ids.append(rest)
            lps.append([-(done + j + 1) / 100 for j in range(len(rest))])
        return ids, lps


def _calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: e.g. 6*7
    """
    if not expression.strip():
        raise ToolError("empty expression")
    return str(eval(expression, {"__builtins__": {}}))  # noqa: S307 - test tool


def _lookup(query: str) -> str:
    return f"found: {query}"


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first summand
        b: second summand
    """
    return a + b


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def tag_engine(tok, turns, prompt="Q", overrun="", tools=None, **kw):
    prompt_ids = encode(tok, prompt)
    gen = Scripted(tok, len(prompt_ids), turns, "</result>", overrun)
    tools = tools or [Tool(_calculator, name="python"), Tool(_lookup, name="search")]
    engine = RolloutEngine(gen, tok, TagProtocol(tok), tools, max_completion_length=kw.pop("budget", 256), **kw)
    return engine, gen, prompt_ids


TAG_TURNS = [
    "<think>compute</think><python>6*7</python>",
    " so <search>capital of Zorvath</search>",
    "<answer>\\boxed{42}</answer><|im_end|>",
]


def expected_tag(tok, turns=TAG_TURNS, results=("42", "found: capital of Zorvath")):
    ids, mask = [], []
    for i, turn in enumerate(turns):
        t = encode(tok, turn)
        ids += t
        mask += [1] * len(t)
        if i < len(results):
            r = encode(tok, f" <result>\n{results[i]}\n</result>")
            ids += r
            mask += [0] * len(r)
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Multi-turn trajectories, exact ids / mask / log-probs


def test_tag_protocol_multi_turn_exact_ids_mask_logprobs(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS, overrun=" OVERRUN")
    (r,) = engine.run([prompt_ids])
    ids, mask = expected_tag(tok)
    assert r.completion_ids == ids  # overrun past each stop was cut
    assert r.model_mask == mask
    assert r.finish_reason == "stop" and r.prefix_length == 0
    # Log-probs: the backend's on model tokens (position within its turn), 0.0 on tool output.
    expected_lps = []
    for start, end, is_model in model_runs(mask):
        expected_lps += [-(j + 1) / 100 for j in range(end - start)] if is_model else [0.0] * (end - start)
    assert r.logprobs == pytest.approx(expected_lps)
    assert r.messages == [{"role": "assistant", "content": tok.decode(ids, skip_special_tokens=True)}]
    assert "<result>\n42\n</result>" in r.text
    assert r.tool_stats.calls == 2 and r.tool_stats.failures == 0
    assert set(r.tool_stats.per_tool) == {"python", "search"}
    assert len(gen.calls) == 3


def test_chat_template_multi_turn_matches_the_template(tok):
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'
    turns = [call, "The answer is 7.<|im_end|>"]
    protocol = ChatTemplateProtocol(tok)
    engine = RolloutEngine(None, tok, protocol, [add], max_completion_length=256)
    (prompt_ids,) = engine.tokenize_prompts([messages])
    engine.generate_fn = gen = Scripted(tok, len(prompt_ids), turns, "<|im_start|>assistant\n", overrun="junk")
    (r,) = engine.run([prompt_ids])

    tool_msg = {"role": "tool", "name": "add", "content": "7"}
    suffix = protocol.tool_suffix_ids([tool_msg])
    first, last = encode(tok, turns[0]), encode(tok, turns[1])
    assert r.completion_ids == first + suffix + last
    assert r.model_mask == [1] * len(first) + [0] * len(suffix) + [1] * len(last)
    assert tok.decode(suffix) == "\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert r.messages == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}]},
        tool_msg,
        {"role": "assistant", "content": "The answer is 7."},
    ]
    # The eos trap (trl_appo.testing): rendering the whole conversation gives the same ids (up to the final newline).
    full = tok.apply_chat_template(messages + r.messages, tools=engine.tools.schemas(), tokenize=True,
                                   return_dict=False)
    assert full[: len(prompt_ids) + len(r.completion_ids)] == prompt_ids + r.completion_ids
    assert r.tool_stats.per_tool["add"]["calls"] == 1 and len(gen.calls) == 2


# ---------------------------------------------------------------------------------------------------------------
# Continuation from prefixes


def test_prefix_mid_turn_keeps_generating(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS)
    root = engine.run([prompt_ids])[0]
    first_result = root.model_mask.index(0)
    s = first_result + 12  # inside the second model turn, before its </search>
    assert root.model_mask[s - 1] == 1
    lps = [-5.0] * s  # the root's log-probs are copied, not recomputed
    (b,) = engine.run([prompt_ids], [Prefix(root.completion_ids[:s], root.model_mask[:s], lps)])
    assert b.completion_ids == root.completion_ids and b.model_mask == root.model_mask
    assert b.logprobs[:s] == lps and b.prefix_length == s
    assert b.tool_stats.calls == 1  # only the search of the continuation ran; the prefix's python call counted
    assert b.messages == root.messages


def test_prefix_inside_tool_call_model_closes_it(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS)
    root = engine.run([prompt_ids])[0]
    turn = encode(tok, TAG_TURNS[0])
    s = turn.index(tok.convert_tokens_to_ids("<python>")) + 2  # "<python>6" ...
    (b,) = engine.run([prompt_ids], [Prefix(root.completion_ids[:s], root.model_mask[:s])])
    assert b.completion_ids == root.completion_ids and b.model_mask == root.model_mask
    assert b.tool_stats.calls == 2
    assert b.logprobs is None  # the prefix had none


def test_stop_string_straddling_the_prefix_boundary(tok):
    """`</calc>` is several tokens: a prefix ending in `</cal` must still stop right after `c>`."""
    prompt_ids = encode(tok, "Q")
    text = "<calc>1+2</calc>"
    ids = encode(tok, text)
    cut = next(k for k in range(len(ids)) if tok.decode(ids[:k]).endswith("</cal"))
    gen = Scripted(tok, len(prompt_ids), [text + " more text", "done<|im_end|>"], "</result>")
    engine = RolloutEngine(gen, tok, TagProtocol(tok, tags=("calc",)), [Tool(_calculator, name="calc")])
    (b,) = engine.run([prompt_ids], [Prefix(ids[:cut], [1] * cut)])
    result = encode(tok, " <result>\n3\n</result>")
    assert b.completion_ids[: len(ids) + len(result)] == ids + result
    assert b.finish_reason == "stop" and b.tool_stats.calls == 1


def test_prefix_at_complete_unexecuted_call_executes_first(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS)
    first = encode(tok, TAG_TURNS[0])
    (b,) = engine.run([prompt_ids], [Prefix(first, [1] * len(first))])
    ids, mask = expected_tag(tok)
    assert b.completion_ids == ids and b.model_mask == mask
    # The first generate call already saw the executed result.
    assert tok.decode(gen.calls[0][0]).endswith("<result>\n42\n</result>")


def test_chat_prefix_at_complete_unexecuted_call_and_message_reconstruction(tok):
    messages = [{"role": "user", "content": "add"}]
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'
    engine = RolloutEngine(None, tok, ChatTemplateProtocol(tok), [add], max_completion_length=256)
    (prompt_ids,) = engine.tokenize_prompts([messages])
    engine.generate_fn = Scripted(tok, len(prompt_ids), [call, "It is 7.<|im_end|>"], "<|im_start|>assistant\n")
    root = engine.run([prompt_ids])[0]
    first = encode(tok, call)
    (b,) = engine.run([prompt_ids], [Prefix(first, [1] * len(first))])
    assert b.completion_ids == root.completion_ids and b.tool_stats.calls == 1
    # A branch in the last turn: its prefix's tool message is read back from the ids.
    s = len(root.completion_ids) - 2
    (b2,) = engine.run([prompt_ids], [Prefix(root.completion_ids[:s], root.model_mask[:s])])
    assert b2.messages == root.messages and b2.tool_stats.calls == 0


def test_prefix_at_end_of_episode_is_returned_unchanged(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS)
    root = engine.run([prompt_ids])[0]
    n = len(gen.calls)
    (b,) = engine.run([prompt_ids], [Prefix(root.completion_ids, root.model_mask, root.logprobs)])
    assert len(gen.calls) == n  # no generation
    assert (b.completion_ids, b.model_mask, b.logprobs) == (root.completion_ids, root.model_mask, root.logprobs)
    assert b.finish_reason == "stop" and b.tool_stats.calls == 0


# ---------------------------------------------------------------------------------------------------------------
# Tool-call limits (prompt tags never count)


@pytest.fixture(scope="module")
def arpo_system_prompt(arpo_data_dir):
    import pandas as pd

    prompt = pd.read_parquet(arpo_data_dir / "valid.parquet").prompt.iloc[0]
    system = prompt[0]["content"]
    assert "</search>" in system and "</python>" in system
    return [dict(m) for m in prompt]


def _arpo_engine(tok, prompt, turns, **kw):
    engine = RolloutEngine(None, tok, TagProtocol(tok), [Tool(_calculator, name="python"),
                                                         Tool(_lookup, name="search")], **kw)
    (prompt_ids,) = engine.tokenize_prompts([prompt])
    engine.generate_fn = Scripted(tok, len(prompt_ids), turns, "</result>")
    return engine, prompt_ids


def test_call_limit_counts_only_the_completion(tok, arpo_system_prompt):
    engine, prompt_ids = _arpo_engine(tok, arpo_system_prompt, TAG_TURNS, max_tool_calls=2)
    (r,) = engine.run([prompt_ids])
    assert r.tool_stats.calls == 2 and r.tool_stats.limit_hits == 0  # prompt tags did not count
    assert r.finish_reason == "stop"


def test_call_limit_message_mode(tok, arpo_system_prompt):
    engine, prompt_ids = _arpo_engine(tok, arpo_system_prompt, TAG_TURNS, max_tool_calls=1)
    (r,) = engine.run([prompt_ids])
    assert r.tool_stats.calls == 1 and r.tool_stats.limit_hits == 1
    assert "tool-call limit of this episode (1 calls) is reached" in r.text
    assert r.finish_reason == "stop" and r.text.endswith("</answer>")
    # A branch whose prefix already made the one allowed call: its next call is refused too.
    s = r.model_mask.index(0) + 12
    (b,) = engine.run([prompt_ids], [Prefix(r.completion_ids[:s], r.model_mask[:s])])
    assert b.tool_stats.calls == 0 and b.tool_stats.limit_hits == 1


def test_call_limit_end_mode(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS, max_tool_calls=1, on_tool_limit="end")
    (r,) = engine.run([prompt_ids])
    assert r.finish_reason == "tool_limit" and r.tool_stats.calls == 1
    assert tok.decode(r.completion_ids).endswith("</search>")  # the refused call has no result


# ---------------------------------------------------------------------------------------------------------------
# Budgets


def test_length_budget_counts_the_whole_completion(tok):
    ids, _ = expected_tag(tok)
    budget = len(ids) - 3
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS, budget=budget)
    (r,) = engine.run([prompt_ids])
    assert len(r.completion_ids) == budget and r.completion_ids == ids[:budget]
    assert r.finish_reason == "length"
    # A branch with a long prefix gets only what is left of the same budget.
    (b,) = engine.run([prompt_ids], [Prefix(ids[:10], [1] * 10)])
    assert len(b.completion_ids) == budget


def test_tool_result_that_overflows_ends_the_episode(tok):
    first = encode(tok, TAG_TURNS[0])
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS, budget=len(first) + 3)  # result needs more than 3
    (r,) = engine.run([prompt_ids])
    assert r.completion_ids == first and r.model_mask == [1] * len(first)  # no partial result
    assert r.finish_reason == "length" and r.tool_stats.calls == 1


def test_context_budget(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS, max_context_length=1 + 5)
    (r,) = engine.run([prompt_ids])
    assert len(prompt_ids) == 1 and len(r.completion_ids) == 5 and r.finish_reason == "context"


# ---------------------------------------------------------------------------------------------------------------
# Batching, concurrency, collective hook


def test_batched_equals_one_at_a_time(tok):
    turns_a = TAG_TURNS
    prompts = [encode(tok, q) for q in ("Q", "What?", "Q two")]
    engine, gen, _ = tag_engine(tok, turns_a)
    prefixes = [None, Prefix(encode(tok, "<think>"), [1] * len(encode(tok, "<think>"))), None]

    def run(ps, pre):
        out = []
        for p, x in zip(ps, pre, strict=True):
            engine.generate_fn = Scripted(tok, len(p), turns_a, "</result>")
            out += engine.run([p], [x])
        return out

    single = run(prompts, prefixes)

    def by_prompt(contexts, n, m):  # rows with different prompts (and prompt lengths) in one batch
        ids, lps = [], []
        for c in contexts:
            p = max((p for p in prompts if c[: len(p)] == p), key=len)
            out = Scripted(tok, len(p), turns_a, "</result>")([c], n, m)
            ids.append(out[0][0])
            lps.append(out[1][0])
        return ids, lps

    engine.generate_fn = by_prompt
    batched = engine.run(prompts, prefixes)
    key = lambda r: (r.completion_ids, r.model_mask, r.logprobs, r.messages, r.finish_reason, r.prefix_length)  # noqa: E731
    assert [key(r) for r in batched] == [key(r) for r in single]


def test_tool_calls_of_a_turn_run_concurrently(tok):
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def sleepy(query: str) -> str:
        start = time.monotonic()
        time.sleep(0.5)
        with lock:
            spans.append((start, time.monotonic()))
        return "ok"

    turns = ["<search>a</search>", "<answer>x</answer><|im_end|>"]
    engine, gen, prompt_ids = tag_engine(tok, turns, tools=[Tool(sleepy, name="search")])
    rollouts = engine.run([prompt_ids] * 4, group_size=4)
    assert len(spans) == 4 and all(r.tool_stats.calls == 1 for r in rollouts)
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all four overlapped
    assert [len(c) for c in gen.calls] == [4, 4]  # one batched generate call per turn


def test_should_continue_keeps_collective_calls_aligned(tok):
    engine, gen, prompt_ids = tag_engine(tok, ["<answer>1</answer><|im_end|>"])
    seen = []

    def hook(local_any_active: bool) -> bool:
        seen.append(local_any_active)
        return len(seen) <= 3  # "another rank" needs three turns

    engine.should_continue = hook
    (r,) = engine.run([prompt_ids])
    assert r.finish_reason == "stop"
    assert seen == [True, False, False, False]
    assert [len(c) for c in gen.calls] == [1, 0, 0]  # empty batches keep this rank in step


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every case becomes an error the model sees, counted as a failure; the rollout continues.


def _flood(code: str) -> str:
    return "x" * (5 << 20)


def _raises(code: str) -> str:
    raise RuntimeError("boom")


def _hangs(code: str) -> str:
    time.sleep(3600)
    return "never"


@pytest.mark.parametrize(
    "call_turn, tools, expected",
    [
        ("<think>x</think></python>", None, "without a matching '<python>'"),
        ("<python>   </python>", None, "empty <python> call"),
        ("<python>1</python>", [Tool(_raises, name="python")], "RuntimeError: boom"),
        ("<python>1</python>", [Tool(_hangs, name="python", timeout=0.3)], "timed out after 0.3 s"),
        ("<search>q</search>", [Tool(_calculator, name="python")], "unknown tool 'search'"),
    ],
    ids=["malformed-tags", "empty-code", "raises", "hangs", "unknown-tool"],
)
def test_tag_bad_input_becomes_an_error_result(tok, call_turn, tools, expected):
    turns = [call_turn, "<answer>done</answer><|im_end|>"]
    engine, gen, prompt_ids = tag_engine(tok, turns, tools=tools)
    (r,) = engine.run([prompt_ids])
    assert expected in r.text
    assert r.tool_stats.failures == 1 and r.tool_stats.calls == 1
    assert r.finish_reason == "stop" and r.text.endswith("<answer>done</answer>")


def test_output_flood_is_truncated(tok):
    engine, gen, prompt_ids = tag_engine(tok, ["<python>1</python>", "<answer>a</answer><|im_end|>"],
                                         tools=[Tool(_flood, name="python", max_output_chars=100)], budget=4096)
    (r,) = engine.run([prompt_ids])
    assert "[output truncated: 5242780 more characters]" in r.text and r.finish_reason == "stop"


@pytest.mark.parametrize(
    "call, expected",
    [
        ('<tool_call>\n{"name": "add", "arguments": {"a": 3, \n</tool_call><|im_end|>', "malformed tool call"),
        ('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call><|im_end|>', "unknown tool 'nope'"),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 3}}\n</tool_call><|im_end|>',
         "add() missing a required argument: 'b'"),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4, "c": 5}}\n</tool_call><|im_end|>',
         "add() got an unexpected keyword argument 'c'"),
        # JSON nested 3000 deep: the parser raises RecursionError, which must not escape RolloutEngine.run.
        ('<tool_call>\n{"name": "add", "arguments": {"a": ' + "[" * 3000 + "]" * 3000 + ', "b": 1}}\n</tool_call>'
         "<|im_end|>", "malformed tool call"),
        ('<tool_call>\n{"name": "add", "arguments": "' + "[" * 3000 + '"}\n</tool_call><|im_end|>',
         "malformed"),
    ],
    ids=["malformed-json", "unknown-tool", "missing-arg", "extra-arg", "nested-3000-deep", "nested-json-string"],
)
def test_chat_bad_input_becomes_an_error_result(tok, call, expected):
    messages = [{"role": "user", "content": "add"}]
    engine = RolloutEngine(None, tok, ChatTemplateProtocol(tok), [add], max_completion_length=8192)
    (prompt_ids,) = engine.tokenize_prompts([messages])
    engine.generate_fn = Scripted(tok, len(prompt_ids), [call, "Sorry.<|im_end|>"], "<|im_start|>assistant\n")
    (r,) = engine.run([prompt_ids])
    tool_messages = [m for m in r.messages if m["role"] == "tool"]
    assert len(tool_messages) == 1 and expected in tool_messages[0]["content"]
    assert r.tool_stats.failures == 1 and r.finish_reason == "stop"
    assert r.messages[-1] == {"role": "assistant", "content": "Sorry."}


def test_any_parse_exception_becomes_a_tool_error(tok):
    """Whatever a protocol's parser raises (here a RecursionError) is a tool error in the trajectory."""

    class Exploding(TagProtocol):
        def parse_turn(self, run_ids, context_ids, end, tools):
            if end == "stop":
                raise RecursionError("maximum recursion depth exceeded")
            return super().parse_turn(run_ids, context_ids, end, tools)

    protocol = Exploding(tok)
    engine = RolloutEngine(None, tok, protocol, [_calculator], max_completion_length=256)
    prompt_ids = encode(tok, "Q")
    engine.generate_fn = Scripted(tok, len(prompt_ids), ["<python>1+1</python>", " done"], "</result>")
    (r,) = engine.run([prompt_ids])
    assert r.tool_stats.failures == 1
    assert "malformed tool call: could not parse it (RecursionError)" in tok.decode(r.completion_ids)


# ---------------------------------------------------------------------------------------------------------------
# Registry and the @tool callback API


def test_tool_decorator_async_and_timeouts():
    @tool
    def shout(text: str) -> str:
        """Upper-case a text.

        Args:
            text: the text
        """
        return text.upper()

    @tool(name="slow_async", timeout=0.2)
    async def slow(text: str) -> str:
        await asyncio.sleep(10)
        return text

    @tool(timeout=0.2)
    async def fast_async(text: str) -> dict:
        await asyncio.sleep(0.01)
        return {"echo": text}

    assert shout("a") == "A" and shout.json_schema["function"]["name"] == "shout"
    registry = ToolRegistry([shout, slow, fast_async])
    results = registry.execute_many(
        [ToolCall("shout", {"text": "hi"}), ToolCall("slow_async", "x"), ToolCall("fast_async", "y")]
    )
    assert [r.content for r in results] == ["HI", "Error: tool 'slow_async' timed out after 0.2 s", '{"echo": "y"}']
    assert [r.failed for r in results] == [False, True, False]
    with pytest.raises(ValueError, match="duplicate"):
        ToolRegistry([shout, shout])


# ---------------------------------------------------------------------------------------------------------------
# Online branches (`run_tree`, branch_schedule="online"): forks after tool results, in the roots' generate calls


def _result_ends(mask):
    """Completion length right after each tool-result run of a mask."""
    return [end for start, end, is_model in model_runs(mask) if not is_model]


def test_run_tree_forks_after_tool_results_in_the_roots_generate_calls(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS)
    roots, forks = engine.run_tree([prompt_ids, prompt_ids], [[2, 1], [2]])
    ids, mask = expected_tag(tok)
    assert [r.completion_ids for r in roots] == [ids, ids] and all(r.prefix_length == 0 for r in roots)
    first, second = _result_ends(mask)
    # ordered by root, then by tool-result count; each shares exactly the root's tokens up to that result
    assert [(f.root, f.shared) for f in forks] == [(0, first), (0, second), (1, second)]
    for f in forks:
        b = f.rollout
        assert b.prefix_length == f.shared and b.completion_ids[: f.shared] == ids[: f.shared]
        assert b.completion_ids == ids and b.model_mask == mask  # the scripted model continues as the root did
        assert b.tool_stats.calls == (1 if f.shared == first else 0)  # only the calls after the fork ran
        assert b.executed_tool_calls == {"python": 1, "search": 1}  # the prefix's call counts for the rewards
        assert not f.late
    # no extra generate call: 3 turns, as the roots alone; forks joined the turn after their result
    assert len(gen.calls) == 3
    assert [len(c) for c in gen.calls] == [2, 3, 5]


def test_run_tree_fork_past_the_roots_last_result_or_without_results(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS)
    roots, (fork,) = engine.run_tree([prompt_ids], [[3]])  # the root makes 2 calls: the fork waits for its end
    ids, mask = expected_tag(tok)
    assert fork.shared == _result_ends(mask)[-1] and fork.rollout.completion_ids == ids and fork.late
    assert len(gen.calls) == 4  # the late fork generates its last turn after the root ended

    engine, gen, prompt_ids = tag_engine(tok, ["<answer>\\boxed{1}</answer><|im_end|>"])
    (root,), (fork,) = engine.run_tree([prompt_ids], [[1]])  # no tool result at all: from the prompt
    assert fork.shared == 0 and fork.rollout.prefix_length == 0
    assert fork.rollout.completion_ids == root.completion_ids


def test_run_tree_fork_without_room_starts_from_the_prompt_and_bad_plans_are_refused(tok):
    engine, gen, prompt_ids = tag_engine(tok, TAG_TURNS)
    ids, mask = expected_tag(tok)
    first = _result_ends(mask)[0]
    room_after_first = engine.max_completion_length - first
    _, (fork,) = engine.run_tree([prompt_ids], [[1]], min_room=room_after_first + 1)
    assert fork.shared == 0 and fork.rollout.completion_ids == ids
    _, (fork,) = engine.run_tree([prompt_ids], [[1]], min_room=room_after_first)
    assert fork.shared == first
    with pytest.raises(ValueError, match="must be >= 1"):
        engine.run_tree([prompt_ids], [[0]])
    with pytest.raises(ValueError, match="one entry per prompt"):
        engine.run_tree([prompt_ids], [[1], [1]])
