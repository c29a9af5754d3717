r"""Does APPO out-learn GRPO at equal budget? A learning benchmark that can tell.

    python benchmarks/learning.py                      # the default grid (see VARIANTS / DEFAULT_GRID)
    python benchmarks/learning.py --variants grpo,suffix_local --seeds 0,1,2
    python benchmarks/learning.py --report             # rebuild the tables and picture from the saved runs
    python benchmarks/learning.py --quick              # smoke (the tests run this)

The task (the same for every variant; nothing here is tuned per variant): `trl_appo.tasks.make_tiny_tasks`
(``What is 347 * 29?``, the paper's tag protocol, one `<python>` call, answer in `\boxed{}`), reward
`format_answer_type_reward` (−1 bad format, 1 right, 0 wrong). The model is the tiny Qwen2 of `trl_appo.testing`
(~1M parameters, the demo's minimal chat template), warm-started by a deliberately short SFT on ideal transcripts
(`trl_appo.sft.sft_warm_start`, cached by its settings) so that it calls the tool but still miscopies digits: RL has
20+ points of headroom. The `python` tool here is an in-process evaluator of arithmetic `print(...)` programs
(`ArithmeticPython`): the same outputs as the sandbox for these programs, without a process per call, so the CPU
goes to the model. (The sandbox's own cost is measured in bench_rollout.py.)

Protocol: every variant trains `steps` optimizer steps at the same budget M rollouts per prompt, the same prompts
per step, the same learning rate and seeds. Held-out Pass@1 = the mean over `samples` samples at T=1 of `heldout`
unseen prompts, measured every `eval_every` steps with a fixed sampling seed (the training RNG is restored after).
Each (variant, seed) runs in its own process with one torch thread; `workers` processes run side by side.
Defaults are to be chosen on the *training* reward (`train_reward_last`, the roots' mean reward over the last
quarter of training); the held-out figures are what we report.

Regimes (`--regime`, issue 15): beside today's task (`tiny`), three chain tasks where trees should win, designed
before any APPO result on them (REGIMES below): `deep` (6 dependent tool calls, ~136 model-written tokens per
rollout, warm start at Pass@1 10-20 %, budgets `--num-generations 4` and `8`), `hard` (a mix of short and long
chains: 30-50 % of prompts with no correct rollout of 8 at the start) and `oracle` (3 calls; a failed rollout's
first wrong token is known from the gold transcript, `trl_appo.tasks.first_wrong_token`). Binary final reward.
Variant `grpo_2xm` is GRPO at twice the budget M (the reference); `--lr 1e-4,2e-4,4e-4` runs each learning rate;
runs are named `<variant>__m<M>__lr<lr>` under `results/learning_<regime>/`, and the report adds Pass@4, Δ at
equal decoded tokens, tool calls per step and a best-learning-rate table (chosen on the training reward).
`--calibrate` measures a regime's warm start only (`results/calibration_regimes.json`).

Each run writes `results/learning/<variant>__seed<k>.json`; existing runs are skipped (`--force` reruns), so the
grid can be grown run by run; `--report` aggregates whatever is there into `results/learning.json`, the markdown
table between the `learning` markers of benchmarks/README.md, and `results/learning_curves_v2.png`
(Pass@1 against optimizer steps, decoded model tokens, tool calls (new runs) and training wall seconds).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

# The clip settings and future-KL form every committed result was measured with (the library's defaults before
# APPOConfig kept GRPOConfig's: epsilon_high/delta None, future-KL weight normalised); pinned so reruns compare.
MEASURED_WITH = {"epsilon_high": 0.28, "delta": 3.0, "future_kl_normalize": False}
GRPO = {"branch_criterion": "none", "future_kl": False}
_APPO = {"branch_criterion": "bs", "branch_schedule": "per_update"}
# label -> APPOConfig overrides (num_generations comes from the settings unless given here).
VARIANTS: dict[str, dict[str, Any]] = {
    "grpo": GRPO,
    # GRPO at twice the learning rate: APPO's future-aware weight 1 + b·f (b = 1, f >= 1) at least doubles every
    # advantage, i.e. the step size; this control tells that apart from the credit it carries.
    "grpo_lr2x": {**GRPO, "learning_rate": 2e-4},
    "appo_paper_n4b1": {**_APPO, "num_roots": 4, "branch_loss": "none"},
    "appo_paper_n2b3": {**_APPO, "num_roots": 2, "branch_loss": "none"},
}
for _adv, _extra in (("dual", {"branch_advantage": "dual_group"}),
                     ("joint", {"branch_advantage": "dual_group", "dual_groups": False}),
                     ("local", {"branch_advantage": "local"})):
    _S = {**_APPO, "branch_loss": "suffix", **_extra}
    VARIANTS.update({
        f"suffix_{_adv}_n4b1": {**_S, "num_roots": 4},
        f"suffix_{_adv}_n2b3": {**_S, "num_roots": 2},
        f"suffix_{_adv}_nofkl_n4b1": {**_S, "num_roots": 4, "future_kl": False},
        f"suffix_{_adv}_resample_n4b1": {**_S, "num_roots": 4, "branch_point_token": "resample"},
        f"suffix_{_adv}_entropy_n4b1": {**_S, "num_roots": 4, "branch_criterion": "entropy"},
        f"suffix_{_adv}_random_n4b1": {**_S, "num_roots": 4, "branch_criterion": "random"},
        f"suffix_{_adv}_pergen_n4b1": {**_S, "num_roots": 4, "branch_schedule": "per_generation"},
        f"suffix_{_adv}_m16_n4b3": {**_S, "num_generations": 16, "num_roots": 4},
        f"suffix_{_adv}_m16_n8b1": {**_S, "num_generations": 16, "num_roots": 8},
    })
VARIANTS["grpo_m16"] = {**GRPO, "num_generations": 16}
# GRPO at twice the budget M of the run (`--num-generations`): the regimes' upper reference.
VARIANTS["grpo_2xm"] = {**GRPO, "m_factor": 2}
# At twice the learning rate (where GRPO learns much more): does APPO's gap persist?
VARIANTS["appo_paper_lr2x_n4b1"] = {**VARIANTS["appo_paper_n4b1"], "learning_rate": 2e-4}
VARIANTS["suffix_joint_lr2x_n4b1"] = {**VARIANTS["suffix_joint_n4b1"], "learning_rate": 2e-4}
VARIANTS["suffix_local_lr2x_n4b1"] = {**VARIANTS["suffix_local_n4b1"], "learning_rate": 2e-4}
# The best point semantics ("resample": re-decide the chosen token) with the other choices varied one at a time.
_R = {**VARIANTS["suffix_joint_resample_n4b1"]}
VARIANTS.update({
    "suffix_dual_resample_n4b1": {**_R, "dual_groups": True},
    "suffix_joint_resample_n2b3": {**_R, "num_roots": 2},
    "suffix_joint_resample_entropy_n4b1": {**_R, "branch_criterion": "entropy"},
    "suffix_joint_resample_random_n4b1": {**_R, "branch_criterion": "random"},
    "suffix_joint_resample_lr2x_n4b1": {**_R, "learning_rate": 2e-4},
    "paper_resample_n4b1": {**VARIANTS["appo_paper_n4b1"], "branch_point_token": "resample"},
})
# The regimes' APPO methods (issue 15, items 2-3), all on the library defaults (no MEASURED_WITH pins):
# a pure class swap at equal M; M as a decoded-token budget (`rollout_budget="tokens"`: N roots + N·B branches,
# every leaf trained); the same with branches spent where the roots' rewards all agree or failed; the same,
# branching once per generation batch (no Ω, one branch generate call per generation batch: issue 15, item 5).
VARIANTS["appo"] = {}
VARIANTS["appo_tokens"] = {"rollout_budget": "tokens"}
VARIANTS["appo_tokens_need"] = {"rollout_budget": "tokens", "branch_allocation": "need"}
VARIANTS["appo_tokens_pergen"] = {"rollout_budget": "tokens", "branch_schedule": "per_generation"}
# Where to branch, at equal branch counts (issue 15, item 4, the `oracle` regime): the same tree as
# appo_tokens_pergen (whose criterion is the Branching Score) with entropy, surprisal (−log p of the sampled token),
# uniform random, and the oracle: each failed root branches at its first wrong token, known from the gold
# transcript (trl_appo.tasks.chain_oracle_criterion; correct roots branch at random).
for _criterion in ("entropy", "surprisal", "random", "oracle"):
    VARIANTS[f"appo_pergen_{_criterion}"] = {**VARIANTS["appo_tokens_pergen"], "branch_criterion": _criterion}
# The `hard` regime's question (issue 15, item 3): the per-generation tree with its branches spent where the roots'
# rewards all agree or failed (`branch_allocation="need"`), against the same tree with B per root.
VARIANTS["appo_pergen_need"] = {**VARIANTS["appo_tokens_pergen"], "branch_allocation": "need"}
# Online branching (issue 15, item 5): the same token-budget tree, each branch forked right after a random tool
# result of its root while the roots are generated, so roots and branches share the generate calls (no second series
# of calls, no scoring forward).
VARIANTS["appo_online"] = {"rollout_budget": "tokens", "branch_schedule": "online", "branch_criterion": "random"}
# The picture shows these (when run); every variant is in the table and the JSON.
PLOT_VARIANTS = ("grpo", "appo_paper_n4b1", "suffix_dual_n4b1", "suffix_joint_resample_n4b1", "grpo_lr2x",
                 "appo_paper_lr2x_n4b1", "suffix_joint_resample_lr2x_n4b1")
DEFAULT_GRID = ("grpo", "appo_paper_n4b1", "suffix_dual_n4b1", "suffix_joint_n4b1", "suffix_local_n4b1")


@dataclass
class Settings:
    # model + warm start
    hidden: int = 128
    layers: int = 4
    sft_steps: int = 160
    sft_schedule_steps: int | None = None  # the one-cycle length when SFT stops before its end (None: sft_steps)
    sft_lr: float = 2e-3
    sft_rows: int = 2000
    warm_seed: int = 0
    # RL, shared by every variant
    num_generations: int = 8  # M
    prompts_per_step: int = 2
    steps_per_generation: int = 4
    max_completion_length: int = 48
    min_branch_tokens: int = 8
    max_tool_calls: int = 2
    learning_rate: float = 1e-4
    steps: int = 200
    n_train: int = 2048
    # evaluation
    eval_every: int = 25
    heldout: int = 200
    samples: int = 4
    eval_batch: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    # the task (REGIMES): "tiny" is today's `What is a * b?`; the others are chains of dependent tool calls
    regime: str = "tiny"
    chain_lengths: tuple[int, ...] = ()  # calls per RL/held-out chain, drawn uniformly
    sft_chain_lengths: tuple[int, ...] = ()  # calls per SFT transcript (chain regimes)

    @classmethod
    def quick(cls) -> Settings:
        return cls(hidden=32, layers=1, sft_steps=10, sft_rows=100, steps=2, n_train=16, eval_every=2, heldout=4,
                   samples=1, eval_batch=4, max_completion_length=24, min_branch_tokens=4, seeds=(0,))

    @classmethod
    def for_regime(cls, regime: str, quick: bool = False) -> Settings:
        """The settings of a regime (REGIMES), or its smoke size with `quick`."""
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}; choose from {sorted(REGIMES)}")
        kw = dict(REGIMES[regime])
        if not quick:
            return cls(regime=regime, **kw)
        base = asdict(cls.quick())
        if regime != "tiny":  # the regime's task at smoke size: short chains, few tokens
            base.update(regime=regime, chain_lengths=(1,), sft_chain_lengths=(1,), max_completion_length=40,
                        max_tool_calls=1, samples=2, heldout=2, eval_batch=2, n_train=8)
        return cls(**base)

    def warm_key(self) -> str:
        keys = ("hidden", "layers", "sft_steps", "sft_lr", "sft_rows", "warm_seed")
        if self.regime != "tiny":  # the SFT data (chain regimes with the same SFT share it); tiny's key is unchanged
            keys += ("sft_chain_lengths",)
        if self.sft_schedule_steps is not None:
            keys += ("sft_schedule_steps",)
        from trl_appo.testbed import cache_key

        return cache_key({k: getattr(self, k) for k in keys})


# The regimes where trees should win (issue 15, item 4), designed before any APPO result on them. Each is a chain
# `4163 *99 -28669 +91288 ...` evaluated left to right with one `<python>r=...\nprint(r)</python>` call per
# operation, each copying the previous call's output (trl_appo.tasks.chain_tasks); binary reward (1 if the boxed
# answer is the chain's value, else 0). The SFT warm start sees chains of 1 to 6 calls; its length sets the start.
# The warm start (shared by the three): SFT on 20 000 transcripts of 1-6 calls, stopped at step 1750 of a 3000-step
# one-cycle schedule. Copying digits (from the prompt and from tool output) is learned in a jump between steps
# ~1500 and ~2000 of that schedule (the exact T = 1 probability of the gold transcript of 100 held-out 6-call
# chains: 3 % at 1500, 12 % at 1750, 55 % at 2000, 73 % at 2250); 400 and 1000 full-schedule steps on 2000
# transcripts started `deep` at 0 % (benchmarks/README.md, "Calibration").
_WARM = {"sft_chain_lengths": (1, 2, 3, 4, 5, 6), "sft_steps": 1750, "sft_schedule_steps": 3000, "sft_rows": 20_000}
REGIMES: dict[str, dict[str, Any]] = {
    "tiny": {},
    # deep chain, tight budget: 6 dependent calls, ~136 model-written tokens (~207 with tool output) per rollout;
    # warm start aimed at held-out Pass@1 10-20 %. Budgets M = 4 and M = 8 (`--num-generations`).
    "deep": {**_WARM, "chain_lengths": (6,), "max_completion_length": 256, "max_tool_calls": 6, "eval_every": 100},
    # hard prompts: a mix of short and long chains where 30-50 % of prompts have no correct rollout of 8 at start.
    # Calibrated before any run on it: the mix (2, 6) gave 23.5 % with 0/8 (the 2-call chains are nearly always
    # right, the 6-call ones half the time not), so a third of the prompts are 2-call chains and two thirds 6-call.
    "hard": {**_WARM, "chain_lengths": (2, 6, 6), "max_completion_length": 256, "max_tool_calls": 6,
             "eval_every": 100},
    # known decision point: 3 dependent calls; a failed rollout's first wrong token is where its text leaves the
    # gold transcript (trl_appo.tasks.first_wrong_token), the oracle branch point
    "oracle": {**_WARM, "chain_lengths": (3,), "max_completion_length": 128, "max_tool_calls": 3, "eval_every": 100},
}


# ------------------------------------------------------------------------------------------------ the task's tool


class ArithmeticPython:
    """The `python` tool of this benchmark: runs `print(<integer arithmetic>)` programs in-process, with plain
    assignments (`r=3471*29` then `print(r)`) for the chain regimes.

    Anything else (names, calls other than print, non-integer constants) is an error the model sees, as a failing
    program would be in the sandbox.
    """

    _OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
            ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}

    def _eval(self, node, env):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in self._OPS:
            return self._OPS[type(node.op)](self._eval(node.left, env), self._eval(node.right, env))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self._eval(node.operand, env)
        raise ValueError("unsupported expression")

    def __init__(self):
        import threading

        self.calls = 0  # how many programs ran: the benchmark's own count of tool calls
        self._lock = threading.Lock()

    def __call__(self, code: str) -> str:
        with self._lock:
            self.calls += 1
        try:
            tree = ast.parse(code.strip(), mode="exec")
            out, env = [], {}
            for stmt in tree.body:
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                    env[stmt.targets[0].id] = self._eval(stmt.value, env)
                    continue
                call = stmt.value if isinstance(stmt, ast.Expr) else None
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "print" and len(call.args) == 1:
                    out.append(str(self._eval(call.args[0], env)))
                elif call is not None:
                    out.append(str(self._eval(call, env)))
                else:
                    raise ValueError("unsupported statement")
            return "\n".join(out)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as e:
            return f"Error: {type(e).__name__}: {e}"


def make_tool(fn: ArithmeticPython | None = None):
    from trl_appo.tools import Tool

    return Tool(fn or ArithmeticPython(), name="python", description="Run a Python program that prints a number.")


# ------------------------------------------------------------------------------------------------ one run


def _setup_process() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    from trl_appo import core, tasks

    if "oracle" not in core.BRANCH_CRITERIA:  # the appo_pergen_oracle variant's criterion (reads the gold column)
        core.register_branch_criterion("oracle", needs_context=True)(tasks.chain_oracle_criterion)


def warm_state(s: Settings, cache_dir: Path, log=print):
    """The SFT warm-start weights, computed once and cached by their settings (`trl_appo.testbed.warm_state`)."""
    from functools import partial

    from trl_appo import tasks, testbed

    if getattr(s, "regime", "tiny") == "tiny":  # compare.py passes its own settings (today's task)
        rows = partial(tasks.make_sft_transcripts, s.sft_rows, seed=s.warm_seed + 1)
    else:
        rows = partial(tasks.chain_sft_transcripts, s.sft_rows, seed=s.warm_seed + 1, lengths=s.sft_chain_lengths)
    return testbed.warm_state(cache_dir / f"warm_{s.warm_key()}.pt", hidden=s.hidden, layers=s.layers,
                              seed=s.warm_seed, sft_steps=s.sft_steps, sft_lr=s.sft_lr, rows=rows, log=log,
                              sft_schedule_steps=getattr(s, "sft_schedule_steps", None))


def tokenizer():
    from trl_appo.testbed import tiny_tokenizer

    return tiny_tokenizer()


def new_model(s: Settings, tok, state):
    from trl_appo.testbed import tiny_model

    return tiny_model(tok, s.hidden, s.layers, s.warm_seed, state)


def task_data(s: Settings):
    """The regime's `DatasetDict(train, heldout)` (fixed: seed 0, split by a hash of the question)."""
    from trl_appo import tasks

    if s.regime == "tiny":
        return tasks.make_tiny_tasks(s.n_train, s.heldout, seed=0)
    return tasks.make_chain_tasks(s.n_train, s.heldout, seed=0, lengths=s.chain_lengths)


