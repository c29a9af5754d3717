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

Each run writes `results/learning/<variant>__seed<k>.json`; existing runs are skipped (`--force` reruns), so the
grid can be grown run by run; `--report` aggregates whatever is there into `results/learning.json`, the markdown
table between the `learning` markers of benchmarks/README.md, and `results/learning_curves_v2.png`
(Pass@1 against optimizer steps, training wall seconds and decoded tokens).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
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
from dataclasses import asdict, dataclass, field, replace
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

    @classmethod
    def quick(cls) -> Settings:
        return cls(hidden=32, layers=1, sft_steps=10, sft_rows=100, steps=2, n_train=16, eval_every=2, heldout=4,
                   samples=1, eval_batch=4, max_completion_length=24, min_branch_tokens=4, seeds=(0,))

    def warm_key(self) -> str:
        keys = ("hidden", "layers", "sft_steps", "sft_lr", "sft_rows", "warm_seed")
        return hashlib.sha1(json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ the task's tool


class ArithmeticPython:
    """The `python` tool of this benchmark: runs `print(<integer arithmetic>)` programs in-process.

    Anything else (names, calls other than print, non-integer constants) is an error the model sees, as a failing
    program would be in the sandbox.
    """

    _OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
            ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}

    def _eval(self, node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in self._OPS:
            return self._OPS[type(node.op)](self._eval(node.left), self._eval(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self._eval(node.operand)
        raise ValueError("unsupported expression")

    def __call__(self, code: str) -> str:
        try:
            tree = ast.parse(code.strip(), mode="exec")
            out = []
            for stmt in tree.body:
                call = stmt.value if isinstance(stmt, ast.Expr) else None
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "print" and len(call.args) == 1:
                    out.append(str(self._eval(call.args[0])))
                elif call is not None:
                    out.append(str(self._eval(call)))
                else:
                    raise ValueError("unsupported statement")
            return "\n".join(out)
        except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as e:
            return f"Error: {type(e).__name__}: {e}"


def make_tool():
    from trl_appo.tools import Tool

    return Tool(ArithmeticPython(), name="python", description="Run a Python program that prints a number.")


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


def warm_state(s: Settings, cache_dir: Path, log=print):
    """The SFT warm-start weights, computed once and cached by their settings."""
    import torch

    from trl_appo import tasks
    from trl_appo.sft import sft_warm_start, tag_transcript_example

    path = cache_dir / f"warm_{s.warm_key()}.pt"
    if path.exists():
        log(f"[warm start] loaded cached weights {path}")
        return torch.load(path, weights_only=True)
    tok = tokenizer()
    model = new_model(s, tok, None)
    rows = tasks.make_sft_transcripts(s.sft_rows, seed=s.warm_seed + 1)
    examples = [
        tag_transcript_example(tok, tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
                               r["completion"][0]["content"])
        for r in rows
    ]
    t0 = time.perf_counter()
    hist = sft_warm_start(model, tok, examples, steps=s.sft_steps, lr=s.sft_lr, seed=s.warm_seed, progress=False)
    log(f"[warm start] SFT {s.sft_steps} steps in {time.perf_counter() - t0:.0f} s, final loss "
        f"{statistics.fmean(hist.loss[-10:]):.4f} -> {path}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return state


def tokenizer():
    from trl_appo.demo import MINI_CHAT_TEMPLATE
    from trl_appo.testing import build_tiny_tokenizer

    return build_tiny_tokenizer(chat_template=MINI_CHAT_TEMPLATE)


def new_model(s: Settings, tok, state):
    import torch

    from trl_appo.testing import build_tiny_model

    torch.manual_seed(s.warm_seed)
    model = build_tiny_model(tok, hidden_size=s.hidden, num_layers=s.layers, num_heads=4, num_kv_heads=2,
                             intermediate_size=4 * s.hidden, seed=s.warm_seed)
    if state is not None:
        model.load_state_dict(state)
    return model


_RESULT_RE = re.compile(r"<result>\s*(.*?)\s*</result>", re.S)


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


def heldout_eval(model, tok, data, s: Settings, eval_seed: int) -> dict[str, Any]:
    import torch

    from trl_appo.evaluation import evaluate, make_hf_generate_fn
    from trl_appo.rewards import format_answer_type_reward
    from trl_appo.rollout import eos_token_ids_of

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(eval_seed)
        res = evaluate(
            data, generate_fn=make_hf_generate_fn(model, tok, temperature=1.0), tokenizer=tok,
            protocol="tags", tools=[make_tool()], eos_token_ids=eos_token_ids_of(model, tok), n=s.samples, ks=(1,),
            score_fn=format_answer_type_reward,
            threshold=1.0, batch_size=s.eval_batch, max_completion_length=s.max_completion_length,
            max_tool_calls=s.max_tool_calls, temperature=1.0,
        )
    modes: dict[str, int] = {}
    for x in res.samples:
        m = failure_mode(x.get("text", ""), x["score"], data[x["prompt_index"]]["ground_truth"])
        modes[m] = modes.get(m, 0) + 1
    return {"pass@1": res.overall.pass_at[1], "mean_reward": res.overall.mean_score, "failure_modes": modes,
            "tool_calls_per_rollout": res.overall.tool_calls_per_rollout, "seconds": time.perf_counter() - t0}


def run_one(variant: str, seed: int, s: Settings, cache_dir: Path, out_path: Path) -> dict[str, Any]:
    """Train one (variant, seed) and evaluate it every `eval_every` steps; write the run's JSON."""
    _setup_process()
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from trl_appo import tasks
    from trl_appo.demo import _common_args
    from trl_appo.rewards import format_answer_type_reward
    from trl_appo.trainer import APPOTrainer

    tok = tokenizer()
    state = warm_state(s, cache_dir)
    data = tasks.make_tiny_tasks(s.n_train, s.heldout, seed=0)
    kw = {**MEASURED_WITH, **VARIANTS[variant]}
    M = kw.pop("num_generations", s.num_generations)
    args = _common_args(
        out_path.parent / f"_work_{variant}_{seed}", seed, learning_rate=kw.pop("learning_rate", s.learning_rate),
        lr_scheduler_type="constant", max_steps=s.steps, num_generations=M,
        per_device_train_batch_size=M * s.prompts_per_step, steps_per_generation=s.steps_per_generation,
        gradient_accumulation_steps=1, max_completion_length=s.max_completion_length,
        min_branch_tokens=s.min_branch_tokens, max_tool_calls=s.max_tool_calls, temperature=1.0, disable_tqdm=True,
        log_branch_trees=False, **kw,
    )
    torch.manual_seed(seed)
    model = new_model(s, tok, state)
    trainer = APPOTrainer(model=model, processing_class=tok, args=args, train_dataset=data["train"],
                          reward_funcs=[format_answer_type_reward], tools=[make_tool()])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    curve: list[dict[str, Any]] = []
    clock = {"train": 0.0, "t": 0.0}

    def decoded(history) -> float:
        keys = ("appo/root/decoded_tokens", "appo/branch/decoded_tokens")
        return float(sum(e.get(k, 0.0) for e in history for k in keys if isinstance(e.get(k), (int, float))))

    def record(step: int) -> None:
        ev = heldout_eval(trainer.model, tok, data["heldout"], s, eval_seed=10_000 + seed)
        curve.append({"step": step, "train_seconds": clock["train"], "decoded_tokens": decoded(trainer.state.log_history),
                      **ev})
        print(f"[{variant} seed {seed}] step {step:4d} pass@1 {ev['pass@1']:.3f} reward {ev['mean_reward']:+.3f} "
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

    record(0)
    trainer.add_callback(Clock())
    trainer.train()
    hist = trainer.state.log_history
    rewards = [e["reward"] for e in hist if isinstance(e.get("reward"), (int, float))]
    tail = rewards[-max(1, len(rewards) // 4):]
    out = {
        "variant": variant, "seed": seed, "overrides": VARIANTS[variant], "num_generations": M,
        "settings": asdict(s), "curve": curve,
        "train_reward_last": statistics.fmean(tail) if tail else math.nan,
        "train_seconds_per_step": clock["train"] / s.steps,
        "decoded_tokens_per_step": decoded(hist) / s.steps,
        "appo_metrics": _metric_means(hist),
        "machine": {"python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                    "cpus": os.cpu_count()},
    }
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, out_path)
    return out


def _metric_means(history) -> dict[str, float]:
    keys = sorted({k for e in history for k in e if k.startswith("appo/") and isinstance(e[k], (int, float))})
    out = {}
    for k in keys:
        vals = [float(e[k]) for e in history if isinstance(e.get(k), (int, float)) and math.isfinite(e[k])]
        if vals:
            out[k] = statistics.fmean(vals)
    return out


# ------------------------------------------------------------------------------------------------ the grid


def run_grid(variants, s: Settings, runs_dir: Path, cache_dir: Path, workers: int, force: bool, quick: bool) -> None:
    _setup_process()
    warm_state(s, cache_dir)  # once, before the workers start
    jobs = [(v, seed) for seed in s.seeds for v in variants]
    runs_dir.mkdir(parents=True, exist_ok=True)

    def launch(job):
        v, seed = job
        path = runs_dir / f"{v}__seed{seed}.json"
        if path.exists() and not force:
            return f"{v} seed {seed}: kept"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_run", v, str(seed), "--out-dir", str(runs_dir),
               "--cache-dir", str(cache_dir)] + (["--quick"] if quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        log = runs_dir / f"{v}__seed{seed}.log"
        with open(log, "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        msg = f"{v} seed {seed}: rc {rc} in {time.perf_counter() - t0:.0f} s"
        print(msg, flush=True)
        if rc:
            print(log.read_text()[-3000:], flush=True)
        return msg

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


def aggregate(runs_dir: Path) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*__seed*.json"))]
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    table = {}
    for v, rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        final = [r["curve"][-1]["pass@1"] for r in rs]
        start = [r["curve"][0]["pass@1"] for r in rs]
        base_s = {r["seed"]: r for r in by.get(_baseline(v, rs[0]["num_generations"]), [])}
        diffs = [r["curve"][-1]["pass@1"] - base_s[r["seed"]]["curve"][-1]["pass@1"] for r in rs if r["seed"] in base_s]
        modes: dict[str, float] = {}
        for r in rs:
            fm = r["curve"][-1]["failure_modes"]
            total = sum(fm.values()) or 1
            for k, n in fm.items():
                modes[k] = modes.get(k, 0.0) + n / total / len(rs)
        steps = [r["curve"][-1]["step"] for r in rs]
        grpo_wall = [base_s[r["seed"]]["train_seconds_per_step"] for r in rs if r["seed"] in base_s]
        table[v] = {
            "seeds": [r["seed"] for r in rs], "M": rs[0]["num_generations"], "steps": max(steps),
            "overrides": rs[0]["overrides"],
            "pass1_start": _mean_std(start), "pass1_final": _mean_std(final), "pass1_final_per_seed": final,
            "gain": _mean_std([f - s0 for f, s0 in zip(final, start)]),
            "diff_vs_grpo_same_M": _mean_std(diffs), "diff_vs_grpo_per_seed": diffs,
            "train_reward_last": _mean_std([r["train_reward_last"] for r in rs]),
            "seconds_per_step": _mean_std([r["train_seconds_per_step"] for r in rs]),
            "wall_ratio_vs_grpo": (statistics.fmean(r["train_seconds_per_step"] for r in rs)
                                   / statistics.fmean(grpo_wall)) if grpo_wall else math.nan,
            "decoded_tokens_per_step": _mean_std([r["decoded_tokens_per_step"] for r in rs]),
            "failure_modes_final": modes,
        }
    return {"variants": table, "runs": runs}


def _fmt(ms, scale=100.0, spec=".1f") -> str:
    m, s = ms
    return "n/a" if not math.isfinite(m) else f"{m * scale:{spec}} ± {s * scale:{spec}}"


def markdown(agg: dict[str, Any]) -> str:
    t = agg["variants"]
    order = [v for v in VARIANTS if v in t]
    lines = [
        "| variant | M | seeds | held-out Pass@1 start → final (mean ± std, %) | per seed | Δ vs GRPO (same M, lr, seeds) "
        "| train reward (last ¼) | s/step (ratio to GRPO) | decoded tok/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in order:
        r = t[v]
        per_seed = ", ".join(f"{x * 100:.1f}" for x in r["pass1_final_per_seed"])
        lines.append(
            f"| `{v}` | {r['M']} | {len(r['seeds'])} | {_fmt(r['pass1_start'])} → {_fmt(r['pass1_final'])} | {per_seed} "
            f"| {_fmt(r['diff_vs_grpo_same_M'], spec='+.1f')} | {_fmt(r['train_reward_last'], 1, '+.3f')} "
            f"| {r['seconds_per_step'][0]:.2f} ({r['wall_ratio_vs_grpo']:.2f}×) | {r['decoded_tokens_per_step'][0]:.0f} |"
        )
    lines += ["", "Where the wrong held-out rollouts go wrong at the last evaluation (fraction of all samples, mean over "
              "seeds):", "", "| variant | correct | format | no_tool | tool_error | wrong_program | miscopy | other |",
              "|---|---|---|---|---|---|---|---|"]
    for v in order:
        fm = t[v]["failure_modes_final"]
        cols = ("correct", "format", "no_tool", "tool_error", "wrong_program", "miscopy", "other")
        lines.append(f"| `{v}` | " + " | ".join(f"{fm.get(c, 0.0):.2f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(agg: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by: dict[str, list[dict]] = {}
    for r in agg["runs"]:
        by.setdefault(r["variant"], []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    shown = [v for v in PLOT_VARIANTS if v in by] or [v for v in VARIANTS if v in by]
    for v in shown:
        rs = by[v]
        n = min(len(r["curve"]) for r in rs)
        y = np.array([[c["pass@1"] for c in r["curve"][:n]] for r in rs]) * 100
        for ax, key in zip(axes, ("step", "train_seconds", "decoded_tokens")):
            x = np.array([[c[key] for c in r["curve"][:n]] for r in rs]).mean(axis=0)
            ax.plot(x, y.mean(axis=0), marker="o", ms=3, label=f"{v} (n={len(rs)})",
                    lw=2.5 if v.startswith("grpo") else 1.5, ls="--" if v.startswith("grpo") else "-")
            ax.fill_between(x, y.mean(axis=0) - y.std(axis=0), y.mean(axis=0) + y.std(axis=0), alpha=0.12)
    for ax, label in zip(axes, ("optimizer steps", "training wall seconds (1 thread)", "decoded tokens")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out Pass@1 (%), mean ± std over seeds")
    axes[2].legend(fontsize=7, loc="lower right")
    fig.suptitle("APPO vs GRPO at equal budget: tiny tool-use arithmetic, warm-started ~1M model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs_dir: Path, json_path: Path, png_path: Path, readme: Path | None) -> str:
    agg = aggregate(runs_dir)
    json_path.write_text(json.dumps(agg, indent=1))
    md = markdown(agg)
    plot(agg, png_path)
    if readme is not None and readme.exists():
        text = readme.read_text()
        begin, end = "<!-- learning:begin -->", "<!-- learning:end -->"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            readme.write_text(f"{head}{begin}\n{md}\n{end}{tail}")
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(DEFAULT_GRID), help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=2, help="runs side by side, one torch thread each")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    p.add_argument("--force", action="store_true", help="rerun runs that already have results")
    p.add_argument("--report", action="store_true", help="only aggregate the saved runs")
    p.add_argument("--out-dir", type=Path, default=None, help="where runs go (default results/learning)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "trl_appo" / "bench")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON and the picture go")
    p.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    s = Settings.quick() if a.quick else Settings()
    if a.seeds:
        s = replace(s, seeds=tuple(int(x) for x in a.seeds.split(",")))
    if a.steps:
        s = replace(s, steps=a.steps)
    runs_dir = a.out_dir or (RESULTS_DIR / ("learning_quick" if a.quick else "learning"))
    if a._run:
        run_one(a._run[0], int(a._run[1]), s, a.cache_dir, runs_dir / f"{a._run[0]}__seed{a._run[1]}.json")
        return 0
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if not a.report:
        run_grid(variants, s, runs_dir, a.cache_dir, a.workers, a.force, a.quick)
    suffix = "_quick" if a.quick else ""
    a.results_dir.mkdir(parents=True, exist_ok=True)
    md = write_report(runs_dir, a.results_dir / f"learning{suffix}.json",
                      a.results_dir / f"learning_curves_v2{suffix}.png", None if a.quick else HERE / "README.md")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
