"""Pass@1 / Pass@k evaluation through the rollout engine, per data source, with tool statistics.

Each prompt is rolled out ``n`` times by :class:`trl_appo.rollout.engine.RolloutEngine` (the same multi-turn
tool loop the trainer uses), each rollout is scored by a TRL-signature reward function, and a rollout is
correct when its score reaches ``threshold`` (default 1.0; or when ``correct_fn(score)`` says so).

* Pass@1 is the mean over prompts of ``c / n`` (the mean over samples, not one greedy sample).
* Pass@k uses the unbiased estimator of Chen et al. 2021 (*Evaluating Large Language Models Trained on
  Code*): ``1 - C(n - c, k) / C(n, k)`` per prompt, averaged, computed as a stable product.
* A prompt whose score is None for any sample (e.g. an empty gold) cannot be scored: it is left out of the
  pass rates and counted as ``unscored``; its rollouts still count in the tool statistics.

:func:`make_hf_generate_fn` wraps ``model.generate`` as the engine's ``GenerateFn`` so evaluation runs without
a trainer. The decoding settings passed to :func:`evaluate` are recorded in the results, which print as a
table and save as JSON.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trl_appo.rewards import answer_type_reward
from trl_appo.rollout.stopping import stopping_criteria, strip_stop_padding

ScoreFn = Callable[..., list[float | None]]


# ----------------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct out of ``n`` samples (Chen et al. 2021).

    ``1 - C(n-c, k) / C(n, k)``, evaluated as ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` so large ``n`` neither
    overflows nor loses precision. Raises ValueError unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean of :func:`pass_at_k` over prompts given as ``(n, c)`` pairs; NaN for no prompts."""
    if not counts:
        return math.nan
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


@dataclass
class SourceResult:
    """Aggregates over one data source (or all, as ``overall``)."""

    data_source: str
    num_prompts: int  # prompts that could be scored
    num_unscored: int  # prompts left out because some score was None
    num_rollouts: int  # all rollouts, scored or not
    pass_at: dict[int, float]  # k -> mean unbiased pass@k over scored prompts
    mean_score: float  # mean reward over the rollouts of scored prompts
    tool_calls_per_rollout: float
    tool_failures_per_rollout: float
    finish_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns: per-source and overall results, the settings, and per-rollout records."""

    per_source: dict[str, SourceResult]
    overall: SourceResult
    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def pass_at(self, k: int, data_source: str | None = None) -> float:
        """Pass@k overall, or of one data source."""
        result = self.overall if data_source is None else self.per_source[data_source]
        return result.pass_at[k]

    def table(self) -> str:
        """A plain-text table: one line per data source, then ``overall``, under a line of settings."""
        ks = sorted(self.overall.pass_at)
        header = ["data_source", "prompts", "rollouts", *[f"pass@{k}" for k in ks], "score", "calls/r", "fails/r", "unscored"]
        rows = [header]
        for result in [*self.per_source.values(), self.overall]:
            rows.append(
                [
                    result.data_source,
                    str(result.num_prompts),
                    str(result.num_rollouts),
                    *[f"{result.pass_at[k]:.4f}" for k in ks],
                    f"{result.mean_score:.4f}",
                    f"{result.tool_calls_per_rollout:.2f}",
                    f"{result.tool_failures_per_rollout:.2f}",
                    str(result.num_unscored),
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        settings = ", ".join(f"{key}={value}" for key, value in self.settings.items() if value is not None)
        return "\n".join([settings, *lines])

    def __str__(self) -> str:
        return self.table()

    def to_dict(self, include_samples: bool = True) -> dict[str, Any]:
        """JSON-ready dict (pass@k keys become ``"pass@k"`` strings)."""

        def source(result: SourceResult) -> dict[str, Any]:
            data = asdict(result)
            data["pass_at"] = {f"pass@{k}": v for k, v in result.pass_at.items()}
            return data

        out = {
            "settings": self.settings,
            "overall": source(self.overall),
            "per_source": {name: source(r) for name, r in self.per_source.items()},
        }
        if include_samples:
            out["samples"] = self.samples
        return out

    def save_json(self, path: str | Path, include_samples: bool = True) -> Path:
        """Write :meth:`to_dict` as indented JSON (NaN written as null); returns the path."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(clean(self.to_dict(include_samples)), indent=2, ensure_ascii=False))
        return path