def binary_answer_reward(prompts=None, completions=None, completion_ids=None, ground_truth=None, **kwargs):
    r"""1.0 when the last `\boxed{}` answer is exactly the gold number, else 0.0 (format included): the chain
    regimes' binary final reward."""
    from trl_appo.rewards import extract_answer

    return [float(extract_answer(c).strip() == str(g).strip()) for c, g in zip(completions, ground_truth)]


def reward_fn(s: Settings):
    if s.regime == "tiny":
        from trl_appo.rewards import format_answer_type_reward

        return format_answer_type_reward
    return binary_answer_reward


_RESULT_RE = re.compile(r"<result>\s*(.*?)\s*</result>", re.S)
_CALL_RE = re.compile(r"<python>(.*?)</python>", re.S)


def chain_failure_mode(text: str, score: float | None, row: dict[str, Any]) -> str:
    """Where a chain rollout went wrong: correct, format (no boxed answer), tool_error, wrong_step (a call
    computed something other than the gold's step), few_calls (stopped early), miscopy (answer != last result)."""
    from trl_appo.rewards import extract_answer, last_boxed

    if score is not None and score >= 1.0:
        return "correct"
    results = [r.strip() for r in _RESULT_RE.findall(text)]
    gold_steps = row.get("_gold_outputs") or []
    if any(r.startswith("Error") for r in results):
        return "tool_error"
    for got, want in zip(results, gold_steps):
        if got != want:
            return "wrong_step"
    if last_boxed(text) is None:
        return "format"
    if len(results) < len(gold_steps):
        return "few_calls"
    return "miscopy" if extract_answer(text).strip() != str(row["ground_truth"]).strip() else "other"


