r"""APPO vs GRPO / entropy / random on CPU: cost per step at equal budget M, and learning at equal steps.

`python benchmarks/compare.py` (default size, < 60 min on 2 CPU cores), `--quick` (smoke, < 2 min).

Model and data (same for every criterion): the tiny Qwen2 of `trl_appo.testing` with the demo's minimal chat
template (`trl_appo.demo.MINI_CHAT_TEMPLATE`), warm-started by `trl_appo.sft.sft_warm_start` on the ideal
tag-protocol transcripts of `trl_appo.tasks.make_sft_transcripts` (the demo's Part B recipe), then RL on
`trl_appo.tasks.make_tiny_tasks` (`What is 347 * 29?`) with the paper's tag protocol and the sandboxed
`PythonTool`, reward `format_answer_type_reward` (-1 bad format, else 1 if the boxed answer is right, 0 if not).
The warm-started weights are cached (`--cache-dir`, keyed by the warm-start settings) so later runs skip the SFT.

Part 1, cost (`cost` in the JSON): each criterion trains `cost_steps` optimizer steps from the same warm start with
the same seed and data, in one process, sequentially (round-robin over `cost_repeats` repeats, after one discarded
warm-up run); per step: wall time, decoded tokens (model tokens kept by the rollout engine, roots and branches,
from the trainer's `appo/root/decoded_tokens` and `appo/branch/decoded_tokens`), forward passes (model forward
calls inside `generate` = decode steps, calls of `generate`, and the scoring/training forwards outside it, plus
the calls of GRPOTrainer's `_get_per_token_logps_and_entropies`), seconds in generate / scoring / tools, and peak
RSS (psutil, sampled every 20 ms during the run; the process's RSS only grows, so the number is the peak during
that run, and its increase over the RSS at the run's start). Every number is also given as a ratio to GRPO's
(`branch_criterion="none"`: M independent roots) measured in the same process.

Part 2, learning (`learning`): each criterion x seed trains `learn_steps` steps; held-out Pass@1 (through the
rollout engine, `trl_appo.evaluation.evaluate`, fixed sampling seed, the training RNG restored afterwards) every
`eval_every` steps. Mean and standard deviation over seeds; plot `learning_curves.png`.

Part 3, analysis (`analysis`): branch placement (near a tool call vs in text, relative position), Ω-degenerate
fraction per schedule, branch vs root rewards, from the trainer's metrics and the branch-tree JSONL.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# label -> APPOConfig overrides. Every branching run uses the same budget split (N roots x (1+B)).
CRITERIA: dict[str, dict[str, Any]] = {
    "grpo": {"branch_criterion": "none"},
    "appo_bs_per_update": {"branch_criterion": "bs", "branch_schedule": "per_update"},
    "appo_bs_per_generation": {"branch_criterion": "bs", "branch_schedule": "per_generation"},
    "entropy": {"branch_criterion": "entropy", "branch_schedule": "per_update"},
    "random": {"branch_criterion": "random", "branch_schedule": "per_update"},
    # Ablations (not run by default; pick with --learn-criteria): which APPO term moves learning at this size?
    "appo_bs_no_scaling": {"branch_criterion": "bs", "branch_schedule": "per_update", "procedure_scale": False,
                           "future_kl": False},
    "appo_roots_only": {"branch_criterion": "bs", "branch_schedule": "per_update", "prefix_credit": False,
                        "procedure_scale": False, "future_kl": False},
    # Branch continuations in the loss (docs/algorithm.md §9): the cost of training on all M rollouts.
    "appo_suffix_per_update": {"branch_criterion": "bs", "branch_schedule": "per_update", "branch_loss": "suffix"},
    "appo_suffix_per_generation": {"branch_criterion": "bs", "branch_schedule": "per_generation",
                                   "branch_loss": "suffix"},
}
COST_CRITERIA = ("grpo", "appo_bs_per_update", "appo_bs_per_generation", "entropy", "random")  # ablations opt-in
LEARNING_CRITERIA = ("grpo", "appo_bs_per_update", "entropy", "random")


@dataclass
class Settings:
    # model + warm start (demo Part B recipe)
    hidden: int = 128
    layers: int = 4
    sft_steps: int = 160
    sft_lr: float = 2e-3
    sft_rows: int = 2000
    warm_seed: int = 0
    # RL (shared by every criterion)
    num_generations: int = 8  # M (the paper's best split is N=4, B=3 of M=16; halved for CPU time)
    num_roots: int = 2  # N (B = M/N - 1 = 3 branch points per root, as in the paper's best split)
    per_device_train_batch_size: int = 8  # rollout slots per optimizer step (one prompt)
    steps_per_generation: int = 4  # 4 optimizer steps per generation batch: Ω is live from the 2nd on
    max_completion_length: int = 48
    min_branch_tokens: int = 8
    max_tool_calls: int = 2
    learning_rate: float = 2e-4
    temperature: float = 1.0
    n_train: int = 512
    # part 1
    cost_steps: int = 8
    cost_repeats: int = 2
    cost_warmup: bool = True  # one discarded 1-step GRPO run first (lazy initialisation, caches)
    cost_criteria: tuple[str, ...] = COST_CRITERIA
    # part 2
    learn_steps: int = 24
    eval_every: int = 12
    heldout: int = 48
    eval_samples: int = 1
    seeds: tuple[int, ...] = (0, 1, 2)
    learn_criteria: tuple[str, ...] = LEARNING_CRITERIA

    @classmethod
    def quick(cls) -> Settings:
        return cls(hidden=32, layers=1, sft_steps=20, sft_rows=200, num_generations=8, num_roots=2,
                   per_device_train_batch_size=8, steps_per_generation=2, max_completion_length=24,
                   min_branch_tokens=4, n_train=32, cost_steps=2, cost_repeats=1, cost_warmup=False, learn_steps=2,
                   eval_every=2, heldout=4, eval_samples=1, seeds=(0,), learn_criteria=("grpo", "appo_bs_per_update"))

    def warm_key(self) -> str:
        keys = ("hidden", "layers", "sft_steps", "sft_lr", "sft_rows", "warm_seed")
        from trl_appo.testbed import cache_key

        return cache_key({k: getattr(self, k) for k in keys})


# ------------------------------------------------------------------------------------------------ environment


def _setup() -> None:
    from trl_appo.demo import _setup_environment

    _setup_environment()
    import warnings

    warnings.filterwarnings("ignore")


class Resources:
    """Build the tokenizer, the warm-started weights (cached), data and tools once per process."""

    def __init__(self, s: Settings, cache_dir: Path, log=print):
        from trl_appo import tasks
        from trl_appo.testbed import tiny_tokenizer
        from trl_appo.tools import PythonTool

        self.s = s
        self.tokenizer = tiny_tokenizer()
        self.data = tasks.make_tiny_tasks(s.n_train, s.heldout, seed=0)
        self.tools = [PythonTool()]
        from learning import warm_state  # one warm start for both benchmarks (same settings, same cache key)

        path = cache_dir / f"warm_{s.warm_key()}.pt"
        self.warm_start = {"cache": str(path), "cached": path.exists()}
        t0 = time.perf_counter()
        self.state = warm_state(s, cache_dir, log)
        if not self.warm_start["cached"]:
            self.warm_start["seconds"] = round(time.perf_counter() - t0, 1)

    def new_model(self, load: bool = True):
        from trl_appo.testbed import tiny_model

        return tiny_model(self.tokenizer, self.s.hidden, self.s.layers, self.s.warm_seed, self.state if load else None)


def make_args(s: Settings, criterion: str, output_dir: Path, seed: int, steps: int, log_trees: bool):
    from trl_appo.testbed import run_args

    # the clip settings and future-KL form the committed results were measured with (see benchmarks/learning.py)
    kw = {"epsilon_high": 0.28, "delta": 3.0, "future_kl_normalize": False, **CRITERIA[criterion]}
    if kw["branch_criterion"] != "none":
        kw["num_roots"] = s.num_roots
    return run_args(
        output_dir, seed, learning_rate=s.learning_rate, lr_scheduler_type="constant", max_steps=steps,
        num_generations=s.num_generations, per_device_train_batch_size=s.per_device_train_batch_size,
        steps_per_generation=s.steps_per_generation, gradient_accumulation_steps=1,
        max_completion_length=s.max_completion_length, min_branch_tokens=s.min_branch_tokens,
        max_tool_calls=s.max_tool_calls, temperature=s.temperature, disable_tqdm=True, log_branch_trees=log_trees,
        **kw,
    )


def make_trainer(res: Resources, args, callbacks=()):
    from trl_appo import testbed
    from trl_appo.rewards import format_answer_type_reward

    # the log dicts go to the JSON, not the terminal
    return testbed.make_trainer(res.new_model(), res.tokenizer, args, res.data["train"], [format_answer_type_reward],
                                res.tools, callbacks=list(callbacks))


# ------------------------------------------------------------------------------------------------ instrumentation


class Meter:
    """Counts generate calls, forward calls inside/outside generate, log-prob passes, tool time; samples RSS."""

    def __init__(self):
        self.counts = dict(generate_calls=0, generate_rows=0, generate_token_slots=0, decode_forwards=0,
                           other_forwards=0, logps_calls=0)
        self.seconds = dict(generate=0.0, logps=0.0, tools=0.0)
        self._in_generate = 0
        self._undo: list = []
        self.rss_start = self.rss_peak = 0
        self._stop = threading.Event()
        self._thread = None

    # -- patches (this process only)
    def attach(self, trainer) -> None:
        from trl import GRPOTrainer

        from trl_appo.tools import ToolRegistry

        model = trainer.accelerator.unwrap_model(trainer.model)
        meter = self
        orig_generate = model.generate

        def generate(*a, **k):
            meter.counts["generate_calls"] += 1
            meter._in_generate += 1
            t0 = time.perf_counter()
            try:
                out = orig_generate(*a, **k)
            finally:
                meter._in_generate -= 1
                meter.seconds["generate"] += time.perf_counter() - t0
            ids = k.get("input_ids", a[0] if a else None)
            width = ids.shape[1] if ids is not None else 0
            seqs = out.sequences if hasattr(out, "sequences") else out
            meter.counts["generate_rows"] += int(seqs.shape[0])
            meter.counts["generate_token_slots"] += int(seqs.shape[0]) * max(int(seqs.shape[1]) - width, 0)
            return out

        model.generate = generate
        self._undo.append(lambda: delattr(model, "generate"))

        def hook(_module, _args):
            meter.counts["decode_forwards" if meter._in_generate else "other_forwards"] += 1

        handle = model.register_forward_pre_hook(hook)
        self._undo.append(handle.remove)

        self._time_method(GRPOTrainer, "_get_per_token_logps_and_entropies", "logps", count="logps_calls")
        self._time_method(ToolRegistry, "execute_many", "tools")

    def _time_method(self, cls, name: str, key: str, count: str | None = None) -> None:
        """Patch `cls.name` to add its wall time to `seconds[key]` (and count calls in `counts[count]`)."""
        meter, orig = self, getattr(cls, name)

        def timed(self_, *a, **k):
            if count:
                meter.counts[count] += 1
            t0 = time.perf_counter()
            try:
                return orig(self_, *a, **k)
            finally:
                meter.seconds[key] += time.perf_counter() - t0

        setattr(cls, name, timed)
        self._undo.append(lambda: setattr(cls, name, orig))

    def detach(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    # -- RSS sampling
    def start_rss(self) -> None:
        import psutil

        proc = psutil.Process()
        self.rss_start = self.rss_peak = proc.memory_info().rss

        def loop():
            while not self._stop.wait(0.02):
                self.rss_peak = max(self.rss_peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop_rss(self) -> None:
        import psutil

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.rss_peak = max(self.rss_peak, psutil.Process().memory_info().rss)


def _sum_metric(history, key: str) -> float:
    return float(sum(e[key] for e in history if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])))


def _mean_metric(history, key: str) -> float:
    vals = [float(e[key]) for e in history if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
    return statistics.fmean(vals) if vals else math.nan


APPO_KEYS = ("appo/branch_points_per_root", "appo/branch_position_rel", "appo/branch_near_tool_frac",
             "appo/branch_strict_frac", "appo/omega_degenerate_frac", "appo/bs_abs_mean", "appo/branch_reward",
             "appo/root_reward", "appo/credit_abs_mean", "appo/future_kl_weight_mean", "appo/future_kl_weight_max",
             "appo/root/tool_calls_per_rollout", "appo/branch/tool_calls_per_rollout", "reward")


def cost_run(res: Resources, criterion: str, workdir: Path, steps: int, profile: bool = False) -> dict[str, Any]:
    """Train `steps` steps of one criterion (seed 0) and measure its cost."""
    import gc

    import torch

    s = res.s
    gc.collect()
    args = make_args(s, criterion, workdir / f"cost_{criterion}", seed=0, steps=steps, log_trees=False)
    torch.manual_seed(0)
    trainer = make_trainer(res, args)
    meter = Meter()
    meter.attach(trainer)
    prof = cProfile.Profile() if profile else None
    meter.start_rss()
    t0 = time.perf_counter()
    try:
        if prof is not None:
            prof.enable()
        trainer.train()
    finally:
        if prof is not None:
            prof.disable()
        wall = time.perf_counter() - t0
        meter.stop_rss()
        meter.detach()
    hist = trainer.state.log_history
    root_tok = _sum_metric(hist, "appo/root/decoded_tokens")
    branch_tok = _sum_metric(hist, "appo/branch/decoded_tokens")
    out = {
        "steps": steps,
        "wall_s_per_step": wall / steps,
        "decoded_tokens_per_step": (root_tok + branch_tok) / steps,
        "root_decoded_tokens_per_step": root_tok / steps,
        "branch_decoded_tokens_per_step": branch_tok / steps,
        "generate_token_slots_per_step": meter.counts["generate_token_slots"] / steps,
        "decode_forwards_per_step": meter.counts["decode_forwards"] / steps,
        "generate_calls_per_step": meter.counts["generate_calls"] / steps,
        "other_forwards_per_step": meter.counts["other_forwards"] / steps,
        "logps_calls_per_step": meter.counts["logps_calls"] / steps,
        "forward_passes_per_step": (meter.counts["decode_forwards"] + meter.counts["other_forwards"]) / steps,
        "generate_s_per_step": meter.seconds["generate"] / steps,
        "logps_s_per_step": meter.seconds["logps"] / steps,
        "tools_s_per_step": meter.seconds["tools"] / steps,
        "branch_score_s_per_step": _sum_metric(hist, "appo/seconds_score_branches") / steps,
        "branch_generate_s_per_step": _sum_metric(hist, "appo/seconds_generate_branches") / steps,
        "branch_reward_s_per_step": _sum_metric(hist, "appo/seconds_reward_branches") / steps,
        "peak_rss_mib": meter.rss_peak / 2**20,
        "rss_increase_mib": (meter.rss_peak - meter.rss_start) / 2**20,
        "train_reward_mean": _mean_metric(hist, "reward"),
        "metrics_mean": {k: _mean_metric(hist, k) for k in APPO_KEYS},
    }
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        out["profile_top_cumulative"] = buf.getvalue().splitlines()
    del trainer
    gc.collect()
    return out


RATIO_KEYS = ("wall_s_per_step", "decoded_tokens_per_step", "forward_passes_per_step", "decode_forwards_per_step",
              "generate_calls_per_step", "logps_calls_per_step", "generate_token_slots_per_step", "peak_rss_mib")


def part_cost(res: Resources, workdir: Path, log=print, profile: bool = False) -> dict[str, Any]:
    s = res.s
    crit = [c for c in s.cost_criteria if c != "grpo"]
    order = ["grpo", *crit]
    if s.cost_warmup:
        log("[cost] warm-up run (discarded): grpo, 1 step")
        cost_run(res, "grpo", workdir, steps=1)
    runs: dict[str, list[dict]] = {c: [] for c in order}
    for rep in range(s.cost_repeats):
        for c in order if rep % 2 == 0 else order[::-1]:  # alternate the order: drift hits every criterion
            r = cost_run(res, c, workdir, s.cost_steps)
            runs[c].append(r)
            log(f"[cost] rep {rep} {c:24s} {r['wall_s_per_step']:.2f} s/step, {r['decoded_tokens_per_step']:.0f} "
                f"decoded tok/step, {r['forward_passes_per_step']:.0f} fwd/step, peak RSS {r['peak_rss_mib']:.0f} MiB")
    per: dict[str, Any] = {}
    for c in order:
        keys = [k for k in runs[c][0] if isinstance(runs[c][0][k], (int, float))]
        med = {k: statistics.median(r[k] for r in runs[c]) for k in keys}
        med["wall_s_per_step_repeats"] = [r["wall_s_per_step"] for r in runs[c]]
        med["metrics_mean"] = {k: statistics.fmean(r["metrics_mean"][k] for r in runs[c]) for k in APPO_KEYS}
        per[c] = med
    for c in order:
        per[c]["ratio_to_grpo"] = {
            k: (per[c][k] / per["grpo"][k] if per["grpo"][k] else math.nan) for k in RATIO_KEYS
        }
    out = {"criteria": per, "order": order, "repeats": s.cost_repeats, "steps_per_run": s.cost_steps,
           "statistic": "median over repeats"}
    if profile:
        log("[cost] cProfile run of appo_bs_per_update and grpo")
        out["profile"] = {c: cost_run(res, c, workdir, s.cost_steps, profile=True)["profile_top_cumulative"]
                          for c in ("appo_bs_per_update", "grpo") if c in order}
    return out


# ------------------------------------------------------------------------------------------------ part 2


def heldout_pass1(res: Resources, model, seed: int = 1234) -> dict[str, float]:
    from trl_appo import testbed
    from trl_appo.rewards import format_answer_type_reward

    s = res.s
    r = testbed.heldout_eval(model, res.tokenizer, res.data["heldout"], n=s.eval_samples, seed=seed, tools=res.tools,
                             score_fn=format_answer_type_reward, batch_size=64,
                             max_completion_length=s.max_completion_length, max_tool_calls=s.max_tool_calls,
                             keep_text=False)
    return testbed.pass1_numbers(r)


def part_learning(res: Resources, workdir: Path, log=print) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    s = res.s
    t0 = time.perf_counter()
    base = heldout_pass1(res, res.new_model())
    log(f"[learn] warm start: held-out Pass@1 {base['pass@1']:.3f}, mean reward {base['mean_reward']:+.3f}, "
        f"format ok {base['format_ok']:.2f} ({time.perf_counter() - t0:.0f} s)")
    runs: dict[str, list[dict]] = {c: [] for c in s.learn_criteria}

    class EvalCallback(TrainerCallback):
        def __init__(self):
            self.curve = [{"step": 0, **base}]

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % s.eval_every == 0 or state.global_step == state.max_steps:
                self.curve.append({"step": state.global_step, **heldout_pass1(res, model)})

    for seed in s.seeds:
        for c in s.learn_criteria:
            t1 = time.perf_counter()
            args = make_args(s, c, workdir / f"learn_{c}_seed{seed}", seed=seed, steps=s.learn_steps,
                             log_trees=c != "grpo")
            torch.manual_seed(seed)
            cb = EvalCallback()
            trainer = make_trainer(res, args, callbacks=[cb])
            trainer.train()
            hist = [dict(e) for e in trainer.state.log_history]
            run = {"seed": seed, "curve": cb.curve, "seconds": round(time.perf_counter() - t1, 1),
                   "train_reward": [{"step": e["step"], "reward": e["reward"]} for e in hist if "reward" in e],
                   "metrics_mean": {k: _mean_metric(hist, k) for k in APPO_KEYS},
                   "output_dir": args.output_dir}
            if c != "grpo":
                run["branch_trees"] = branch_tree_summary(Path(args.output_dir))
            runs[c].append(run)
            log(f"[learn] seed {seed} {c:22s} Pass@1 {' '.join(format(p['pass@1'], '.2f') for p in cb.curve)} "
                f"({run['seconds']:.0f} s)")
            del trainer
    summary = {}
    for c, rs in runs.items():
        steps = [p["step"] for p in rs[0]["curve"]]
        table = []
        for i, st in enumerate(steps):
            vals = [r["curve"][i]["pass@1"] for r in rs]
            table.append({"step": st, "mean": statistics.fmean(vals),
                          "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "min": min(vals),
                          "max": max(vals)})
        finals = [r["curve"][-1]["pass@1"] for r in rs]
        aucs = [statistics.fmean(p["pass@1"] for p in r["curve"][1:]) for r in rs]
        summary[c] = {"pass1_curve": table, "final_pass1_mean": statistics.fmean(finals),
                      "final_pass1_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                      "final_pass1_per_seed": finals,
                      "mean_pass1_after_step0": statistics.fmean(aucs),
                      "final_mean_reward": statistics.fmean(r["curve"][-1]["mean_reward"] for r in rs),
                      "train_reward_mean": statistics.fmean(statistics.fmean(x["reward"] for x in r["train_reward"])
                                                            for r in rs)}
    return {"warm_start_heldout": base, "runs": runs, "summary": summary, "seeds": list(s.seeds)}


def branch_tree_summary(output_dir: Path) -> dict[str, Any]:
    from trl_appo.demo import summarize_branch_trees
    from trl_appo.viz import load_branch_trees

    try:
        records = load_branch_trees(output_dir)
    except (FileNotFoundError, ValueError):
        return {}
    out = summarize_branch_trees(records)
    # where in the tag protocol each branch point fell (by the text of the root up to and including the token)
    kinds = {"in_python_call": 0, "after_result_before_answer": 0, "in_answer": 0, "before_first_call": 0,
             "other": 0}
    strict = deg = n = 0
    per_degenerate = {True: [], False: []}
    for r in records:
        texts = r.get("token_text") or []
        for b in r.get("branches", []):
            pos = int(b.get("position", -1))
            if pos < 0:
                continue
            n += 1
            strict += bool(b.get("strict"))
            deg += bool(r.get("degenerate"))
            per_degenerate[bool(r.get("degenerate"))].append(float(b["reward"]) - float(r["reward"]))
            before = "".join(texts[: pos + 1])
            if before.count("<answer>") > 0:
                kinds["in_answer"] += 1
            elif before.count("<python>") > before.count("</python>"):
                kinds["in_python_call"] += 1
            elif "</result>" in before:
                kinds["after_result_before_answer"] += 1
            elif "<python>" not in before:
                kinds["before_first_call"] += 1
            else:
                kinds["other"] += 1
    out["position_kind_frac"] = {k: v / n for k, v in kinds.items()} if n else {}
    out["branch_points"] = n
    out["branch_minus_root_reward_mean"] = {
        ("degenerate" if k else "live_omega"): (statistics.fmean(v) if v else math.nan)
        for k, v in per_degenerate.items()
    }
    return out


# ------------------------------------------------------------------------------------------------ analysis, plot


def part_analysis(cost: dict | None, learning: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if learning:
        for c, rs in learning["runs"].items():
            if c == "grpo":
                continue
            m = {k: statistics.fmean(r["metrics_mean"][k] for r in rs) for k in APPO_KEYS
                 if all(math.isfinite(r["metrics_mean"][k]) for r in rs)}
            trees = [r.get("branch_trees") or {} for r in rs]
            kinds = {}
            for t in trees:
                for k, v in (t.get("position_kind_frac") or {}).items():
                    kinds.setdefault(k, []).append(v)

            def tmean(key):
                vals = [t[key] for t in trees if isinstance(t.get(key), (int, float)) and math.isfinite(t[key])]
                return statistics.fmean(vals) if vals else math.nan

            out[c] = {
                "source": "learning runs (all seeds)",
                "near_tool_frac": m.get("appo/branch_near_tool_frac", math.nan),
                "branch_position_rel": m.get("appo/branch_position_rel", math.nan),
                "strict_frac": m.get("appo/branch_strict_frac", math.nan),
                "omega_degenerate_frac": m.get("appo/omega_degenerate_frac", math.nan),
                "root_reward": m.get("appo/root_reward", math.nan),
                "branch_reward": m.get("appo/branch_reward", math.nan),
                "branch_beats_root_frac": tmean("branch_beats_root_frac"),
                "position_kind_frac": {k: statistics.fmean(v) for k, v in kinds.items()},
            }
    if cost:
        for c, r in cost["criteria"].items():
            m = r.get("metrics_mean") or {}
            if c == "grpo" or c in out or not m:
                continue
            out[c] = {
                "source": "cost runs (seed 0, no branch trees)",
                "near_tool_frac": m.get("appo/branch_near_tool_frac", math.nan),
                "branch_position_rel": m.get("appo/branch_position_rel", math.nan),
                "strict_frac": m.get("appo/branch_strict_frac", math.nan),
                "omega_degenerate_frac": m.get("appo/omega_degenerate_frac", math.nan),
                "root_reward": m.get("appo/root_reward", math.nan),
                "branch_reward": m.get("appo/branch_reward", math.nan),
                "branch_beats_root_frac": math.nan,
                "position_kind_frac": {},
            }
    return out


def plot(learning: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trl_appo.viz import plot_learning_curves

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    heldout = {c: [[{"step": p["step"], "heldout_pass@1": p["pass@1"]} for p in r["curve"]] for r in rs]
               for c, rs in learning["runs"].items()}
    plot_learning_curves(heldout, metric="heldout_pass@1", ax=axes[0], spread="std",
                         title="held-out Pass@1 (mean ± std over seeds)")
    train = {c: [r["train_reward"] for r in rs] for c, rs in learning["runs"].items()}
    plot_learning_curves(train, metric="reward", ax=axes[1], spread="std", smooth=4,
                         title="training reward of root rollouts (moving avg 4, mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke size (< 2 min)")
    p.add_argument("--parts", default="cost,learning", help="comma list of: cost, learning (default both)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/compare[_quick].json)")
    p.add_argument("--plot", default=None, help="learning-curve PNG (default benchmarks/results/learning_curves"
                   "[_quick].png)")
    p.add_argument("--workdir", default=None, help="trainer output dirs (default a temp dir)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "trl_appo", "bench"),
                   help="where the warm-started weights are cached")
    p.add_argument("--profile", action="store_true", help="also cProfile one APPO and one GRPO cost run")
    p.add_argument("--seeds", default=None, help="comma list of seeds for the learning part")
    p.add_argument("--num-generations", type=int, default=None, help="budget M per prompt (default 8; paper 16); "
                   "also sets per_device_train_batch_size = M (one prompt per optimizer step)")
    p.add_argument("--num-roots", type=int, default=None, help="N roots of the branching criteria (default 2)")
    p.add_argument("--learn-criteria", default=None, help=f"comma list of criteria for the learning part, from "
                   f"{', '.join(CRITERIA)} (default {', '.join(LEARNING_CRITERIA)})")
    p.add_argument("--cost-criteria", default=None, help=f"comma list of criteria for the cost part, from "
                   f"{sorted(CRITERIA)} (grpo always runs: it is the baseline)")
    p.add_argument("--learn-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--cost-steps", type=int, default=None)
    p.add_argument("--cost-repeats", type=int, default=None)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--report", default=None, metavar="JSON", help="print the README's markdown tables of a results "
                   "JSON and exit")
    return p


def markdown_tables(result: dict) -> str:
    """The README tables of one results JSON (`--report PATH`)."""
    lines: list[str] = []
    f2 = lambda x: "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.2f}"  # noqa: E731
    cost = result.get("cost")
    if cost:
        lines += ["| criterion | wall s/step | decoded tokens/step (roots + branches) | forward passes/step (decode + "
                  "other) | decode slots/step | generate calls/step | scoring passes/step | peak RSS MiB | wall | tokens | "
                  "fwd | slots | RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c, r in cost["criteria"].items():
            q = r["ratio_to_grpo"]
            lines.append(
                f"| {c} | {r['wall_s_per_step']:.2f} | {r['decoded_tokens_per_step']:.0f} "
                f"({r['root_decoded_tokens_per_step']:.0f} + {r['branch_decoded_tokens_per_step']:.0f}) | "
                f"{r['forward_passes_per_step']:.1f} ({r['decode_forwards_per_step']:.1f} + "
                f"{r['other_forwards_per_step']:.1f}) | {r['generate_token_slots_per_step']:.0f} | "
                f"{r['generate_calls_per_step']:.2f} | "
                f"{r['logps_calls_per_step']:.2f} | {r['peak_rss_mib']:.0f} | {f2(q['wall_s_per_step'])}× | "
                f"{f2(q['decoded_tokens_per_step'])}× | {f2(q['forward_passes_per_step'])}× | "
                f"{f2(q['generate_token_slots_per_step'])}× | {f2(q['peak_rss_mib'])}× |"
            )
        lines += ["", "| criterion | generate s/step | scoring+loss log-prob s/step | tool s/step | branch scoring "
                  "s/step | branch generation s/step | branch reward s/step | wall s/step per repeat |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for c, r in cost["criteria"].items():
            lines.append(
                f"| {c} | {r['generate_s_per_step']:.2f} | {r['logps_s_per_step']:.2f} | {r['tools_s_per_step']:.2f} | "
                f"{r['branch_score_s_per_step']:.2f} | {r['branch_generate_s_per_step']:.2f} | "
                f"{r['branch_reward_s_per_step']:.3f} | {', '.join(f'{x:.2f}' for x in r['wall_s_per_step_repeats'])} |"
            )
        lines.append("")
    learning = result.get("learning")
    if learning:
        steps = [p["step"] for p in next(iter(learning["summary"].values()))["pass1_curve"]]
        lines += ["| criterion | " + " | ".join(f"Pass@1 step {st}" for st in steps) + " | final per seed | "
                  "train reward (mean) |", "|---|" + "---:|" * (len(steps) + 2)]
        for c, r in learning["summary"].items():
            cells = [f"{p['mean']:.3f} ± {p['std']:.3f}" for p in r["pass1_curve"]]
            lines.append(f"| {c} | " + " | ".join(cells) + " | "
                         + ", ".join(f"{x:.3f}" for x in r["final_pass1_per_seed"])
                         + f" | {r['train_reward_mean']:+.3f} |")
        lines.append("")
    analysis = result.get("analysis") or {}
    rows = [(c, a) for c, a in analysis.items() if "near_tool_frac" in a]
    if rows:
        lines += ["| criterion | near a tool call | in `<python>` call | after `</result>`, before `<answer>` | in "
                  "`<answer>` | rel. position | strict | Ω-degenerate roots | root reward | branch reward | "
                  "branch beats root |", "|---|" + "---:|" * 10]
        for c, a in rows:
            k = a.get("position_kind_frac") or {}
            lines.append(
                f"| {c} | {f2(a['near_tool_frac'])} | {f2(k.get('in_python_call'))} | "
                f"{f2(k.get('after_result_before_answer'))} | {f2(k.get('in_answer'))} | "
                f"{f2(a['branch_position_rel'])} | {f2(a['strict_frac'])} | {f2(a['omega_degenerate_frac'])} | "
                f"{a['root_reward']:+.3f} | {a['branch_reward']:+.3f} | {f2(a['branch_beats_root_frac'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.report:
        print(markdown_tables(json.loads(Path(a.report).read_text())))
        return 0
    _setup()
    import tempfile

    import torch

    # One intra-op thread: the ~1M-parameter model gains nothing from two, and on a shared 2-core machine two
    # OpenMP threads per process spin against the other jobs and make step times erratic (measured: 0.5-10 s/step).
    torch.set_num_threads(a.threads)
    s = Settings.quick() if a.quick else Settings()
    for name in ("learn_steps", "eval_every", "cost_steps", "cost_repeats", "heldout"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    if a.seeds:
        s.seeds = tuple(int(x) for x in a.seeds.split(","))
    if a.num_generations:
        s.num_generations = s.per_device_train_batch_size = a.num_generations
    if a.num_roots:
        s.num_roots = a.num_roots
    if a.cost_criteria:
        unknown = set(a.cost_criteria.split(",")) - set(CRITERIA)
        if unknown:
            raise SystemExit(f"unknown cost criteria {sorted(unknown)}; choose from {list(CRITERIA)}")
        s.cost_criteria = tuple(dict.fromkeys(("grpo", *a.cost_criteria.split(","))))
    if a.learn_criteria:
        unknown = set(a.learn_criteria.split(",")) - set(CRITERIA)
        if unknown:
            raise SystemExit(f"unknown criteria {sorted(unknown)}; choose from {list(CRITERIA)}")
        s.learn_criteria = tuple(a.learn_criteria.split(","))
    parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    suffix = "_quick" if a.quick else ""
    out_path = Path(a.out) if a.out else RESULTS_DIR / f"compare{suffix}.json"
    plot_path = Path(a.plot) if a.plot else RESULTS_DIR / f"learning_curves{suffix}.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="appo_bench_"))

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    log(f"benchmarks/compare.py ({'quick' if a.quick else 'default'}): parts {sorted(parts)}, workdir {workdir}")
    res = Resources(s, Path(a.cache_dir), log=log)
    result: dict[str, Any] = {
        "command": "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": a.quick,
        "settings": {**asdict(s), "num_branches": s.num_generations // s.num_roots - 1,
                     "criteria": {c: CRITERIA[c] for c in CRITERIA}},
        "warm_start": res.warm_start,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads(),
                    "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    cost = learning = None
    if "cost" in parts:
        tc = time.perf_counter()
        cost = part_cost(res, workdir, log=log, profile=a.profile)
        cost["seconds"] = round(time.perf_counter() - tc, 1)
        result["cost"] = cost
        _write(out_path, result)
    if "learning" in parts:
        tl = time.perf_counter()
        learning = part_learning(res, workdir, log=log)
        learning["seconds"] = round(time.perf_counter() - tl, 1)
        result["learning"] = learning
        try:
            plot(learning, plot_path)
            result["plot"] = str(plot_path.relative_to(RESULTS_DIR.parent.parent)) if plot_path.is_relative_to(
                RESULTS_DIR.parent.parent) else str(plot_path)
        except Exception as e:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
            log(f"[plot] failed: {e!r}")
    result["analysis"] = part_analysis(cost, learning)
    result["machine"]["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    _write(out_path, result)
    print_tables(result, log)
    log(f"wrote {out_path} ({result['wall_seconds']:.0f} s)")
    return 0


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(result), indent=1))
    os.replace(tmp, path)


def print_tables(result: dict, log=print) -> None:
    cost = result.get("cost")
    if cost:
        log("\ncost per optimizer step (median over repeats; ratio to GRPO in parentheses)")
        log(f"{'criterion':24s} {'wall s':>14s} {'decoded tok':>16s} {'fwd passes':>14s} {'gen calls':>12s} "
            f"{'peak RSS MiB':>16s}")
        for c, r in cost["criteria"].items():
            q = r["ratio_to_grpo"]
            log(f"{c:24s} {r['wall_s_per_step']:7.2f} ({q['wall_s_per_step']:.2f}) "
                f"{r['decoded_tokens_per_step']:8.0f} ({q['decoded_tokens_per_step']:.2f}) "
                f"{r['forward_passes_per_step']:6.0f} ({q['forward_passes_per_step']:.2f}) "
                f"{r['generate_calls_per_step']:4.1f} ({q['generate_calls_per_step']:.2f}) "
                f"{r['peak_rss_mib']:7.0f} ({q['peak_rss_mib']:.2f})")
    learning = result.get("learning")
    if learning:
        log("\nheld-out Pass@1 (mean ± std over seeds)")
        for c, r in learning["summary"].items():
            log(f"{c:24s} " + "  ".join(f"{p['step']}: {p['mean']:.3f}±{p['std']:.3f}" for p in r["pass1_curve"]))


if __name__ == "__main__":
    sys.exit(main())