def aggregate(
    samples: Sequence[Mapping[str, Any]], ks: Sequence[int], n: int, name: str = "overall"
) -> SourceResult:
    """Aggregate per-rollout records (keys ``prompt_index, score, correct, tool_calls, tool_failures,
    finish_reason``) of prompts sampled ``n`` times each."""
    by_prompt: dict[int, list[Mapping[str, Any]]] = {}
    for sample in samples:
        by_prompt.setdefault(sample["prompt_index"], []).append(sample)
    scored = {i: group for i, group in by_prompt.items() if all(s["score"] is not None for s in group)}
    counts = [(len(group), sum(bool(s["correct"]) for s in group)) for group in scored.values()]
    scores = [s["score"] for group in scored.values() for s in group]
    finish: dict[str, int] = {}
    for sample in samples:
        finish[sample["finish_reason"]] = finish.get(sample["finish_reason"], 0) + 1
    num_rollouts = len(samples)
    return SourceResult(
        data_source=name,
        num_prompts=len(scored),
        num_unscored=len(by_prompt) - len(scored),
        num_rollouts=num_rollouts,
        pass_at={k: mean_pass_at_k(counts, k) for k in ks if k <= n},
        mean_score=sum(scores) / len(scores) if scores else math.nan,
        tool_calls_per_rollout=sum(s["tool_calls"] for s in samples) / num_rollouts if num_rollouts else math.nan,
        tool_failures_per_rollout=sum(s["tool_failures"] for s in samples) / num_rollouts if num_rollouts else math.nan,
        finish_reasons=finish,
    )


# ----------------------------------------------------------------------------------------------------
# Evaluation through the engine
# ----------------------------------------------------------------------------------------------------


def _rows(dataset: Any) -> list[dict[str, Any]]:
    if hasattr(dataset, "to_list"):
        return dataset.to_list()
    return [dict(row) for row in dataset]


def _stat(stats: Any, name: str) -> int:
    if stats is None:
        return 0
    if isinstance(stats, Mapping):
        return int(stats.get(name, 0))
    return int(getattr(stats, name, 0))


