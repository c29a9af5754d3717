"""`trl-appo eval`: Pass@1 / Pass@k of a model on a dataset through the tool loop (flags: `EvalCommand`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from trl_appo.cli._args import BadInput

NAME = "eval"
SUMMARY = "Pass@1 / Pass@k of a model on a dataset through the tool loop."
USAGE = None
TAKES_REST = False

EVAL_MAX_COMPLETION_LENGTH = 512
"""`trl-appo eval`'s token budget when the model does not record the one it was trained with."""


@dataclass
class EvalCommand:
    """Roll out every prompt N times through the rollout engine (with tools) and report Pass@1 / Pass@K per data
    source. The dataset needs a `prompt` column (plain text or chat messages) and a gold column (`ground_truth`,
    `reward_model` or `solution`)."""

    model: str = field(metadata={"help": "A local model directory (save_pretrained output), `tiny`, `tiny_warm` or "
                                 "`smollm2`."})
    dataset: str = field(metadata={"help": "A .jsonl/.json/.parquet/.csv file, or task:tiny_arith / task:tool."})
    split: str | None = field(default=None, metadata={"help": "Split of a DatasetDict source (default: "
                                                      "heldout/test/validation)."})
    k: int = field(default=4, metadata={"help": "K of Pass@K (Pass@1 is always reported)."})
    n: int = field(default=8, metadata={"help": "Samples per prompt (>= K)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first LIMIT rows."})
    protocol: Literal["tags", "chat"] = field(default="tags", metadata={"help": "Tool-call protocol."})
    tools: list[str] = field(default_factory=lambda: ["python"],
                             metadata={"help": "Tools: python search (or python,search; 'none' for none)."})
    reward: str = field(default="answer_type", metadata={
        "help": "Score: answer_type, format_answer_type, format_f1, exact_match, f1, math_equivalence, accuracy "
        "(TRL), or pkg.module.fn."})
    threshold: float = field(default=1.0, metadata={"help": "A rollout is correct when its score >= this."})
    max_completion_length: int | None = field(default=None, metadata={
        "help": "Token budget per rollout. Default: the max_completion_length the model was trained with (recorded "
        "next to a model saved by `trl-appo train`/APPOTrainer), else "
        f"{EVAL_MAX_COMPLETION_LENGTH}."})
    max_tool_calls: int = field(default=4, metadata={"help": "Tool calls per rollout."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch."})
    seed: int = field(default=0, metadata={"help": "Torch seed."})
    output: str | None = field(default=None, metadata={"help": "Write the results table as JSON here (default: "
                                                       "print only)."})
    progress: Literal["auto", "always", "never"] = field(
        default="auto", metadata={"help": "Progress bar on stderr (auto: when stderr is a terminal)."})

    def __post_init__(self):
        if self.n < 1 or self.k < 1 or self.k > self.n:
            raise BadInput(f"need 1 <= --k <= --n (got k={self.k}, n={self.n})")


FLAGS = EvalCommand
"""This subcommand's flags (`trl_appo.cli._args` parses them)."""


def _with_progress(engine, total_prompts: int, enabled: bool):
    """Wrap `engine.run` so each evaluation batch advances a tqdm bar (prompts done / total)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_prompts, desc="eval", unit="prompt", disable=not enabled, file=sys.stderr)
    run = engine.run

    def run_with_progress(prompt_ids, *a, group_size=1, **kw):
        out = run(prompt_ids, *a, group_size=group_size, **kw)
        bar.update(len(prompt_ids) // max(1, group_size))
        return out

    engine.run = run_with_progress
    return bar


def run(args: EvalCommand, rest: list[str] | None = None) -> int:
    from trl_appo.runtime import held_stderr

    with held_stderr(discard_on=(BadInput,)):  # third-party noise never joins a one-line error (see train)
        from trl_appo import scripts

        try:
            ds = scripts.load_eval_dataset(args.dataset, args.split)
            if args.limit:
                ds = ds.select(range(min(args.limit, len(ds))))
            score_fn = scripts.reward_by_name(args.reward)
            tools = scripts.make_tools(args.tools)
            model, tokenizer = scripts.load_pretrained(args.model, seed=args.seed)
        except scripts.RecipeError as e:
            raise BadInput(str(e)) from e
        if args.max_completion_length is None:
            args.max_completion_length = scripts.trained_max_completion_length(args.model) or EVAL_MAX_COMPLETION_LENGTH
    print(scripts.set_cpu_threads()[1], file=sys.stderr, flush=True)
    import torch

    from trl_appo.evaluation import evaluate, make_hf_generate_fn
    from trl_appo.rollout import build_engine, eos_token_ids_of

    torch.manual_seed(args.seed)
    tools_names = [t.name for t in tools] or ["none"]
    # Training's engine rules (trl_appo.rollout.build_engine): evaluation stops where training does.
    engine = build_engine(
        None, tokenizer, tools,
        protocol=args.protocol, max_completion_length=args.max_completion_length, max_tool_calls=args.max_tool_calls,
        eos_token_ids=eos_token_ids_of(model, tokenizer),
    )
    # Each model turn stops at the protocol's stops (`</python>`), as training's generate does.
    engine.generate_fn = make_hf_generate_fn(
        model, tokenizer, temperature=args.temperature, top_p=args.top_p,
        stop_strings=engine.protocol.stop_strings, stop_token_ids=engine.protocol.stop_token_ids,
    )
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    bar = _with_progress(engine, len(ds), show)
    try:
        result = evaluate(
            ds, engine, n=args.n, ks=(1, args.k), score_fn=score_fn, threshold=args.threshold,
            batch_size=args.batch_size, max_completion_length=args.max_completion_length,
            max_tool_calls=args.max_tool_calls, temperature=args.temperature, top_p=args.top_p,
            model_name=args.model, extra_settings={"protocol": args.protocol, "tools": ",".join(tools_names),
                                                   "dataset": args.dataset},
        )
    finally:
        bar.close()
    print(result.table())
    if args.output:
        path = result.save_json(args.output)
        print(f"saved {path}")
    return 0
