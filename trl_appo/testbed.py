"""The tiny-model testbed shared by the demo (`trl_appo.demo`, Part B) and the benchmarks (`benchmarks/learning.py`,
`benchmarks/compare.py`): the ~1M-parameter Qwen2 of `trl_appo.testing` with a question-only chat template, its SFT
warm start on ideal tag-protocol transcripts (cached by a key of the settings that make it), the trainer of one RL
run, and the held-out Pass@k evaluation through the rollout engine.

Each caller keeps its own settings and cache key fields (so the caches written before this module still hit); this
module owns how the pieces are built.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# The minimal template of the tiny model: the question only (system prompts are dropped on purpose).
MINI_CHAT_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{{ m['content'] }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '\n' }}{%- endif %}"
)


def cache_key(fields: Mapping[str, Any]) -> str:
    """The warm-start cache key: a short hash of the settings that make the weights."""
    return hashlib.sha1(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()[:12]


def tiny_tokenizer():
    from trl_appo.testing import build_tiny_tokenizer

    return build_tiny_tokenizer(chat_template=MINI_CHAT_TEMPLATE)


def tiny_model(tokenizer, hidden: int, layers: int, seed: int, state: Mapping[str, Any] | None = None):
    """A fresh tiny Qwen2 (seeded), with `state` (e.g. the warm start) loaded when given."""
    import torch

    from trl_appo.testing import build_tiny_model

    torch.manual_seed(seed)
    model = build_tiny_model(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                             intermediate_size=4 * hidden, seed=seed)
    if state is not None:
        model.load_state_dict(state)
    return model


def sft_examples(tokenizer, rows: Sequence[Mapping[str, Any]]) -> list:
    """SFT examples of transcript rows (`trl_appo.tasks.make_sft_transcripts`): prompt rendered, completion tagged."""
    from trl_appo.sft import tag_transcript_example

    return [
        tag_transcript_example(
            tokenizer, tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
            r["completion"][0]["content"],
        )
        for r in rows
    ]


def warm_state(path: str | os.PathLike, *, hidden: int, layers: int, seed: int, sft_steps: int, sft_lr: float,
               rows: Callable[[], Sequence[Mapping[str, Any]]], log=print,
               sft_schedule_steps: int | None = None) -> dict[str, Any]:
    """The tiny model's SFT warm-start weights, loaded from `path` or trained once (on `rows()`) and saved there.

    `sft_schedule_steps`: the one-cycle schedule's length when training stops before its end (`sft_warm_start`)."""
    import torch

    from trl_appo.sft import sft_warm_start

    path = Path(path)
    if path.exists():
        log(f"[warm start] loaded cached weights {path}")
        return torch.load(path, weights_only=True)
    tok = tiny_tokenizer()
    model = tiny_model(tok, hidden, layers, seed)
    t0 = time.perf_counter()
    hist = sft_warm_start(model, tok, sft_examples(tok, rows()), steps=sft_steps, lr=sft_lr, seed=seed,
                          progress=False, schedule_steps=sft_schedule_steps)
    of = f" of a {sft_schedule_steps}-step schedule" if sft_schedule_steps else ""
    log(f"[warm start] SFT {sft_steps} steps{of} in {time.perf_counter() - t0:.0f} s, final loss "
        f"{statistics.fmean(hist.loss[-10:]):.4f} -> {path}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return state


def run_args(output_dir: Path, seed: int, **kw):
    """The `APPOConfig` of one CPU run: the testbed's fixed settings, then `kw`."""
    from trl_appo.config import APPOConfig

    base = dict(
        output_dir=str(output_dir), bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        gradient_checkpointing=False, tool_protocol="tags", log_branch_trees=True, seed=seed, temperature=1.0,
        disable_tqdm=False, dataloader_num_workers=0,
        # transformers 5 TrainingArguments.use_cache defaults to False and the Trainer writes it into
        # model.config, so generation would run without a KV cache (~8x slower decoding on CPU).
        use_cache=True,
    )
    base.update(kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return APPOConfig(**base)


def make_trainer(model, tokenizer, args, train_dataset, reward_funcs, tools, **kw):
    """An `APPOTrainer` (GRPO with `branch_criterion="none"`) without TRL's terminal printers; `kw` goes through."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from trl_appo.trainer import APPOTrainer

    trainer = APPOTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=train_dataset,
                          reward_funcs=reward_funcs, tools=tools, **kw)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def heldout_eval(model, tokenizer, data, *, n: int, seed: int, tools, score_fn, batch_size: int,
                 max_completion_length: int, max_tool_calls: int, ks: Sequence[int] = (1,), generate_fn=None,
                 keep_text: bool = True):
    """Held-out Pass@k through the rollout engine (`trl_appo.evaluation.evaluate`, tag protocol, T = 1), sampled
    under `seed`; the caller's torch RNG is left as it was."""
    import torch

    from trl_appo.evaluation import evaluate, make_hf_generate_fn
    from trl_appo.rollout import eos_token_ids_of

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return evaluate(
            data, generate_fn=generate_fn or make_hf_generate_fn(model, tokenizer, temperature=1.0),
            tokenizer=tokenizer, protocol="tags", tools=tools, eos_token_ids=eos_token_ids_of(model, tokenizer), n=n,
            ks=ks, score_fn=score_fn, threshold=1.0, batch_size=batch_size,
            max_completion_length=max_completion_length, max_tool_calls=max_tool_calls, temperature=1.0,
            keep_text=keep_text,
        )


def pass1_numbers(res) -> dict[str, float]:
    """Pass@1, mean reward, the fraction well formatted (reward > -1) and tool calls per rollout of an evaluation."""
    scored = [x["score"] for x in res.samples if x["score"] is not None]
    return {"pass@1": res.overall.pass_at[1], "mean_reward": res.overall.mean_score,
            "format_ok": statistics.fmean(x > -1 for x in scored) if scored else float("nan"),
            "tool_calls_per_rollout": res.overall.tool_calls_per_rollout}
