"""A tiny supervised warm start for tag-protocol tool use (the CPU demo's "learning" part).

A randomly initialised ~1M-parameter model never emits a tool call, so RL has nothing to reinforce. A few
minutes of SFT on tool transcripts teaches the *format* (measured: ~4 min to 100% tool-call accuracy with a
short prompt). The demo stops earlier on purpose, so the policy is still imperfect at copying the tool's result
into the answer and RL has headroom to show.

Transcripts are tokenised exactly as the rollout engine builds completions under `TagProtocol`: model-written
segments and ` <result>\\n…\\n</result>` blocks are encoded separately and concatenated, and the result blocks
(tool output, mask 0 in the engine) carry no loss.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

RESULT_BLOCK = re.compile(r" ?<result>.*?</result>", re.DOTALL)


@dataclass
class SFTExample:
    """One transcript in token space. `loss_mask` is 1 on tokens the model must learn to write."""

    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[int]


def tag_transcript_example(tokenizer, prompt: str, completion: str, add_eos: bool = True) -> SFTExample:
    """Tokenise a plain-text prompt and a tag-protocol completion as the engine would produce them.

    `completion` is the whole episode text, e.g. `<python>print(3*4)</python> <result>\\n12\\n</result>`
    `<answer>\\boxed{12}</answer>`; result blocks are masked out of the loss, and eos ends the episode.
    """

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for m in RESULT_BLOCK.finditer(completion):
        model_part, tool_part = enc(completion[pos : m.start()]), enc(m.group(0))
        ids += model_part + tool_part
        mask += [1] * len(model_part) + [0] * len(tool_part)
        pos = m.end()
    tail = enc(completion[pos:])
    ids += tail
    mask += [1] * len(tail)
    if add_eos:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return SFTExample(enc(prompt), ids, mask)


@dataclass
class SFTHistory:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def _collate(batch: Sequence[SFTExample], pad_id: int):
    import torch

    seqs = [e.prompt_ids + e.completion_ids for e in batch]
    labels_mask = [[0] * len(e.prompt_ids) + e.loss_mask for e in batch]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (s, lm) in enumerate(zip(seqs, labels_mask, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        lab = torch.tensor([t if m else -100 for t, m in zip(s, lm, strict=True)])
        labels[i, : len(s)] = lab
    return input_ids, attention, labels


def sft_warm_start(
    model,
    tokenizer,
    examples: Sequence[SFTExample],
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    eval_fn: Callable[[], float] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    desc: str = "SFT warm start",
    schedule_steps: int | None = None,
) -> SFTHistory:
    """Plain-torch SFT (AdamW + one-cycle LR), loss on model-written completion tokens only.

    Args:
        model: a causal LM (trained in place, left in eval mode).
        examples: transcripts from `tag_transcript_example`; sampled with replacement, seeded.
        eval_fn: optional callable returning a score, called every `eval_every` steps and at the end.
        schedule_steps: length of the one-cycle schedule when it is longer than `steps`: training stops after
            `steps` of it (a reproducible checkpoint partway through a longer run, e.g. a weaker warm start taken
            before the learning rate anneals). Default: `steps`.

    Returns:
        The loss (and eval) history and the wall time.
    """
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    history = SFTHistory()
    g = torch.Generator().manual_seed(seed)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total = steps if schedule_steps is None else schedule_steps
    if total < steps:
        raise ValueError(f"schedule_steps ({total}) must be >= steps ({steps})")
    if total >= 4:
        # OneCycle needs at least one step in each phase: with pct_start=0.1 and <= 10 steps its warm-up has length 0.
        sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=total, pct_start=max(0.1, 2 / total))
    else:  # too short to schedule: constant learning rate
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda _: 1.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    ema = None
    for step in bar:
        idx = torch.randint(len(examples), (batch_size,), generator=g).tolist()
        input_ids, attention, labels = _collate([examples[i] for i in idx], pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        history.steps.append(step + 1)
        history.loss.append(value)
        if eval_fn is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            model.eval()
            history.evals.append((step + 1, float(eval_fn())))
            model.train()
        if not math.isfinite(value):
            raise FloatingPointError(f"SFT loss became {value} at step {step + 1}; lower lr (now {lr}).")
        bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    if eval_fn is not None:
        history.evals.append((steps, float(eval_fn())))
    history.seconds = time.perf_counter() - t0
    return history
