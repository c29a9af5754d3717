"""APPO's wall time per optimizer step against GRPO's at the same decoded-token budget (issue 15, item 5).

Trains each variant for `--steps` optimizer steps on `benchmarks/learning.py`'s warm-started regime task, variants
interleaved (one run of each per repeat, after one discarded warm-up round), in one process on one torch thread,
and reports per optimizer step (medians over repeats): wall seconds, the ratio to GRPO's measured in the same
repeat, decoded model tokens (roots + branches, the trainer's `appo/budget/*` log), leaves per prompt, and where the
time went (`appo/budget/seconds_generate|score|reward|train`). `--steps` should be a multiple of
`steps_per_generation` (4) so every run has the same share of generation steps.

Variants (M = `--num-generations`, the budget):
* `grpo`: GRPO (`branch_criterion="none"`) at M rollouts per prompt;
* `appo_swap`: a pure class swap, the library defaults (equal M, fewer decoded tokens);
* `appo_tokens_update` / `appo_tokens_generation`: `rollout_budget="tokens"` (M full rollouts' worth of decoded
  tokens per prompt, spent on roots and branches), branching once per optimizer step or once per generation batch;
* `appo_tokens_online`: the same budget, each branch forked right after a random tool result of its root while the
  roots are generated (`branch_schedule="online"`: one series of generate calls, no scoring forward).

Run: `python benchmarks/bench_speed.py [--regime deep] [--steps 8] [--repeats 3]` (`--quick`: a smoke run)
(writes `benchmarks/results/bench_speed_<regime>.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_stop  # noqa: E402
import learning  # noqa: E402

VARIANTS = {
    "grpo": dict(learning.GRPO),
    "appo_swap": {},
    "appo_tokens_update": {"rollout_budget": "tokens", "branch_schedule": "per_update"},
    "appo_tokens_generation": {"rollout_budget": "tokens", "branch_schedule": "per_generation"},
    "appo_tokens_online": {"rollout_budget": "tokens", "branch_schedule": "online", "branch_criterion": "random"},
}
PARTS = ("seconds_generate", "seconds_score", "seconds_reward", "seconds_train")


def run(variant: str, s, state, tok, data, seed: int, steps: int) -> dict:
    M = s.num_generations
    trainer = bench_stop.make_trainer("bench_speed", s, state, tok, data, seed, steps, **VARIANTS[variant])
    args = trainer.args
    times = bench_stop.train_timed(trainer)
    hist = [h for h in trainer.state.log_history if "appo/budget/seconds_train" in h]
    parts = {k: sum(h[f"appo/budget/{k}"] for h in hist) / steps for k in PARTS}
    leaves = [h["appo/leaves_per_prompt"] for h in trainer.state.log_history if "appo/leaves_per_prompt" in h]
    return {"variant": variant, "seconds_per_step": sum(times) / steps, "step_seconds": times,
            "decoded_tokens_per_step": learning.decoded_tokens(trainer.state.log_history) / steps,
            # the roots' and the branches' calls (trl_appo.budget)
            "tool_calls_per_step": sum(h.get(f"appo/budget/tool_calls_{kind}", 0) for h in hist
                                       for kind in ("roots", "branches")) / steps,
            "leaves_per_prompt": statistics.fmean(leaves) if leaves else float(M),
            "shape": {"num_roots": args.num_roots, "num_branches": args.num_branches,
                      "branch_schedule": args.branch_schedule},
            **parts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", default="deep", choices=sorted(learning.REGIMES))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--num-generations", type=int, default=None, help="the budget M (default: the regime's)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "trl_appo" / "bench")
    p.add_argument("--sft-steps", type=int, default=None, help="warm-start SFT steps (default: the regime's)")
    p.add_argument("--sft-schedule-steps", type=int, default=None,
                   help="the SFT schedule's length (0: sft-steps; default: the regime's)")
    p.add_argument("--sft-rows", type=int, default=None, help="SFT transcripts (default: the regime's)")
    p.add_argument("--quick", action="store_true", help="a smoke run at the learning benchmark's smoke size")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if "grpo" not in variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants must include grpo (the baseline) and name only {list(VARIANTS)}")
    learning._setup_process()
    s = learning.Settings.for_regime(a.regime, quick=a.quick)
    if a.sft_steps:
        s = dataclasses.replace(s, sft_steps=a.sft_steps)
    if a.sft_schedule_steps is not None:
        s = dataclasses.replace(s, sft_schedule_steps=a.sft_schedule_steps or None)
    if a.sft_rows:
        s = dataclasses.replace(s, sft_rows=a.sft_rows)
    if a.num_generations:
        s = dataclasses.replace(s, num_generations=a.num_generations)
    state = learning.warm_state(s, a.cache_dir)
    tok = learning.tokenizer()
    data = learning.task_data(s)
    run("grpo", s, state, tok, data, seed=99, steps=min(a.steps, 4))  # warm-up: imports, allocator, caches
    runs = []
    for rep in range(a.repeats):
        for v in variants:
            r = run(v, s, state, tok, data, seed=rep, steps=a.steps)
            r["repeat"] = rep
            runs.append(r)
            print(json.dumps({k: r[k] for k in ("variant", "repeat", "seconds_per_step", "decoded_tokens_per_step")}),
                  flush=True)
    base = {r["repeat"]: r["seconds_per_step"] for r in runs if r["variant"] == "grpo"}
    summary = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        summary[v] = {
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in mine),
            "ratio_to_grpo": statistics.median(r["seconds_per_step"] / base[r["repeat"]] for r in mine),
            "ratios_per_repeat": [round(r["seconds_per_step"] / base[r["repeat"]], 3) for r in mine],
            "decoded_tokens_per_step": statistics.median(r["decoded_tokens_per_step"] for r in mine),
            "tool_calls_per_step": statistics.median(r["tool_calls_per_step"] for r in mine),
            "leaves_per_prompt": statistics.median(r["leaves_per_prompt"] for r in mine),
            "shape": mine[0]["shape"],
            **{k: statistics.median(r[k] for r in mine) for k in PARTS},
        }
    out = a.out or learning.RESULTS_DIR / f"bench_speed_{a.regime}.json"
    rec = {"regime": a.regime, "sft_steps": s.sft_steps, "sft_schedule_steps": s.sft_schedule_steps,
           "sft_rows": s.sft_rows, "warm_key": s.warm_key(), "num_generations": s.num_generations, "steps": a.steps,
           "repeats": a.repeats, "threads": 1, "load_average_at_end": os.getloadavg(), "summary": summary, "runs": runs}
    out.write_text(json.dumps(rec, indent=1))
    for v, r in summary.items():
        print(f"{v:24s} {r['seconds_per_step']:7.2f} s/step  x{r['ratio_to_grpo']:.2f} GRPO  "
              f"{r['decoded_tokens_per_step']:7.0f} tok/step  gen {r['seconds_generate']:.2f} score "
              f"{r['seconds_score']:.2f} reward {r['seconds_reward']:.2f} train {r['seconds_train']:.2f}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