def evaluate(
    dataset: Any,
    engine: Any = None,
    *,
    generate_fn: Callable | None = None,
    tokenizer: Any = None,
    protocol: Any = None,
    tools: Any = None,
    n: int = 1,
    ks: Sequence[int] = (1,),
    score_fn: ScoreFn = answer_type_reward,
    threshold: float = 1.0,
    correct_fn: Callable[[float], bool] | None = None,
    batch_size: int = 8,
    max_completion_length: int = 1024,
    max_tool_calls: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    model_name: str | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    keep_text: bool = True,
    eos_token_ids: Sequence[int] | None = None,
) -> EvaluationResult:
    """Roll out every prompt ``n`` times through the rollout engine and report Pass@1 / Pass@k per data source.

    Args:
        dataset: rows with a conversational or plain ``prompt`` and the gold columns ``score_fn`` reads (a
            ``datasets.Dataset`` or a list of dicts); ``data_source`` groups the report (missing: "default").
        engine: a ``RolloutEngine``; else one is built by :func:`trl_appo.rollout.build_engine` (training's stop
            rules) from ``generate_fn``, ``tokenizer``, ``protocol`` ("tags" (default) or "chat", or a protocol
            object), ``tools``, ``max_completion_length``, ``max_tool_calls`` and ``eos_token_ids`` (default the
            tokenizer's; ``trl_appo.rollout.eos_token_ids_of(model, tokenizer)`` gives the ones training stops at).
        n: samples per prompt. ks: the k of Pass@k to report (each ``<= n``; 1 is always reported).
        score_fn: a TRL-signature reward function (sync or async); it receives every dataset column as kwargs,
            like in TRL. Default :func:`~trl_appo.rewards.answer_type_reward` (math equivalence / choice letter /
            F1), so with ``threshold=1.0`` a QA rollout is correct only at token F1 1.0.
        threshold / correct_fn: a rollout is correct when ``correct_fn(score)`` (default ``score >= threshold``).
        batch_size: prompts per ``engine.run`` call (each run holds ``batch_size * n`` rollouts).
        temperature, top_p, max_new_tokens, model_name, extra_settings: recorded in the results' settings
            (the sampling itself is the generate function's, see :func:`make_hf_generate_fn`).
        keep_text: keep each rollout's decoded text in ``samples``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = sorted({1, *ks})
    if ks[-1] > n:
        raise ValueError(f"pass@{ks[-1]} needs at least {ks[-1]} samples per prompt; n={n}")
    if engine is None:
        if generate_fn is None or tokenizer is None:
            raise ValueError("pass either an engine or a generate_fn and a tokenizer")
        from trl_appo.rollout.build import build_engine

        engine = build_engine(
            generate_fn, tokenizer, tools, protocol=protocol if protocol is not None else "tags",
            max_completion_length=max_completion_length, max_tool_calls=max_tool_calls, eos_token_ids=eos_token_ids,
        )
    is_correct = correct_fn if correct_fn is not None else (lambda score: score >= threshold)
    rows = _rows(dataset)
    if rows and "prompt" not in rows[0]:
        raise ValueError(f"the dataset needs a `prompt` column; it has {sorted(rows[0])}")

    samples: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompt_ids = engine.tokenize_prompts([row["prompt"] for row in batch])
        repeated = [ids for ids in prompt_ids for _ in range(n)]  # contiguous blocks of n (the engine's contract)
        rollouts = engine.run(repeated, group_size=n)
        expanded = [row for row in batch for _ in range(n)]
        columns = {key: [row.get(key) for row in expanded] for key in expanded[0] if key != "prompt"}
        columns["executed_tool_calls"] = [r.executed_tool_calls for r in rollouts]  # as the trainer passes it
        scores = score_fn(
            prompts=[row["prompt"] for row in expanded],
            completions=[r.messages for r in rollouts],
            completion_ids=[r.completion_ids for r in rollouts],
            **columns,
        )
        if inspect.isawaitable(scores):  # async reward functions, as TRL allows
            scores = asyncio.run(scores)
        for j, (row, rollout, score) in enumerate(zip(expanded, rollouts, scores)):
            score = None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score)
            sample = {
                "prompt_index": start + j // n,
                "sample_index": j % n,
                "data_source": str(row.get("data_source") or "default"),
                "score": score,
                "correct": None if score is None else bool(is_correct(score)),
                "tool_calls": _stat(rollout.tool_stats, "calls"),
                "tool_failures": _stat(rollout.tool_stats, "failures"),
                "finish_reason": rollout.finish_reason,
                "completion_tokens": len(rollout.completion_ids),
            }
            if keep_text:
                sample["text"] = rollout.text
            samples.append(sample)

    sources = sorted({s["data_source"] for s in samples})
    per_source = {name: aggregate([s for s in samples if s["data_source"] == name], ks, n, name) for name in sources}
    settings = {
        "model_name": model_name,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "max_completion_length": getattr(engine, "max_completion_length", max_completion_length),
        "max_tool_calls": getattr(engine, "max_tool_calls", max_tool_calls),
        "n": n,
        "k": ks,
        "threshold": None if correct_fn is not None else threshold,
        "correct_fn": getattr(correct_fn, "__name__", None) if correct_fn is not None else None,
        "score_fn": getattr(score_fn, "__name__", type(score_fn).__name__),
        "num_prompts": len(rows),
        **dict(extra_settings or {}),
    }
    return EvaluationResult(per_source, aggregate(samples, ks, n), settings, samples)


# ----------------------------------------------------------------------------------------------------
# transformers backend
# ----------------------------------------------------------------------------------------------------


def make_hf_generate_fn(
    model: Any,
    tokenizer: Any,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    top_k: int = 0,
    stop_strings: Sequence[str] = (),
    stop_token_ids: Iterable[int] = (),
) -> Callable[[list[list[int]], int, int], tuple[list[list[int]], None]]:
    """The engine's ``GenerateFn`` over ``model.generate`` (no trainer needed).

    Contexts are left-padded with the pad token (eos if none) and an attention mask; sampling uses
    ``temperature``, ``top_p`` and ``top_k`` (default 0 = off, as TRL's GRPOConfig samples during training, so
    evaluation reads the policy that was trained; ``temperature == 0``: greedy). Each call generates at most
    ``min(max_new_tokens, the engine's budget)`` tokens per row, in chunks of ``batch_size`` rows (None: all).
    Returns the new ids per row, cut after the first end-of-sequence token (padding dropped), and None for
    log-probs. An empty ``contexts`` list gives ``([], None)``. The model runs in eval mode under no_grad and
    its train/eval mode is restored afterwards.

    ``stop_strings`` / ``stop_token_ids``: also end a row there (pass the engine protocol's ``stop_strings`` and
    ``stop_token_ids``, e.g. ``("</python>",)`` for the tag protocol), so a tool turn does not decode the whole
    remaining budget only for the engine to cut it at the closing tag. They stop decoding only (they are not eos
    ids: the returned rows are cut at eos as before, padding after an early stop dropped), so the engine sees the
    same ids up to the stop.
    """
    import torch

    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    criteria = stopping_criteria(tokenizer, tuple(stop_strings), stop_token_ids)

    def generate_fn(contexts: list[list[int]], num_generations: int, budget: int) -> tuple[list[list[int]], None]:
        if not contexts:
            return [], None
        limit = budget if max_new_tokens is None else min(budget, max_new_tokens)
        if limit <= 0:
            return [[] for _ in contexts], None
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
            if temperature > 0
            else {"do_sample": False}
        )
        was_training = model.training
        model.eval()
        out: list[list[int]] = []
        try:
            step = batch_size or len(contexts)
            for begin in range(0, len(contexts), step):
                chunk = contexts[begin : begin + step]
                width = max(len(c) for c in chunk)
                input_ids = torch.tensor([[pad_id] * (width - len(c)) + list(c) for c in chunk], device=model.device)
                attention_mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=model.device)
                with torch.no_grad():
                    sequences = model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        max_new_tokens=limit,
                        pad_token_id=pad_id,
                        eos_token_id=sorted(eos_ids),
                        use_cache=True,  # transformers' Trainer writes use_cache=False into model.config
                        stopping_criteria=criteria,
                        **sampling,
                    )
                for row in sequences[:, width:].tolist():
                    cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
                    if criteria is not None and cut == len(row):  # a row stopped early is padded after its stop
                        row = strip_stop_padding(row, pad_id)
                    out.append(row[:cut])
        finally:
            model.train(was_training)
        return out, None

    return generate_fn