def failure_mode(text: str, score: float | None, gold: str) -> str:
    """Where a held-out rollout went wrong: format, no_tool, tool_error, wrong_program, miscopy, or correct."""
    from trl_appo.rewards import extract_answer

    if score is not None and score >= 1.0:
        return "correct"
    if score is None or score <= -1:
        return "format"
    if "<python>" not in text:
        return "no_tool"
    results = _RESULT_RE.findall(text)
    if not results or results[-1].startswith("Error"):
        return "tool_error"
    if results[-1].strip() != str(gold).strip():
        return "wrong_program"  # the model's code computes something else (copied the operands wrong)
    return "miscopy" if extract_answer(text).strip() != str(gold).strip() else "other"


def heldout_eval(model, tok, data, s: Settings, eval_seed: int, samples: int | None = None) -> dict[str, Any]:
    from trl_appo.testbed import heldout_eval as evaluate

    n = samples or s.samples
    t0 = time.perf_counter()
    res = evaluate(model, tok, data, n=n, seed=eval_seed, tools=[make_tool()], score_fn=reward_fn(s),
                   batch_size=s.eval_batch, max_completion_length=s.max_completion_length,
                   max_tool_calls=s.max_tool_calls, ks=sorted({1, min(4, n), n}),
                   generate_fn=eval_generate_fn(model, tok, s))
    modes: dict[str, int] = {}
    rows = _rows_with_gold(data, s)
    for x in res.samples:
        row = rows[x["prompt_index"]]
        if s.regime == "tiny":
            m = failure_mode(x.get("text", ""), x["score"], row["ground_truth"])
        else:
            m = chain_failure_mode(x.get("text", ""), x["score"], row)
        modes[m] = modes.get(m, 0) + 1
    correct_per_prompt = [0] * len(rows)
    for x in res.samples:
        correct_per_prompt[x["prompt_index"]] += bool(x["correct"])
    out = {"pass@1": res.overall.pass_at[1], "mean_reward": res.overall.mean_score, "failure_modes": modes,
           "tool_calls_per_rollout": res.overall.tool_calls_per_rollout,
           "completion_tokens_per_rollout": statistics.fmean(x["completion_tokens"] for x in res.samples),
           "frac_prompts_none_correct": sum(c == 0 for c in correct_per_prompt) / len(rows),
           "samples": n, "seconds": time.perf_counter() - t0}
    for k in res.overall.pass_at:
        out[f"pass@{k}"] = res.overall.pass_at[k]
    if s.regime != "tiny" and len(s.chain_lengths) > 1:  # Pass@1 per chain length (the hard regime's mix)
        by_len: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_len.setdefault(len(row["_gold_outputs"]), []).append(correct_per_prompt[i])
        out["pass@1_by_length"] = {str(k): sum(v) / (n * len(v)) for k, v in sorted(by_len.items())}
        out["frac_none_correct_by_length"] = {str(k): sum(c == 0 for c in v) / len(v)
                                              for k, v in sorted(by_len.items())}
    out["_samples"] = res.samples  # dropped before saving; calibration reads it
    return out


def eval_generate_fn(model, tok, s: Settings):
    """`make_hf_generate_fn` at T = 1; for the chain regimes each model turn also stops at `</python>`.

    Without the stop strings every turn decodes the whole remaining budget and the engine throws away everything
    after `</python>`: with 6 calls and a 256-token budget that is several times the decoding (the same samples
    in distribution, a fraction of the time). Today's `tiny` task keeps the eos-only function, so its committed
    runs stay reproducible (an early stop draws fewer random numbers, so later turns sample other ids).
    """
    from trl_appo.evaluation import make_hf_generate_fn

    if s.regime == "tiny":
        return make_hf_generate_fn(model, tok, temperature=1.0)
    return make_hf_generate_fn(model, tok, temperature=1.0, stop_strings=("</python>", "</search>"))


def _rows_with_gold(data, s: Settings) -> list[dict[str, Any]]:
    """Held-out rows with each chain's gold step outputs (recomputed from the question: left to right)."""
    rows = [dict(r) for r in data]
    if s.regime != "tiny":
        for r in rows:
            q = r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"]
            tokens = q.replace("=", "").split()
            value, outs = int(tokens[0]), []
            for t in tokens[1:]:
                op, x = t[0], int(t[1:])
                value = value * x if op == "*" else value + x if op == "+" else value - x
                outs.append(str(value))
            r["_gold_outputs"] = outs
    return rows


