"""Rollout-engine overhead and sandbox latency on CPU (reported, not asserted).

1. Engine overhead per turn: a batch of rollouts where each turn is a real `model.generate` call on the tiny
   Qwen2 (transformers), with a scripted tool call spliced onto the first turns (a random model never calls
   tools). Overhead = engine wall time - time inside generate_fn, per turn, next to the raw generate time.
2. Sandbox start-up: `PythonTool.run("None")` latency, median / p90 over N calls.

Run: `.venv/bin/python benchmarks/bench_rollout.py [--rows 8] [--turns 3] [--sandbox-calls 20]`
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_generate_fn(model, tokenizer, call_text: str, tool_turns: int, max_new: int):
    """transformers generate over left-padded contexts; the first `tool_turns` turns end in a scripted call."""
    import torch

    call_ids = tokenizer(call_text, add_special_tokens=False)["input_ids"]
    timings: list[float] = []

    def generate_fn(contexts, num_generations, max_new_tokens):
        if not contexts:
            return [], []
        start = time.perf_counter()
        width = max(len(c) for c in contexts)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts])
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                 max_new_tokens=min(max_new, max_new_tokens), output_scores=True,
                                 return_dict_in_generate=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        new = out.sequences[:, width:]
        logps = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        ids, lps = new.tolist(), logps.tolist()
        timings.append(time.perf_counter() - start)
        results = ([], [])
        for c, row_ids, row_lps in zip(contexts, ids, lps, strict=True):
            n_results = tokenizer.decode(c).count("</result>")  # the benchmark prompts contain none
            if n_results < tool_turns:  # splice a tool call after a few generated tokens
                row_ids, row_lps = row_ids[:4] + call_ids, row_lps[:4] + [0.0] * len(call_ids)
            results[0].append(row_ids)
            results[1].append(row_lps)
        return results

    return generate_fn, timings


def bench_engine(rows: int, turns: int, max_new: int) -> dict[str, float]:
    from trl_appo.rollout import build_engine
    from trl_appo.testing import build_tiny_model, build_tiny_tokenizer
    from trl_appo.tools import Tool

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok).eval()

    def python(code: str) -> str:
        return str(eval(code, {"__builtins__": {}}))  # noqa: S307 - fixed benchmark input

    generate_fn, timings = make_generate_fn(model, tok, "<python>1+1</python>", turns - 1, max_new)
    engine = build_engine(generate_fn, tok, [Tool(python, name="python")], protocol="tags",
                          max_completion_length=turns * (max_new + 40))
    prompts = engine.tokenize_prompts([[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(rows)])
    engine.run(prompts[:2])  # warm-up
    timings.clear()
    start = time.perf_counter()
    rollouts = engine.run(prompts)
    total = time.perf_counter() - start
    n_turns = len(timings)
    generate = sum(timings)
    return {
        "rows": rows,
        "turns": n_turns,
        "tool_calls": sum(r.tool_stats.calls for r in rollouts),
        "generate_s_per_turn": generate / n_turns,
        "engine_overhead_ms_per_turn": 1000 * (total - generate) / n_turns,
        "overhead_pct": 100 * (total - generate) / generate,
    }


def _python_tool_class(module_path: str | None):
    """`PythonTool`, or the one defined in another copy of trl_appo/tools/python.py (to measure "before")."""
    if not module_path:
        from trl_appo.tools import PythonTool

        return PythonTool
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("trl_appo.tools._bench_python", module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.PythonTool


def bench_sandbox(
    calls: int, concurrent: int = 16, module_path: str | None = None, via_registry: bool = False
) -> dict[str, float]:
    """Latency of `print(1)`: `calls` sequential calls, then `concurrent` calls issued at once (threads).

    `via_registry`: each call goes through `ToolRegistry.execute` (argument binding, timeout, concurrency slots), as
    the rollout engine makes it, instead of `PythonTool.run`.
    """
    from concurrent.futures import ThreadPoolExecutor

    tool = _python_tool_class(module_path)(timeout=10)
    if via_registry:
        from trl_appo.tools import ToolCall, ToolRegistry

        registry = ToolRegistry([tool])

        def run() -> str:
            return registry.execute(ToolCall("python", "print(1)")).content
    else:

        def run() -> str:
            return tool.run("print(1)").text

    run()  # warm the page cache
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        assert run() == "1"
        times.append(time.perf_counter() - start)
    times.sort()

    def one(_: int) -> float:
        start = time.perf_counter()
        assert run() == "1"
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        each = sorted(pool.map(one, range(concurrent)))
    wall = time.perf_counter() - start
    isolation = tool.isolation
    return {
        "calls": calls,
        "median_ms": 1000 * statistics.median(times),
        "p90_ms": 1000 * times[int(0.9 * (len(times) - 1))],
        "concurrent": concurrent,
        "concurrent_wall_ms": 1000 * wall,
        "concurrent_median_ms": 1000 * statistics.median(each),
        "isolation": isolation if isinstance(isolation, str) else ("legacy" if isolation else "?"),
    }


def bench_sandbox_ab(calls: int, module_path: str) -> dict[str, dict[str, float]]:
    """`print(1)` latency of this checkout's `PythonTool` and another copy's, calls alternating (ABBA order), so
    both see the same machine load at every moment."""
    tools = {"other": _python_tool_class(module_path)(timeout=10), "this": _python_tool_class(None)(timeout=10)}
    times: dict[str, list[float]] = {k: [] for k in tools}
    for tool in tools.values():
        tool.run("print(1)")
    for i in range(calls):
        for k in ("other", "this") if i % 2 == 0 else ("this", "other"):
            start = time.perf_counter()
            assert tools[k].run("print(1)").text == "1"
            times[k].append(time.perf_counter() - start)
    out = {}
    for k, t in times.items():
        t.sort()
        out[k] = {"median_ms": 1000 * statistics.median(t), "p90_ms": 1000 * t[int(0.9 * (len(t) - 1))]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--sandbox-calls", type=int, default=20)
    parser.add_argument("--sandbox-concurrent", type=int, default=16)
    parser.add_argument("--sandbox-module", default=None,
                        help="another copy of trl_appo/tools/python.py to time instead (e.g. the old one)")
    parser.add_argument("--sandbox-only", action="store_true", help="skip the engine benchmark")
    parser.add_argument("--sandbox-ab", action="store_true",
                        help="with --sandbox-module: alternate calls between it and this checkout's PythonTool")
    parser.add_argument("--via-registry", action="store_true", help="time sandbox calls through ToolRegistry")
    args = parser.parse_args()

    if args.sandbox_ab:
        if not args.sandbox_module:
            parser.error("--sandbox-ab needs --sandbox-module OLD_python.py")
        ab = bench_sandbox_ab(args.sandbox_calls, args.sandbox_module)
        print("\n| PythonTool | `print(1)` median / p90 (calls alternating) |\n|---|---|")
        for name, label in (("other", args.sandbox_module), ("this", "this checkout")):
            print(f"| {label} | {ab[name]['median_ms']:.1f} / {ab[name]['p90_ms']:.1f} ms |")
        return

    s = bench_sandbox(args.sandbox_calls, args.sandbox_concurrent, args.sandbox_module, args.via_registry)
    if args.sandbox_only:
        print("\n| measure | value |\n|---|---|")
        print(f"| sandbox `print(1)` per call, median / p90 over {s['calls']} | "
              f"{s['median_ms']:.0f} / {s['p90_ms']:.0f} ms |")
        print(f"| {s['concurrent']} concurrent calls: wall / median per call | "
              f"{s['concurrent_wall_ms']:.0f} / {s['concurrent_median_ms']:.0f} ms |")
        print(f"| sandbox isolation | {s['isolation']} |")
        return
    e = bench_engine(args.rows, args.turns, args.max_new)
    print("\n| measure | value |\n|---|---|")
    print(f"| batch rows x turns (tool calls) | {e['rows']} x {e['turns']} ({e['tool_calls']}) |")
    print(f"| raw `model.generate` per turn (tiny Qwen2, {args.max_new} new tokens) | "
          f"{1000 * e['generate_s_per_turn']:.1f} ms |")
    print(f"| engine overhead per turn (parse, tools, bookkeeping) | {e['engine_overhead_ms_per_turn']:.2f} ms "
          f"({e['overhead_pct']:.1f}% of generate) |")
    print(f"| sandbox `print(1)` per call, median / p90 over {s['calls']} | "
          f"{s['median_ms']:.0f} / {s['p90_ms']:.0f} ms |")
    print(f"| {s['concurrent']} concurrent calls: wall / median per call | "
          f"{s['concurrent_wall_ms']:.0f} / {s['concurrent_median_ms']:.0f} ms |")
    print(f"| sandbox isolation | {s['isolation']} |")


if __name__ == "__main__":
    main()
