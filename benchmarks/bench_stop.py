"""Stopping each model turn at the protocol's stops (`</python>`) on the transformers backend: time and decoding.

Before, `model.generate` stopped at eos only, so every tool turn decoded the whole remaining completion budget and
the engine threw away everything after the closing tag. This trains GRPO (branch_criterion='none') and APPO (the
library defaults: a pure class swap) on `benchmarks/learning.py`'s warm-started task, with the early stop off
(`APPOTrainer._appo_early_stop = False`, the old behaviour) and on, interleaved, in one process on one thread, and
reports per optimizer step (medians over runs; one discarded warm-up run first; `--steps` should be a multiple of
`steps_per_generation` = 4, so every run has the same share of generation steps):
wall seconds, decoded model tokens (the trainer's budget log: tokens kept) and generated positions (rows x decode
steps of every generate call, finished rows included: what the model actually computed).

Run: `python benchmarks/bench_stop.py [--regime tiny] [--steps 5] [--repeats 3]`
(writes `benchmarks/results/bench_stop_<regime>.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning  # noqa: E402


def train_timed(trainer) -> list[float]:
    """Train `trainer` without TRL's terminal printers; the wall seconds of each optimizer step."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    times: list[float] = []
    mark = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            mark["t"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - mark["t"])

    trainer.add_callback(Clock())
    trainer.train()
    return times


def make_trainer(name: str, s, state, tok, data, seed: int, steps: int, **kw):
    """An `APPOTrainer` on `learning.py`'s regime task (the regime's shape, lr 1e-4 constant, T = 1) with `kw` as
    `APPOConfig` overrides, its model freshly built from the warm start `state` under `seed`."""
    import torch

    from trl_appo.demo import _common_args
    from trl_appo.trainer import APPOTrainer

    M = s.num_generations
    args = _common_args(
        Path("/tmp") / f"_{name}_{os.getpid()}", seed, learning_rate=1e-4, lr_scheduler_type="constant",
        max_steps=steps, num_generations=M, per_device_train_batch_size=M * s.prompts_per_step,
        steps_per_generation=s.steps_per_generation, gradient_accumulation_steps=1,
        max_completion_length=s.max_completion_length, min_branch_tokens=s.min_branch_tokens,
        max_tool_calls=s.max_tool_calls, temperature=1.0, disable_tqdm=True, log_branch_trees=False, **kw,
    )
    torch.manual_seed(seed)
    model = learning.new_model(s, tok, state)
    return APPOTrainer(model=model, processing_class=tok, args=args, train_dataset=data["train"],
                       reward_funcs=[learning.reward_fn(s)], tools=[learning.make_tool()])


def run(variant: str, stop: bool, s, state, tok, data, seed: int, steps: int) -> dict:
    import torch

    trainer = make_trainer("bench_stop", s, state, tok, data, seed, steps,
                           **(dict(learning.GRPO) if variant == "grpo" else {}))
    args = trainer.args
    positions = [0]

    def count(module, a, kwargs):
        ids = kwargs.get("input_ids", a[0] if a else None)
        if ids is not None and not torch.is_grad_enabled() and ids.shape[1] == 1:  # one decode step of a batch
            positions[0] += ids.shape[0]

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer._appo_early_stop = stop
    times = train_timed(trainer)
    hist = trainer.state.log_history
    return {"variant": variant, "stop": stop, "seconds_per_step": sum(times) / steps,
            "step_seconds": times, "decoded_tokens_per_step": learning.decoded_tokens(hist) / steps,
            "generated_positions_per_step": positions[0] / steps,
            "tool_calls_per_step": learning.logged_tool_calls(hist, args) / steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", default="tiny", choices=sorted(learning.REGIMES))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "trl_appo" / "bench")
    p.add_argument("--sft-steps", type=int, default=None, help="warm-start SFT steps (default: the regime's)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    learning._setup_process()
    s = learning.Settings.for_regime(a.regime)
    if a.sft_steps is not None:
        s = dataclasses.replace(s, sft_steps=a.sft_steps)
    tok = learning.tokenizer()
    state = learning.warm_state(s, a.cache_dir)
    data = learning.task_data(s)
    runs = []
    run("appo", True, s, state, tok, data, seed=99, steps=4)  # warm-up (imports, caches, sandbox), discarded
    for r in range(a.repeats):
        order = [(v, st) for v in ("grpo", "appo") for st in (False, True)]
        for v, st in (order if r % 2 == 0 else order[::-1]):  # interleaved, alternating order
            res = run(v, st, s, state, tok, data, seed=r, steps=a.steps)
            runs.append(res)
            print(f"[{v} stop={st} rep {r}] {res['seconds_per_step']:.2f} s/step, "
                  f"{res['decoded_tokens_per_step']:.0f} decoded tokens, "
                  f"{res['generated_positions_per_step']:.0f} generated positions, "
                  f"{res['tool_calls_per_step']:.1f} tool calls per step", flush=True)
    summary = {}
    for v in ("grpo", "appo"):
        for st in (False, True):
            rs = [x for x in runs if x["variant"] == v and x["stop"] == st]
            summary[f"{v}_{'stop' if st else 'eos_only'}"] = {
                k: statistics.median(x[k] for x in rs)
                for k in ("seconds_per_step", "decoded_tokens_per_step", "generated_positions_per_step",
                          "tool_calls_per_step")
            }
    print(json.dumps(summary, indent=1))
    out = a.out or Path(__file__).resolve().parent / "results" / f"bench_stop_{a.regime}.json"
    out.write_text(json.dumps({"regime": a.regime, "sft_steps": s.sft_steps, "steps": a.steps,
                               "repeats": a.repeats, "summary": summary,
                               "runs": runs, "load_average_at_end": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