def run_label(variant: str, s: Settings, lr: float | None = None) -> str:
    """A run's name: the variant for today's task at its defaults; `<variant>__m<M>__lr<lr>` for the regimes."""
    if s.regime == "tiny" and lr is None and s.num_generations == Settings.num_generations:
        return variant
    lr = lr if lr is not None else VARIANTS[variant].get("learning_rate", s.learning_rate)
    return f"{variant}__m{s.num_generations}__lr{lr:g}"


def run_one(variant: str, seed: int, s: Settings, cache_dir: Path, out_path: Path,
            lr: float | None = None) -> dict[str, Any]:
    """Train one (variant, seed) and evaluate it every `eval_every` steps; write the run's JSON.

    `s.num_generations` is the budget M (full rollouts per prompt); a variant's `m_factor` multiplies it (GRPO at
    2x M). `lr` (if given) replaces the variant's learning rate.
    """
    _setup_process()
    import torch
    from transformers import TrainerCallback

    from trl_appo.testbed import make_trainer, run_args

    tok = tokenizer()
    state = warm_state(s, cache_dir)
    data = task_data(s)
    # Today's task keeps the settings its committed runs were measured with; the regimes run the library defaults.
    kw = {**(MEASURED_WITH if s.regime == "tiny" else {}), **VARIANTS[variant]}
    M = kw.pop("num_generations", s.num_generations) * kw.pop("m_factor", 1)
    learning_rate = lr if lr is not None else kw.pop("learning_rate", s.learning_rate)
    kw.pop("learning_rate", None)
    args = run_args(
        out_path.parent / f"_work_{out_path.stem}", seed, learning_rate=learning_rate,
        lr_scheduler_type="constant", max_steps=s.steps, num_generations=M,
        per_device_train_batch_size=M * s.prompts_per_step, steps_per_generation=s.steps_per_generation,
        gradient_accumulation_steps=1, max_completion_length=s.max_completion_length,
        min_branch_tokens=s.min_branch_tokens, max_tool_calls=s.max_tool_calls, temperature=1.0, disable_tqdm=True,
        log_branch_trees=False, **kw,
    )
    torch.manual_seed(seed)
    model = new_model(s, tok, state)
    counter = ArithmeticPython()  # counts every tool call of training (roots and branches)
    trainer = make_trainer(model, tok, args, data["train"], [reward_fn(s)], [make_tool(counter)])
    curve: list[dict[str, Any]] = []
    clock = {"train": 0.0, "t": 0.0}
    label = run_label(variant, s, lr)

    def record(step: int, cache: Path | None = None) -> None:
        # The start is the same warm start for every variant of a seed (same held-out draws): evaluated once.
        if cache is not None and cache.exists():
            ev = json.loads(cache.read_text())
        else:
            ev = heldout_eval(trainer.model, tok, data["heldout"], s, eval_seed=10_000 + seed)
            ev.pop("_samples")
            if cache is not None:
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(ev))
                os.replace(tmp, cache)
        hist = trainer.state.log_history
        curve.append({"step": step, "train_seconds": clock["train"], "decoded_tokens": decoded_tokens(hist),
                      "tool_calls": counter.calls, "tool_calls_logged": logged_tool_calls(hist, args), **ev})
        print(f"[{label} seed {seed}] step {step:4d} pass@1 {ev['pass@1']:.3f} reward {ev['mean_reward']:+.3f} "
              f"train {clock['train']:.0f} s (eval {ev['seconds']:.0f} s)", flush=True)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            clock["train"] += time.perf_counter() - clock["t"]
            if state.global_step % s.eval_every == 0 or state.global_step == s.steps:
                was_training = trainer.model.training
                record(state.global_step)
                trainer.model.train(was_training)

    record(0, cache=cache_dir / f"eval0_{eval0_key(s, seed)}.json")
    trainer.add_callback(Clock())
    trainer.train()
    hist = trainer.state.log_history
    rewards = [e["reward"] for e in hist if isinstance(e.get("reward"), (int, float))]
    tail = rewards[-max(1, len(rewards) // 4):]
    out = {
        "variant": variant, "label": label, "seed": seed, "regime": s.regime, "overrides": VARIANTS[variant],
        "num_generations": M, "budget_m": s.num_generations, "learning_rate": learning_rate,
        "settings": asdict(s), "warm_key": s.warm_key(), "curve": curve,
        "train_reward_last": statistics.fmean(tail) if tail else math.nan,
        "train_seconds_per_step": clock["train"] / s.steps,
        "decoded_tokens_per_step": decoded_tokens(hist) / s.steps,
        "tool_calls_per_step": counter.calls / s.steps,
        "appo_metrics": _metric_means(hist),
        "machine": {"python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                    "cpus": os.cpu_count()},
    }
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, out_path)
    return out


def eval0_key(s: Settings, seed: int) -> str:
    """Cache key of a run's step-0 evaluation: the warm start, the task and the evaluation's draws."""
    from trl_appo.testbed import cache_key

    keys = ("regime", "chain_lengths", "heldout", "samples", "eval_batch", "max_completion_length", "max_tool_calls")
    return cache_key({"warm": s.warm_key(), "seed": seed, **{k: getattr(s, k) for k in keys}})


def decoded_tokens(history) -> float:
    """Decoded model tokens so far (roots and branches), from the trainer's per-generation-call sums.

    `appo/root/decoded_tokens` and `appo/branch/decoded_tokens` are appended once per generation call and averaged
    over a logging window by TRL, so their sum over the log is the total only with `logging_steps=1` (set here)
    and at most one call of each kind per optimizer step.
    """
    keys = ("appo/root/decoded_tokens", "appo/branch/decoded_tokens")
    return float(sum(e.get(k, 0.0) for e in history for k in keys if isinstance(e.get(k), (int, float))))


def logged_tool_calls(history, args) -> float:
    """The roots' tool calls as far as the log tells: `appo/root/tool_calls_per_rollout` times the roots of one
    generation batch (the curves' `tool_calls_logged`). The benchmark counts every call, branches' included, in its
    tool (`tool_calls`); the budget log has both too (`appo/budget/tool_calls_{roots,branches}`)."""
    roots = (getattr(args, "num_roots", None) or args.num_generations) * args.per_device_train_batch_size \
        * args.steps_per_generation // args.num_generations
    key = "appo/root/tool_calls_per_rollout"
    return float(sum(e[key] * roots for e in history if isinstance(e.get(key), (int, float))))


# TRL's own step metrics kept beside APPO's: `frac_reward_zero_std` is the share of prompt groups whose rewards all
# agree (no GRPO signal), for GRPO the M rollouts, for APPO the roots (APPO's own before/after-branching figures are
# `appo/groups_all_equal_before|after`), so the two methods' informative groups can be compared.
TRL_METRICS = ("frac_reward_zero_std", "reward_std", "entropy")


def _metric_means(history) -> dict[str, float]:
    keys = sorted({k for e in history for k in e
                   if (k.startswith("appo/") or k in TRL_METRICS) and isinstance(e[k], (int, float))})
    out = {}
    for k in keys:
        vals = [float(e[k]) for e in history if isinstance(e.get(k), (int, float)) and math.isfinite(e[k])]
        if vals:
            out[k] = statistics.fmean(vals)
    return out


# ------------------------------------------------------------------------------------------------ the grid


def run_grid(variants, s: Settings, runs_dir: Path, cache_dir: Path, workers: int, force: bool, quick: bool,
             lrs: tuple[float | None, ...] = (None,)) -> None:
    _setup_process()
    warm_state(s, cache_dir)  # once, before the workers start
    jobs = [(v, seed, lr) for seed in s.seeds for lr in lrs for v in variants]
    runs_dir.mkdir(parents=True, exist_ok=True)

    def launch(job):
        v, seed, lr = job
        label = run_label(v, s, lr)
        path = runs_dir / f"{label}__seed{seed}.json"
        if path.exists() and not force and (s.regime == "tiny" or
                                            json.loads(path.read_text()).get("warm_key") == s.warm_key()):
            return f"{label} seed {seed}: kept"
        if workers == 0:  # in this process, one run after another (smoke tests: one import of TRL for all)
            run_one(v, seed, s, cache_dir, path, lr=lr)
            return f"{label} seed {seed}: done"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_run", v, str(seed), "--out-dir", str(runs_dir),
               "--cache-dir", str(cache_dir), "--regime", s.regime, "--num-generations", str(s.num_generations),
               "--steps", str(s.steps), "--sft-steps", str(s.sft_steps), "--sft-lr", repr(s.sft_lr),
               "--eval-every", str(s.eval_every),
               "--heldout", str(s.heldout),
               "--samples", str(s.samples)] + (["--quick"] if quick else []) + (["--lr", repr(lr)] if lr else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        log = runs_dir / f"{label}__seed{seed}.log"
        with open(log, "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        msg = f"{label} seed {seed}: rc {rc} in {time.perf_counter() - t0:.0f} s"
        print(msg, flush=True)
        if rc:
            print(log.read_text()[-3000:], flush=True)
        return msg

    if workers == 0:
        for job in jobs:
            print(launch(job), flush=True)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(launch, jobs))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _baseline(variant: str, num_generations: int) -> str:
    """The GRPO run a variant is compared with: the same budget M and the same learning rate."""
    lr = VARIANTS.get(variant, {}).get("learning_rate")
    for name, kw in VARIANTS.items():
        if kw.get("branch_criterion") == "none" and kw.get("learning_rate") == lr and \
                kw.get("num_generations", Settings.num_generations) == num_generations:
            return name
    return "grpo"


def _label(r: dict[str, Any]) -> str:
    return r.get("label", r["variant"])


def _baseline_label(r: dict[str, Any]) -> str:
    """The GRPO run a run is paired with: same budget M, same learning rate (same seed)."""
    if "__m" in _label(r):
        return f"grpo__m{r['budget_m']}__lr{r['learning_rate']:g}"
    return _baseline(r["variant"], r["num_generations"])


def _interp(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x on the piecewise-linear curve (xs increasing); None past the curve's end (no extrapolation)."""
    if not xs or x > xs[-1] * (1 + 1e-9):
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _diff_at_equal(key: str, run: dict, base: dict) -> float | None:
    """Pass@1 of `run` minus its paired GRPO run's at the same spend of `key` (decoded tokens, training seconds):
    at the smaller of the two totals, where both curves are measured (piecewise-linear, no extrapolation)."""
    xs_r, xs_b = [c[key] for c in run["curve"]], [c[key] for c in base["curve"]]
    at = min(xs_r[-1], xs_b[-1])
    mine = _interp(xs_r, [c["pass@1"] for c in run["curve"]], at)
    theirs = _interp(xs_b, [c["pass@1"] for c in base["curve"]], at)
    return None if mine is None or theirs is None or at <= 0 else mine - theirs


def aggregate(runs_dir: Path, warm_key: str | None = None) -> dict[str, Any]:
    """Every run's figures, by label. With `warm_key` (the regimes), runs from another warm start are left out
    (named on stderr): a regime's runs compare only from the same start."""
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*__seed*.json"))]
    if warm_key is not None:
        stale = [r for r in runs if r.get("warm_key") != warm_key]
        for r in stale:
            print(f"[report] left out {_label(r)} seed {r['seed']}: warm start {r.get('warm_key')}, not {warm_key}",
                  file=sys.stderr)
        runs = [r for r in runs if r.get("warm_key") == warm_key]
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(_label(r), []).append(r)
    table = {}
    for v, rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        final = [r["curve"][-1]["pass@1"] for r in rs]
        start = [r["curve"][0]["pass@1"] for r in rs]
        base_s = {r["seed"]: r for r in by.get(_baseline_label(rs[0]), [])}
        diffs = [r["curve"][-1]["pass@1"] - base_s[r["seed"]]["curve"][-1]["pass@1"] for r in rs if r["seed"] in base_s]
        # Equal decoded tokens / equal training seconds: both runs at the smaller total spend of the pair.
        pairs = [(r, base_s[r["seed"]]) for r in rs if r["seed"] in base_s]
        eq_tok = [d for r, b in pairs if (d := _diff_at_equal("decoded_tokens", r, b)) is not None]
        eq_wall = [d for r, b in pairs if (d := _diff_at_equal("train_seconds", r, b)) is not None]
        modes: dict[str, float] = {}
        for r in rs:
            fm = r["curve"][-1]["failure_modes"]
            total = sum(fm.values()) or 1
            for k, n in fm.items():
                modes[k] = modes.get(k, 0.0) + n / total / len(rs)
        steps = [r["curve"][-1]["step"] for r in rs]
        grpo_wall = [base_s[r["seed"]]["train_seconds_per_step"] for r in rs if r["seed"] in base_s]
        table[v] = {
            "variant": rs[0]["variant"], "seeds": [r["seed"] for r in rs], "M": rs[0]["num_generations"],
            "budget_m": rs[0].get("budget_m", rs[0]["num_generations"]), "learning_rate": rs[0].get("learning_rate"),
            "steps": max(steps), "overrides": rs[0]["overrides"],
            "pass1_start": _mean_std(start), "pass1_final": _mean_std(final), "pass1_final_per_seed": final,
            "pass4_final": _mean_std([r["curve"][-1].get("pass@4", math.nan) for r in rs]),
            "gain": _mean_std([f - s0 for f, s0 in zip(final, start)]),
            "diff_vs_grpo_same_M": _mean_std(diffs), "diff_vs_grpo_per_seed": diffs,
            "diff_vs_grpo_equal_decoded_tokens": _mean_std(eq_tok), "diff_vs_grpo_equal_tokens_per_seed": eq_tok,
            "diff_vs_grpo_equal_wall": _mean_std(eq_wall), "diff_vs_grpo_equal_wall_per_seed": eq_wall,
            "train_reward_last": _mean_std([r["train_reward_last"] for r in rs]),
            "seconds_per_step": _mean_std([r["train_seconds_per_step"] for r in rs]),
            "wall_ratio_vs_grpo": (statistics.fmean(r["train_seconds_per_step"] for r in rs)
                                   / statistics.fmean(grpo_wall)) if grpo_wall else math.nan,
            "decoded_tokens_per_step": _mean_std([r["decoded_tokens_per_step"] for r in rs]),
            "tool_calls_per_step": _mean_std([r.get("tool_calls_per_step", math.nan) for r in rs]),
            "failure_modes_final": modes,
            # the mean learning curve, over the seeds that reached each evaluation
            "pass1_by_step": {str(st): statistics.fmean(c["pass@1"] for r in rs for c in r["curve"] if c["step"] == st)
                              for st in sorted({c["step"] for r in rs for c in r["curve"]})},
        }
    return {"variants": table, "best_lr": best_lr(table), "runs": runs, "vs_random": paired_vs(by, RANDOM_TWIN)}


# The criteria comparison (item "known decision point"): every `appo_pergen_<criterion>` against the same tree
# branching at random points, paired by seed (same branch counts, so about the same decoded tokens).
RANDOM_TWIN = "appo_pergen_random"


def _last_evals_mean(r: dict[str, Any], k: int = 3) -> float:
    return statistics.fmean(c["pass@1"] for c in r["curve"][-k:])


def paired_vs(by: dict[str, list[dict]], base_variant: str) -> dict[str, Any]:
    """Each `appo_pergen_*` label against the `base_variant` run of the same M, learning rate and seed: Δ held-out
    Pass@1 at the last evaluation and over the mean of the last 3 evaluations (robust to one noisy evaluation)."""
    out = {}
    for label, rs in by.items():
        v = rs[0]["variant"]
        if not v.startswith("appo_pergen_") or v == base_variant:
            continue
        against = label.replace(v, base_variant, 1)  # the same M and learning rate
        base = {r["seed"]: r for r in by.get(against, [])}
        pairs = [(r, base[r["seed"]]) for r in sorted(rs, key=lambda r: r["seed"]) if r["seed"] in base]
        if not pairs:
            continue
        final = [r["curve"][-1]["pass@1"] - b["curve"][-1]["pass@1"] for r, b in pairs]
        last3 = [_last_evals_mean(r) - _last_evals_mean(b) for r, b in pairs]
        out[label] = {"against": against, "seeds": [r["seed"] for r, _ in pairs],
                      "diff_final": _mean_std(final), "diff_final_per_seed": final,
                      "diff_last3": _mean_std(last3), "diff_last3_per_seed": last3}
    return out


def best_lr(table: dict[str, Any]) -> dict[str, Any]:
    """Per (variant, budget M): the learning rate with the highest training reward (last quarter), and its
    held-out figures; Δ against GRPO at its own best learning rate for the same M (unpaired means)."""
    groups: dict[tuple[str, int], list[str]] = {}
    for label, r in table.items():
        if r.get("learning_rate") is not None and "__m" in label:
            groups.setdefault((r["variant"], r["budget_m"]), []).append(label)
    best = {}
    for (variant, m), labels in groups.items():
        pick = max(labels, key=lambda lab: table[lab]["train_reward_last"][0])
        keep = ("learning_rate", "pass1_final", "pass4_final", "train_reward_last", "decoded_tokens_per_step",
                "seconds_per_step")
        best[f"{variant}__m{m}"] = {"label": pick, **{k: table[pick][k] for k in keep}}
    for key, b in best.items():
        g = best.get(f"grpo__m{key.rsplit('__m', 1)[1]}")
        b["diff_vs_best_grpo_same_M"] = (b["pass1_final"][0] - g["pass1_final"][0]) if g else math.nan
    return best


def _fmt(ms, scale=100.0, spec=".1f") -> str:
    m, s = ms
    return "n/a" if not math.isfinite(m) else f"{m * scale:{spec}} ± {s * scale:{spec.lstrip('+')}}"


def markdown(agg: dict[str, Any], extended: bool = False) -> str:
    """The tables for README; `extended` (the regimes) adds Pass@4, equal-token Δ and tool calls."""
    t = agg["variants"]
    order = [v for v in VARIANTS if v in t] + sorted(v for v in t if v not in VARIANTS)
    if extended:
        lines = [
            "| run | M | lr | seeds | Pass@1 start → final (%) | final per seed | Pass@4 final (%) "
            "| Δ Pass@1 vs GRPO, equal steps | Δ vs GRPO, equal decoded tokens (per seed) "
            "| Δ vs GRPO, equal training seconds | train reward (last ¼) | s/step (× GRPO) | decoded tok/step "
            "| tool calls/step |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines = [
            "| variant | M | seeds | held-out Pass@1 start → final (mean ± std, %) | per seed "
            "| Δ vs GRPO (same M, lr, seeds) | train reward (last ¼) | s/step (ratio to GRPO) | decoded tok/step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for v in order:
        r = t[v]
        per_seed = ", ".join(f"{x * 100:.1f}" for x in r["pass1_final_per_seed"])
        tok_seeds = "" if r["variant"] == "grpo" or not r["diff_vs_grpo_equal_tokens_per_seed"] else \
            " (" + ", ".join(f"{x * 100:+.1f}" for x in r["diff_vs_grpo_equal_tokens_per_seed"]) + ")"
        if extended:
            lines.append(
                f"| `{v}` | {r['M']} | {r['learning_rate']:g} | {len(r['seeds'])} "
                f"| {_fmt(r['pass1_start'])} → {_fmt(r['pass1_final'])} | {per_seed} | {_fmt(r['pass4_final'])} "
                f"| {_fmt(r['diff_vs_grpo_same_M'], spec='+.1f')} "
                f"| {_fmt(r['diff_vs_grpo_equal_decoded_tokens'], spec='+.1f')}{tok_seeds} "
                f"| {_fmt(r.get('diff_vs_grpo_equal_wall', (math.nan, math.nan)), spec='+.1f')} "
                f"| {_fmt(r['train_reward_last'], 1, '+.3f')} "
                f"| {r['seconds_per_step'][0]:.2f} ({r['wall_ratio_vs_grpo']:.2f}×) "
                f"| {r['decoded_tokens_per_step'][0]:.0f} | {r['tool_calls_per_step'][0]:.1f} |"
            )
        else:
            lines.append(
                f"| `{v}` | {r['M']} | {len(r['seeds'])} | {_fmt(r['pass1_start'])} → {_fmt(r['pass1_final'])} "
                f"| {per_seed} "
                f"| {_fmt(r['diff_vs_grpo_same_M'], spec='+.1f')} | {_fmt(r['train_reward_last'], 1, '+.3f')} "
                f"| {r['seconds_per_step'][0]:.2f} ({r['wall_ratio_vs_grpo']:.2f}×) "
                f"| {r['decoded_tokens_per_step'][0]:.0f} |"
            )
    if extended and agg.get("best_lr"):
        lines += ["", "Each method at its best learning rate (chosen on the training reward):", "",
                  "| method @ budget M | best lr | Pass@1 final (%) | Pass@4 final (%) "
                  "| Δ Pass@1 vs GRPO at its best lr |",
                  "|---|---|---|---|---|"]
        for key, b in sorted(agg["best_lr"].items()):
            d = b["diff_vs_best_grpo_same_M"]
            lines.append(f"| `{key}` | {b['learning_rate']:g} | {_fmt(b['pass1_final'])} | {_fmt(b['pass4_final'])} "
                         f"| {'n/a' if not math.isfinite(d) else f'{d * 100:+.1f}'} |")
    if extended and agg.get("vs_random"):
        lines += ["", f"Where to branch: each criterion against `{RANDOM_TWIN}` (the same tree, random branch points), "
                  "paired by seed:", "",
                  "| criterion run | seeds | Δ Pass@1 final (per seed) | Δ mean of the last 3 evaluations (per seed) |",
                  "|---|---|---|---|"]
        for label, d in sorted(agg["vs_random"].items()):
            per = [", ".join(f"{x * 100:+.1f}" for x in d[k]) for k in ("diff_final_per_seed", "diff_last3_per_seed")]
            lines.append(f"| `{label}` | {len(d['seeds'])} | {_fmt(d['diff_final'], spec='+.1f')} ({per[0]}) "
                         f"| {_fmt(d['diff_last3'], spec='+.1f')} ({per[1]}) |")
    if extended:
        steps = sorted({int(st) for v in order for st in t[v]["pass1_by_step"]})
        lines += ["", "Held-out Pass@1 (%) at each evaluation, mean over seeds:", "",
                  "| run | " + " | ".join(f"step {st}" for st in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for v in order:
            by_step = t[v]["pass1_by_step"]
            lines.append(f"| `{v}` | " + " | ".join(f"{by_step[str(st)] * 100:.1f}" if str(st) in by_step else ""
                                                    for st in steps) + " |")
    cols = sorted({c for v in order for c in t[v]["failure_modes_final"]} - {"correct"})
    cols = ["correct"] + ([c for c in ("format", "no_tool", "tool_error", "wrong_program", "miscopy", "other")]
                          if not extended else cols)
    lines += ["", "Where the wrong held-out rollouts go wrong at the last evaluation (fraction of all samples, mean over "
              "seeds):", "", "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for v in order:
        fm = t[v]["failure_modes_final"]
        lines.append(f"| `{v}` | " + " | ".join(f"{fm.get(c, 0.0):.2f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(agg: dict[str, Any], path: Path, title: str = "tiny tool-use arithmetic, warm-started ~1M model") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by: dict[str, list[dict]] = {}
    for r in agg["runs"]:
        by.setdefault(_label(r), []).append(r)
    axes_keys = (("step", "optimizer steps"), ("decoded_tokens", "decoded model tokens"),
                 ("tool_calls", "tool calls"), ("train_seconds", "training wall seconds (1 thread)"))
    axes_keys = tuple((k, lab) for k, lab in axes_keys if all(k in r["curve"][0] for r in agg["runs"]))
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(5.3 * len(axes_keys), 4.8), sharey=True)
    shown = [v for v in PLOT_VARIANTS if v in by] or list(by)
    for v in shown:
        rs = by[v]
        n = min(len(r["curve"]) for r in rs)
        y = np.array([[c["pass@1"] for c in r["curve"][:n]] for r in rs]) * 100
        for ax, (key, _) in zip(axes, axes_keys):
            x = np.array([[c[key] for c in r["curve"][:n]] for r in rs]).mean(axis=0)
            ax.plot(x, y.mean(axis=0), marker="o", ms=3, label=f"{v} (n={len(rs)})",
                    lw=2.5 if v.startswith("grpo") else 1.5, ls="--" if v.startswith("grpo") else "-")
            ax.fill_between(x, y.mean(axis=0) - y.std(axis=0), y.mean(axis=0) + y.std(axis=0), alpha=0.12)
    for ax, (_, label) in zip(axes, axes_keys):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out Pass@1 (%), mean ± std over seeds")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"APPO vs GRPO at equal budget: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs_dir: Path, json_path: Path, png_path: Path, readme: Path | None, regime: str = "tiny",
                 warm_key: str | None = None, run_set: str = "") -> str:
    """Aggregate, write the JSON and the picture, and the README table between the regime's markers
    (`<!-- learning-<regime><run_set>:begin -->`; `run_set` names a second set of runs, e.g. `_s500`)."""
    agg = aggregate(runs_dir, warm_key)
    json_path.write_text(json.dumps(agg, indent=1))
    extended = regime != "tiny"
    md = markdown(agg, extended=extended)
    if agg["runs"]:
        plot(agg, png_path,
             title=f"regime `{regime}`" if extended else "tiny tool-use arithmetic, warm-started ~1M model")
    if readme is not None and readme.exists():
        text = readme.read_text()
        tag = "learning" if regime == "tiny" else f"learning-{regime}{run_set}"
        begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            readme.write_text(f"{head}{begin}\n{md}\n{end}{tail}")
    return md


def warm_rollouts(s: Settings, model, tok, rows, held, per_prompt: int, seed: int):
    """`per_prompt` rollouts of each of `rows` (held-out chain rows; `held` their tasks) by `model` at T = 1 through
    the regime's engine, seeded; returns (engine, rollouts, off_gold): for each rollout that is not its gold
    transcript, (its index, its first wrong token, `trl_appo.tasks.first_wrong_token`, or None)."""
    import torch

    from trl_appo import tasks
    from trl_appo.rollout import TagProtocol
    from trl_appo.rollout.engine import RolloutEngine

    engine = RolloutEngine(eval_generate_fn(model, tok, s), tok, TagProtocol(tok), [make_tool()],
                           max_completion_length=s.max_completion_length, max_tool_calls=s.max_tool_calls)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ids = engine.tokenize_prompts([r["prompt"] for r in rows])
        rollouts = engine.run([x for x in ids for _ in range(per_prompt)], group_size=per_prompt)
    off_gold = []
    for j, r in enumerate(rollouts):
        gold = tasks.ideal_completion(held[j // per_prompt]) + tok.eos_token
        if tok.decode(r.completion_ids) != gold:
            off_gold.append((j, tasks.first_wrong_token(tok, r.completion_ids, r.model_mask, gold)))
    return engine, rollouts, off_gold


def calibrate(s: Settings, cache_dir: Path, out_path: Path, samples: int = 8, oracle_prompts: int = 100) -> dict:
    """The warm start of a regime, measured: held-out Pass@1/4/8 over `samples` samples per prompt, the fraction
    of prompts with no correct sample, and (chain regimes) where failed rollouts first leave the gold transcript
    (`trl_appo.tasks.first_wrong_token`: the oracle branch point). Merged into `out_path` under
    `<regime>__sft<steps>__heldout<n>`."""
    _setup_process()
    from trl_appo import tasks
    from trl_appo.sft import tag_transcript_example

    t0 = time.perf_counter()
    cached = (cache_dir / f"warm_{s.warm_key()}.pt").exists()
    state = warm_state(s, cache_dir)
    sft_seconds = None if cached else time.perf_counter() - t0
    tok = tokenizer()
    model = new_model(s, tok, state)
    model.eval()
    data = task_data(s)
    ev = heldout_eval(model, tok, data["heldout"], s, eval_seed=10_000, samples=samples)
    ev.pop("_samples")
    rec: dict[str, Any] = {"regime": s.regime, "settings": asdict(s), "warm_key": s.warm_key(),
                           "sft_seconds": sft_seconds, "heldout": ev}
    if s.regime != "tiny":
        held = tasks.chain_tasks(s.heldout, "heldout", 0, s.chain_lengths)
        prompt_text = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                       for r in data["heldout"]]
        ex = [tag_transcript_example(tok, p, tasks.ideal_completion(t)) for p, t in zip(prompt_text, held)]
        rec["gold_tokens"] = {"prompt": statistics.fmean(len(e.prompt_ids) for e in ex),
                              "model_written": statistics.fmean(sum(e.loss_mask) for e in ex),
                              "completion_with_tool_output": statistics.fmean(len(e.completion_ids) for e in ex),
                              "model_written_min": min(sum(e.loss_mask) for e in ex),
                              "model_written_max": max(sum(e.loss_mask) for e in ex)}
        k = min(oracle_prompts, len(held))
        _, rollouts, off_gold = warm_rollouts(s, model, tok, data["heldout"].select(range(k)), held, 2, 20_000)
        where: dict[str, int] = {}
        rel, failed, found = [], len(off_gold), 0
        for j, i in off_gold:
            r = rollouts[j]
            if i is None:
                continue
            found += 1
            rel.append(i / max(1, len(r.completion_ids)))
            before = tok.decode(r.completion_ids[:i])
            seg = f"call {before.count('<python>')}" if before.count("<python>") > before.count("</python>") \
                else ("answer" if "<answer>" in before else "between calls")
            where[seg] = where.get(seg, 0) + 1
        rec["first_wrong_token"] = {"rollouts": len(rollouts), "off_gold": failed, "located": found,
                                    "relative_position_mean": statistics.fmean(rel) if rel else None,
                                    "segment_counts": dict(sorted(where.items()))}
    rec["seconds"] = time.perf_counter() - t0
    data_all = json.loads(out_path.read_text()) if out_path.exists() else {}
    lr_tag = "" if s.sft_lr == Settings.sft_lr else f"__sftlr{s.sft_lr:g}"
    of = f"of{s.sft_schedule_steps}" if s.sft_schedule_steps else ""
    data_all[f"{s.regime}__sft{s.sft_steps}{of}{lr_tag}__heldout{s.heldout}"] = rec
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data_all, indent=1))
    print(json.dumps(rec, indent=1))
    return rec


def branch_point_diagnostic(s: Settings, cache_dir: Path, out_path: Path, prompts: int = 200, per_prompt: int = 2,
                            branches: int = 2, random_draws: int = 50, split: str = "heldout") -> dict:
    """Do the branch criteria find a failed rollout's first error? (warm start only; no training, no APPO run)

    Rollouts of the regime's warm start on `prompts` chains of `split` × `per_prompt`; for every failed one whose first
    wrong token i is located (`trl_appo.tasks.first_wrong_token`), the candidates (`core.branch_candidates`, the
    trainer's rules) are ranked by each criterion on the warm model's own entropy and sampled-token log-probs, as
    the step ranks a root under `branch_point_token="resample"` (a pick s keeps 0..s-1 and re-decides s, so a branch
    can only be right when s <= i, and re-decides the error itself when s == i). Reported per criterion over the
    failed rollouts: the top pick is i (`exact@1`), the top pick is at or before i (`before@1`), and any of the
    top `branches` picks is at or before i (`any_before@B`); random's figures average `random_draws` draws. Then
    the branches themselves are generated from each criterion's picks (random: its first draw) and rewarded:
    `branch_success` is the share of branches of failed rollouts that end correct, the signal a group whose roots
    all failed gets from branching. `split="train"` measures on training prompts (the split a method choice may
    be made on). Merged into `out_path` under `<regime>__branch_points[__train]`.
    """
    _setup_process()
    import torch
    from trl.trainer.utils import selective_log_softmax_and_entropy

    from trl_appo import core, tasks
    from trl_appo.branching import whitespace_token_table

    t0 = time.perf_counter()
    tok = tokenizer()
    model = new_model(s, tok, warm_state(s, cache_dir))
    model.eval()
    data = task_data(s)[split]
    held = tasks.chain_tasks(len(data), split, 0, s.chain_lengths)  # the rows' tasks (the same seeded draw)
    k = min(prompts, len(held))
    engine, rollouts, off_gold = warm_rollouts(s, model, tok, data.select(range(k)), held, per_prompt, 30_000)
    ws = whitespace_token_table(tok, model.config.vocab_size)  # the trainer's rule
    counts = {c: {"exact@1": 0.0, "before@1": 0.0, f"any_before@{branches}": 0.0}
              for c in ("entropy", "surprisal", "random")}
    failed, located = len(off_gold), 0
    rel = []
    starts: dict[str, list[tuple[int, int]]] = {c: [] for c in counts}  # (rollout, pick) of the generated branches
    for j, i in off_gold:
        r = rollouts[j]
        if i is None:
            continue
        located += 1
        rel.append(i / len(r.completion_ids))
        c_ids = torch.tensor([r.completion_ids])
        with torch.no_grad():
            logits = model(torch.tensor([r.prompt_ids + r.completion_ids])).logits[:, len(r.prompt_ids) - 1 : -1]
            logp, entropy = selective_log_softmax_and_entropy(logits.double(), c_ids, entropy_requires_grad=False)
        mask = torch.tensor([r.model_mask])
        cand = core.branch_candidates(mask.bool(), torch.tensor([len(r.completion_ids)]), s.max_completion_length,
                                      s.min_branch_tokens, whitespace_mask=ws[c_ids])
        ctx = core.BranchContext(logp * mask, [r.completion_ids], [r.model_mask], [{}], tok, False)
        for c in counts:
            draws = random_draws if c == "random" else 1
            for d in range(draws):
                pts = core.select_branch_points(None, cand, branches, criterion=c, entropy=entropy, context=ctx,
                                                generator=torch.Generator().manual_seed(d))
                picks = pts.position.tolist()
                if d == 0:
                    starts[c] += [(j, p) for p in picks]
                counts[c]["exact@1"] += (picks[0] == i) / draws
                counts[c]["before@1"] += (0 <= picks[0] <= i) / draws
                counts[c][f"any_before@{branches}"] += any(0 <= p <= i for p in picks) / draws
    # The branches themselves: each criterion's picks on the failed rollouts (random: its first draw), continued
    # through the same engine (keep 0..s-1, re-decide s), rewarded like the roots.
    from trl_appo.rollout import Prefix

    success: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(40_000)
        for c, pairs in starts.items():
            prompts_c = [rollouts[j].prompt_ids for j, _ in pairs]
            prefixes = [Prefix(rollouts[j].completion_ids[:p], rollouts[j].model_mask[:p]) if p > 0 else None
                        for j, p in pairs]
            out = engine.run(prompts_c, prefixes) if pairs else []
            texts = [tok.decode(b.completion_ids, skip_special_tokens=True) for b in out]
            gts = [held[j // per_prompt].answer for j, _ in pairs]
            rewards = binary_answer_reward(completions=texts, ground_truth=gts)
            success[c] = statistics.fmean(rewards) if rewards else math.nan
    rec = {"regime": s.regime, "warm_key": s.warm_key(), "rollouts": len(rollouts), "failed": failed,
           "located": located, "first_error_relative_position": statistics.fmean(rel) if rel else None,
           "criteria": {c: {**{m: v / max(located, 1) for m, v in ms.items()}, "branch_success": success[c]}
                        for c, ms in counts.items()},
           "root_success": 1 - failed / max(len(rollouts), 1),
           "branch_point_token": "resample", "branches_per_root": branches, "split": split,
           "seconds": time.perf_counter() - t0}
    data_all = json.loads(out_path.read_text()) if out_path.exists() else {}
    data_all[f"{s.regime}__branch_points" + ("" if split == "heldout" else f"__{split}")] = rec
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data_all, indent=1))
    print(json.dumps(rec, indent=1))
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=None, help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--regime", default="tiny", choices=sorted(REGIMES), help="the task (see REGIMES)")
    p.add_argument("--num-generations", type=int, default=None, help="the budget M, full rollouts per prompt")
    p.add_argument("--lr", default=None, help="learning rate(s) replacing the variants' own: a comma list runs each")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--sft-steps", type=int, default=None, help="warm-start SFT steps (default: the regime's)")
    p.add_argument("--sft-lr", type=float, default=None, help="warm-start SFT peak learning rate (default 2e-3)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every this many steps")
    p.add_argument("--heldout", type=int, default=None, help="held-out prompts (default 200)")
    p.add_argument("--samples", type=int, default=None, help="held-out samples per prompt (default 4)")
    p.add_argument("--workers", type=int, default=2,
                   help="runs side by side, one torch thread each (0: one after another in this process)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    p.add_argument("--force", action="store_true", help="rerun runs that already have results")
    p.add_argument("--report", action="store_true", help="only aggregate the saved runs")
    p.add_argument("--calibrate", action="store_true",
                   help="only measure the regime's warm start (Pass@1/4/8, prompts with 0/8 correct, oracle points)")
    p.add_argument("--branch-points", action="store_true",
                   help="only measure, on the warm start, whether each criterion's picks fall at or before a failed "
                        "rollout's first wrong token (chain regimes)")
    p.add_argument("--split", default="heldout", choices=("train", "heldout"),
                   help="--branch-points: the prompts it measures on (train: where a method choice may be made)")
    p.add_argument("--out-dir", type=Path, default=None, help="where runs go (default results/learning[_<regime>])")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "trl_appo" / "bench")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON and the picture go")
    p.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    s = Settings.for_regime(a.regime, quick=a.quick)
    if a.seeds:
        s = replace(s, seeds=tuple(int(x) for x in a.seeds.split(",")))
    if a.steps:
        s = replace(s, steps=a.steps)
    if a.num_generations:
        s = replace(s, num_generations=a.num_generations)
    for key in ("sft_steps", "sft_lr", "eval_every", "heldout", "samples"):
        if getattr(a, key):
            s = replace(s, **{key: getattr(a, key)})
    lrs: tuple[float | None, ...] = tuple(float(x) for x in a.lr.split(",")) if a.lr else (None,)
    name = "learning" if a.regime == "tiny" else f"learning_{a.regime}"
    suffix = "_quick" if a.quick else ""
    runs_dir = a.out_dir or (RESULTS_DIR / f"{name}{suffix}")
    if a._run:
        label = run_label(a._run[0], s, lrs[0])
        run_one(a._run[0], int(a._run[1]), s, a.cache_dir, runs_dir / f"{label}__seed{a._run[1]}.json", lr=lrs[0])
        return 0
    if a.calibrate:
        calibrate(s, a.cache_dir, a.results_dir / f"calibration_regimes{suffix}.json", samples=2 if a.quick else 8,
                  oracle_prompts=2 if a.quick else 100)
        return 0
    if a.branch_points:
        if a.regime == "tiny":
            p.error("--branch-points needs a chain regime (deep, hard, oracle): tiny has no gold transcript")
        branch_point_diagnostic(s, a.cache_dir, a.results_dir / f"branch_points{suffix}.json",
                                prompts=2 if a.quick else 200, split=a.split)
        return 0
    default = DEFAULT_GRID if a.regime == "tiny" else ("grpo", "grpo_2xm")
    variants = [v.strip() for v in (a.variants or ",".join(default)).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if not a.report:
        run_grid(variants, s, runs_dir, a.cache_dir, a.workers, a.force, a.quick, lrs)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    curves = "learning_curves_v2" if a.regime == "tiny" else f"learning_curves_{a.regime}"
    # A second set of runs of a regime (--out-dir .../learning_deep_s500) gets its own files and README table.
    run_set = runs_dir.name.removeprefix(name) if a.regime != "tiny" and not a.quick and \
        runs_dir.name.startswith(f"{name}_") else ""
    md = write_report(runs_dir, a.results_dir / f"{name}{run_set}{suffix}.json",
                      a.results_dir / f"{curves}{run_set}{suffix}.png", None if a.quick else HERE / "README.md",
                      regime=a.regime, warm_key=None if a.regime == "tiny" else s.warm_key(), run_set=run_set)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
