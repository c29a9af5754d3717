"""`APPOTrainer`: APPO inside TRL's GRPO loop. This module orchestrates; every formula lives in `trl_appo.core`.

How one step flows (APPO_SPEC §1-§4), and which TRL hook carries it:

* Roots. `_generate_and_score_completions` keeps the N root slots of each prompt's M and calls `super()` on them
  with the group size temporarily N. TRL then generates through our rollout engine (passed to TRL as its
  `rollout_func`: multi-turn, tools, model-token mask), computes old/ref log-probs, rewards and the root
  advantages Â_i exactly as GRPO does (spec §3: the root half of the dual groups *is* TRL's computation).
* Branches. `_branch_and_credit` scores the roots' model tokens with one no-grad forward of the current policy
  (full-vocabulary entropy and log-probs), picks branch points (`core.select_branch_points`), continues each
  prefix through the same engine (same tools, stop rules, budget), rewards the branches with the user's reward
  functions, and turns root and branch rewards into per-token root advantages (`core.dual_group_advantages`,
  `core.branch_credit`). Branch rows never enter the policy's forward or backward pass.
  - `per_generation`: right after the roots.
  - `per_update` (paper): `_prepare_inputs` keeps each prompt's roots in one optimizer step and branches them
    just before that step, with the current weights, so Ω measures how the updates so far moved each suffix.
* Loss. `_compute_loss` multiplies advantages by the future-aware weight (`core.future_kl_weights`) computed from
  the same forward pass TRL's loss uses (one forward: the log-probs are handed to `super()` through a one-shot
  cache in `_get_per_token_logps_and_entropies`).

Deviations from the public release are listed in APPO_SPEC §8 and docs; the ones this module owns: Ω compares
the current policy with the behaviour policy (never two computations of the same weights), entropies are full-
vocabulary, a branch's tool budget counts only its completion, and branch rows get no forward/backward pass.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import trl
from packaging.version import Version
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from . import core
from .config import APPOConfig

TESTED_TRL = (Version("1.16.0"), Version("1.17.0"))  # [low, high)
_APPO_STATE_FILE = "appo_state.pt"


def _check_trl_version() -> None:
    v = Version(trl.__version__.split("+")[0])
    if not (TESTED_TRL[0] <= v < TESTED_TRL[1]) and os.environ.get("TRL_APPO_ALLOW_UNTESTED_TRL") != "1":
        raise RuntimeError(
            f"trl_appo was tested with trl>={TESTED_TRL[0]},<{TESTED_TRL[1]} but trl {trl.__version__} is installed. "
            "APPOTrainer overrides private GRPOTrainer hooks whose signatures change between minor versions. Install "
            f"'trl>={TESTED_TRL[0]},<{TESTED_TRL[1]}', or set TRL_APPO_ALLOW_UNTESTED_TRL=1 to try anyway."
        )


def _cat_rows(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-row values of several TRL batch dicts (tensors along dim 0, lists by extension)."""
    out = {}
    for key, first in chunks[0].items():
        if first is None:
            out[key] = None
        elif isinstance(first, torch.Tensor) and first.ndim == 0:
            out[key] = first
        elif isinstance(first, torch.Tensor):
            out[key] = torch.cat([c[key] for c in chunks], dim=0)
        else:
            out[key] = [x for c in chunks for x in c[key]]
    return out


def _take_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Select rows of a TRL batch dict (0-d tensors and None pass through)."""
    out = {}
    for key, val in batch.items():
        if val is None or (isinstance(val, torch.Tensor) and val.ndim == 0):
            out[key] = val
        elif isinstance(val, torch.Tensor):
            out[key] = val[index.to(val.device)]
        else:
            out[key] = [val[i] for i in index.tolist()]
    return out


class APPOTrainer(GRPOTrainer):
    """GRPOTrainer with APPO's branched rollouts, dual-group prefix credit and future-aware loss weights.

    Drop-in: same constructor as [`~trl.GRPOTrainer`]. `tools` are executed by trl_appo's rollout engine with the
    protocol chosen by `args.tool_protocol` ('chat': the chat template's tool calls, 'tags': the paper's
    `<python>`/`<search>` tags); they may be plain typed, documented functions or `trl_appo.tools.Tool` objects.
    `rollout_func` and `environment_factory` are not supported: APPO owns the rollout, and stateful environments
    cannot be forked at a branch point.
    """

    _tag_names = ["trl", "appo"]
    _name = "APPO"
    _paper = {
        "title": "APPO: Agentic Procedural Policy Optimization",
        "id": "2606.12384",
        "citation": "@article{appo2026, title={Agentic Procedural Policy Optimization}, year={2026}, "
        "eprint={2606.12384}, archivePrefix={arXiv}}",
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: APPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        _check_trl_version()
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = APPOConfig(f"{str(name).split('/')[-1]}-APPO")
        elif not isinstance(args, APPOConfig):
            raise TypeError(
                f"APPOTrainer needs an APPOConfig, got {type(args).__name__}. Build one with the same fields: "
                "APPOConfig(**grpo_config.to_dict()) plus the APPO fields."
            )
        if rollout_func is not None:
            raise ValueError(
                "APPOTrainer owns the rollout (roots and branches share its tool loop), so `rollout_func` is not "
                "supported. Pass tools with `tools=` (and args.tool_protocol), or use GRPOTrainer."
            )
        if environment_factory is not None:
            raise ValueError(
                "`environment_factory` is not supported: a stateful environment cannot be forked at a branch point. "
                "Pass stateless tools with `tools=` (functions or trl_appo.tools.Tool objects)."
            )
        self._appo_tools = list(tools or [])
        self._appo_engine = None
        self._appo_last_rollouts = None
        self._appo_cached_logps = None
        self._appo_root_rewards = None
        self._appo_whitespace = None
        self._appo_generator = torch.Generator().manual_seed(args.seed)
        self._appo_branch_step = 0
        self._appo_sampled_at_step = 0

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are using 'rollout_func'")
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                rollout_func=lambda prompts, trainer: trainer._appo_rollout(prompts),
            )
        if args.omega_reference == "reference" and args.branch_criterion == "bs":
            if self.ref_model is None and not self._is_peft_model():
                raise ValueError(
                    "omega_reference='reference' measures Ω against the reference model, but there is none: set "
                    "beta > 0 (loads a reference model) or train a PEFT adapter (reference = adapters disabled)."
                )
        self._appo_engine = self._build_engine()

    # ------------------------------------------------------------------ setup
    def _is_peft_model(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter")

    def _build_engine(self):
        from .rollout import ChatTemplateProtocol, RolloutEngine, TagProtocol
        from .tools import ToolRegistry

        args = self.args
        tokenizer = self._tokenizer
        if args.tool_protocol == "chat":
            if self._appo_tools and getattr(tokenizer, "response_template", None) is None and getattr(
                tokenizer, "response_schema", None
            ) is None:
                from trl.chat_template_utils import add_response_schema

                try:
                    add_response_schema(tokenizer)
                except ValueError as e:
                    raise ValueError(
                        f"{e} The 'chat' tool protocol parses tool calls with the tokenizer's response template. Set "
                        "tokenizer.response_template (see TRL's chat_template_utils), use a chat template TRL "
                        "knows, or use tool_protocol='tags'."
                    ) from e
        registry = ToolRegistry(self._appo_tools, timeout=args.tool_timeout, max_output_chars=args.max_tool_output_chars)
        if args.tool_protocol == "chat":
            protocol = ChatTemplateProtocol(tokenizer, chat_template_kwargs=self.chat_template_kwargs)
        else:
            # The paper's tags stop generation even when that tool is not registered, so the model is told so.
            tags = dict.fromkeys(("python", "search", *registry.names))
            protocol = TagProtocol(tokenizer, tags=tuple(tags), chat_template_kwargs=self.chat_template_kwargs)
        # Every end-of-sequence id TRL stops at also ends a model run for the engine.
        protocol.stop_token_ids = frozenset(protocol.stop_token_ids) | frozenset(self.eos_token_ids)
        return RolloutEngine(
            self._engine_generate,
            tokenizer,
            protocol,
            registry,
            max_completion_length=args.max_completion_length,
            max_tool_calls=args.max_tool_calls,
            should_continue=self._engine_should_continue if self.accelerator.num_processes > 1 else None,
        )

    # ------------------------------------------------------------------ generation backend for the engine
    @property
    def _collective_generation(self) -> bool:
        """Backends where every rank must make the same generation calls (vLLM server, sharded weights)."""
        if self.accelerator.num_processes == 1:
            return False
        if self.use_vllm and self.args.vllm_mode == "server":
            return True
        return self.is_deepspeed_enabled or self.is_fsdp_enabled

    def _engine_should_continue(self, local_active: bool) -> bool:
        flag = torch.tensor([1.0 if local_active else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).max().item() > 0)

    def _engine_generate(self, contexts: list[list[int]], num_generations: int, max_new_tokens: int):
        """Adapter from the engine's GenerateFn to TRL's `_generate_single_turn` (vLLM or transformers)."""
        if not contexts:
            if not self._collective_generation:
                return [], None
            # An idle rank still takes part in the collective call, with one throwaway row.
            self._generate_single_turn([[self._tokenizer.pad_token_id]], None, {}, 1)
            return [], None
        gen_config = getattr(self, "generation_config", None)
        with self._max_new_tokens(gen_config, max_new_tokens):
            ids, logprobs = self._generate_single_turn(contexts, None, {}, num_generations)
        return ids, logprobs

    @contextlib.contextmanager
    def _max_new_tokens(self, gen_config, max_new_tokens: int):
        # Branches continue long prefixes: asking the transformers backend for fewer tokens saves decode time.
        if gen_config is None or self.use_vllm or max_new_tokens <= 0:
            yield
            return
        old = gen_config.max_new_tokens
        gen_config.max_new_tokens = min(old or max_new_tokens, max_new_tokens)
        try:
            yield
        finally:
            gen_config.max_new_tokens = old

    def _appo_rollout(self, prompts: list) -> dict:
        """TRL `rollout_func`: roots (or eval samples) through the engine; rows come in groups of identical prompts."""
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        prompt_ids = self._appo_engine.tokenize_prompts(prompts)
        rollouts = self._appo_engine.run(prompt_ids, group_size=group)
        self._appo_last_rollouts = rollouts
        self._log_rollout_metrics(rollouts, mode, prefix="appo/root")
        logprobs = None if any(r.logprobs is None for r in rollouts) else [r.logprobs for r in rollouts]
        return {
            "prompt_ids": [r.prompt_ids for r in rollouts],
            "completion_ids": [r.completion_ids for r in rollouts],
            "logprobs": logprobs,
            "env_mask": [r.model_mask for r in rollouts],
        }

    def _generate(self, prompts: list):
        # TRL parses a rollout_func's completion as a single assistant turn; reward functions must see the engine's
        # multi-turn messages (assistant/tool turns, or the full tag-protocol text) instead.
        out = list(super()._generate(prompts))
        if self._appo_last_rollouts is not None:
            out[3] = self._completions_for_rewards(prompts, self._appo_last_rollouts)
            self._appo_last_rollouts = None
        return tuple(out)

    @staticmethod
    def _completions_for_rewards(prompts, rollouts):
        from trl.data_utils import is_conversational

        if prompts and is_conversational({"prompt": prompts[0]}):
            return [r.messages for r in rollouts]
        return [r.text for r in rollouts]

    def _log_rollout_metrics(self, rollouts, mode: str, prefix: str) -> None:
        """Tool use and decoded tokens (a branch's copied prefix is not decoded), summed over all ranks."""
        local = torch.tensor(
            [
                float(len(rollouts)),
                float(sum(r.tool_stats.calls for r in rollouts)),
                float(sum(r.tool_stats.failures for r in rollouts)),
                float(sum(sum(r.model_mask[r.prefix_length :]) for r in rollouts)),
            ],
            device=self.accelerator.device,
        )
        n, calls, fails, decoded = self.accelerator.gather(local.unsqueeze(0)).sum(dim=0).tolist()
        if n == 0:
            return
        self._metrics[mode][f"{prefix}/tool_calls_per_rollout"].append(calls / n)
        self._metrics[mode][f"{prefix}/tool_failure_rate"].append(fails / calls if calls else 0.0)
        self._metrics[mode][f"{prefix}/decoded_tokens"].append(decoded)

    # ------------------------------------------------------------------ rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._appo_root_rewards = rewards  # gathered (rows of all ranks, F); read right after super() returns
        return rewards

    # ------------------------------------------------------------------ the APPO step
    @property
    def _branching(self) -> bool:
        args = self.args
        if args.branch_criterion == "none":
            return False
        return self.model.training or args.branch_in_eval

    @contextlib.contextmanager
    def _group_size(self, n: int):
        saved = self.num_generations, self.num_generations_eval
        self.num_generations = self.num_generations_eval = n
        try:
            yield
        finally:
            self.num_generations, self.num_generations_eval = saved

    def _generate_and_score_completions(self, inputs):
        if not self._branching:
            return super()._generate_and_score_completions(inputs)
        args = self.args
        M, N = (self.num_generations if self.model.training else self.num_generations_eval), args.num_roots
        if len(inputs) % M:
            raise RuntimeError(f"Expected whole groups of M={M} rows on each rank, got {len(inputs)} rows.")
        root_inputs = [row for j, row in enumerate(inputs) if j % M < N]
        with self._group_size(N):
            out = super()._generate_and_score_completions(root_inputs)
        rewards = self._appo_root_rewards
        R = len(root_inputs)
        rank = self.accelerator.process_index
        out["appo_root_rewards"] = rewards[rank * R : (rank + 1) * R].to(out["advantages"].device)
        out["appo_root_advantages"] = out["advantages"]
        out["appo_group"] = torch.arange(R, device=out["advantages"].device) // N
        out["appo_inputs"] = [copy.copy(row) for row in root_inputs]
        self._appo_sampled_at_step = self.state.global_step
        if args.branch_schedule == "per_generation" or not self.model.training:
            self._branch_and_credit(out)
        return out

    def _prepare_inputs(self, generation_batch):
        args = self.args
        if not (self.model.training and self._branching and args.branch_schedule == "per_update"):
            return super()._prepare_inputs(generation_batch)
        generate_every = args.steps_per_generation * self.num_iterations
        regenerate = self._step % generate_every == 0 or self._buffered_inputs is None
        super()._prepare_inputs(generation_batch)
        if regenerate:
            self._regroup_buffer()
        ga = args.gradient_accumulation_steps
        k = self._step % args.steps_per_generation
        if self._step % ga == 0 or regenerate:
            first = k - (k % ga)
            chunks = self._buffered_inputs[first : first + ga]
            merged = _cat_rows(chunks)
            self._branch_and_credit(merged)
            offset = 0
            for chunk in chunks:
                n = chunk["advantages"].shape[0]
                chunk["advantages"] = merged["advantages"][offset : offset + n]
                offset += n
        return self._buffered_inputs[k]

    def _regroup_buffer(self) -> None:
        """Re-split the buffered generation batch so each prompt's roots fall in one optimizer step.

        TRL shuffles rows across the whole generation batch; per_update branching needs a prompt's N roots
        together (their branch group is normalised jointly), so we shuffle whole groups instead.
        """
        merged = _cat_rows(self._buffered_inputs)
        groups = merged["appo_group"]
        order = torch.randperm(int(groups.max().item()) + 1)
        rank_of_group = torch.empty_like(order)
        rank_of_group[order] = torch.arange(len(order))
        index = torch.argsort(rank_of_group[groups.cpu()] * len(groups) + torch.arange(len(groups)), stable=True)
        self._buffered_inputs = split_tensor_dict(_take_rows(merged, index), self.args.steps_per_generation)

    @torch.no_grad()
    def _branch_and_credit(self, batch: dict[str, Any]) -> None:
        """Branch the roots in `batch` and write per-token root advantages into `batch['advantages']` (in place).

        `batch` holds whole prompt groups of N roots (rows of one group contiguous after sorting by `appo_group`).
        """
        args = self.args
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        t0 = time.perf_counter()
        # Sort rows by group so groups are contiguous, and undo the permutation at the end.
        order = torch.argsort(batch["appo_group"].cpu(), stable=True)
        rows = _take_rows(batch, order)
        N, B = args.num_roots, args.num_branches

        # 1. Score the roots' model tokens with the current policy (spec §1).
        prompt_ids, prompt_mask = rows["prompt_ids"], rows["prompt_mask"]
        completion_ids, completion_mask = rows["completion_ids"], rows["completion_mask"]
        model_mask = completion_mask * rows["tool_mask"] if rows.get("tool_mask") is not None else completion_mask
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        C = completion_ids.size(1)
        with self._no_grad_forward():
            logp_current, entropy, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, C, batch_size=args.per_device_train_batch_size,
                compute_entropy=True,
            )
        logp_reference = self._omega_reference_logps(rows, input_ids, attention_mask, C, logp_current)
        mask_f = model_mask.float()
        bs = core.branching_score(
            entropy.float() * mask_f, logp_current.float() * mask_f, logp_reference.float() * mask_f, mask_f,
            gamma=args.branch_gamma, omega_clip=args.omega_clip,
        )
        lengths = completion_mask.sum(dim=1)
        candidates = core.branch_candidates(
            model_mask.bool(), lengths, args.max_completion_length, args.min_branch_tokens,
            whitespace_mask=self._whitespace_table(device)[completion_ids] & completion_mask.bool(),
        )
        pts = core.select_branch_points(
            bs, candidates, B, criterion=args.branch_criterion, pooled=args.branch_selection == "pooled",
            group_size=N, min_distance=args.branch_min_distance, generator=self._appo_generator, entropy=entropy,
        )
        t_score = time.perf_counter()

        # 2. Continue each prefix through the same engine (spec §2).
        from .rollout import Prefix

        sampling = rows.get("sampling_per_token_logps")
        p_ids = [prompt_ids[i][prompt_mask[i].bool()].tolist() for i in range(len(prompt_ids))]
        c_ids = [completion_ids[i][: lengths[i]].tolist() for i in range(len(completion_ids))]
        c_mask = [model_mask[i][: lengths[i]].tolist() for i in range(len(completion_ids))]
        c_logp = None if sampling is None else [sampling[i][: lengths[i]].tolist() for i in range(len(c_ids))]
        branch_prompt_ids, prefixes = [], []
        for r, s in zip(pts.root.tolist(), pts.position.tolist(), strict=True):
            branch_prompt_ids.append(p_ids[r])
            if s < 0:
                prefixes.append(None)  # no eligible token: resample from the prompt (no shared prefix)
            else:
                prefixes.append(
                    Prefix(c_ids[r][: s + 1], c_mask[r][: s + 1], None if c_logp is None else c_logp[r][: s + 1])
                )
        branches = self._appo_engine.run(branch_prompt_ids, prefixes=prefixes, group_size=1)
        t_gen = time.perf_counter()

        # 3. Reward the branches with the user's reward functions, on the full trajectory (prefix + continuation).
        root_rows = rows["appo_inputs"]
        branch_inputs = [copy.copy(root_rows[r]) for r in pts.root.tolist()]
        branch_prompts = [row["prompt"] for row in branch_inputs]
        completions = self._completions_for_rewards(branch_prompts, branches)
        branch_rewards = self._branch_rewards(
            mode, branch_inputs, branch_prompts, completions, [b.completion_ids for b in branches]
        )  # gathered across ranks

        # 4. Credit (spec §3): dual groups over the gathered batch, then this rank's slice.
        root_rewards = self.accelerator.gather(rows["appo_root_rewards"].to(device))
        weights = self.reward_weights.to(device)
        root_adv_all, branch_adv_all = core.dual_group_advantages(
            root_rewards, branch_rewards.to(device), weights, N, N * B,
            scale_rewards=self.scale_rewards, dual_groups=args.dual_groups,
            multi_objective_aggregation=self.multi_objective_aggregation,
        )
        rank, R, P = self.accelerator.process_index, len(root_rows), len(branches)
        root_adv = root_adv_all[rank * R : (rank + 1) * R]
        branch_adv = branch_adv_all[rank * P : (rank + 1) * P]
        credit = core.branch_credit(
            root_adv, branch_adv, pts.root.to(device), pts.position.to(device), pts.score.to(device),
            model_mask.to(device), rho=args.reward_scale_discount, lam=args.procedure_scale_weight,
            prefix_credit=args.prefix_credit, procedure_scale=args.procedure_scale,
        )
        advantages = torch.empty_like(credit)
        advantages[order.to(device)] = credit
        batch["advantages"] = advantages

        self._log_branch_metrics(
            mode, rows, bs, pts, branches, branch_rewards, root_rewards, weights, credit, model_mask, c_ids,
            timings=(t_score - t0, t_gen - t_score, time.perf_counter() - t_gen),
        )
        if args.log_branch_trees and self.accelerator.is_main_process and mode == "train":
            self._write_branch_trees(rows, bs, pts, branches, branch_rewards, c_ids, c_mask)

    def _branch_rewards(self, mode, inputs, prompts, completions, completion_ids):
        """The user's reward functions on branch rows. What they log through `log_extra`/`log_metric` is kept out
        of TRL's completions table (which lists the roots) and reported as `appo/branch/<name>` instead."""
        saved = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        try:
            return self._calculate_rewards(inputs, prompts, completions, completion_ids)
        finally:
            branch_metrics = self._pending_metrics
            self._pending_extra_logs, self._pending_metrics = saved
            for name, values in branch_metrics.items():
                if values:
                    self._metrics[mode][f"appo/branch/{name}"].append(sum(values) / len(values))

    @contextlib.contextmanager
    def _no_grad_forward(self):
        from trl.models.utils import disable_gradient_checkpointing

        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            yield

    def _omega_reference_logps(self, rows, input_ids, attention_mask, C, logp_current):
        """log π_ref_Ω of the sampled tokens (spec §1). Degenerate (= current) when the policy has not moved."""
        if self.args.branch_criterion != "bs":
            return logp_current
        if self.args.omega_reference == "behaviour":
            old = rows.get("old_per_token_logps")
            # No optimizer step since sampling (per_generation, or the first step of a generation batch): the
            # behaviour policy *is* the current one, so Ω is degenerate by construction and BS falls back to
            # entropy. Decided structurally, never by comparing two computations of the same weights (their
            # numerical noise would pass for signal: the public release's defect, spec §8.2).
            moved = self.state.global_step != getattr(self, "_appo_sampled_at_step", self.state.global_step)
            return old if (old is not None and moved) else logp_current
        ref = rows.get("ref_per_token_logps")
        if ref is not None:
            return ref
        if self.ref_model is not None:
            model_ctx, model = contextlib.nullcontext(), self.ref_model
        else:
            model_ctx, model = self.accelerator.unwrap_model(self.model).disable_adapter(), self.model
        with model_ctx, self._no_grad_forward():
            ref, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, C, batch_size=self.args.per_device_train_batch_size
            )
        return ref

    def _whitespace_table(self, device) -> torch.Tensor:
        """(V,) bool: token decodes to whitespace only (never a branch point, spec §1)."""
        if self._appo_whitespace is None:
            tok = self._tokenizer
            vocab = max(len(tok), self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size)
            texts = tok.batch_decode([[i] for i in range(len(tok))])
            table = torch.zeros(vocab, dtype=torch.bool)
            table[: len(texts)] = torch.tensor([t.strip() == "" and t != "" for t in texts])
            self._appo_whitespace = table
        return self._appo_whitespace.to(device)

    # ------------------------------------------------------------------ loss (spec §4)
    def _compute_loss(self, model, inputs):
        args = self.args
        advantages = inputs["advantages"]
        if not args.future_kl:
            return super()._compute_loss(model, inputs)
        old = inputs.get("old_per_token_logps")
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        if old is None:
            # π_θ = π_old exactly (no off-policy lag): δ ≡ 0, f ≡ 1, a constant multiplier; no extra work.
            logp = torch.zeros_like(mask, dtype=torch.float32)
            weights = core.future_kl_weights(logp, logp, mask.float(), advantages, **self._future_kl_kwargs())
            return super()._compute_loss(model, {**inputs, "advantages": self._reweight(advantages, weights, mask)})
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mm_kwargs = {
            k: inputs.get(k)
            for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                      "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
        }
        out = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **mm_kwargs,
        )
        weights = core.future_kl_weights(
            out[0].detach().float(), old.float(), mask.float(), advantages, **self._future_kl_kwargs()
        )
        self._appo_cached_logps = out  # consumed by the very next `_get_per_token_logps_and_entropies` call
        try:
            return super()._compute_loss(model, {**inputs, "advantages": self._reweight(advantages, weights, mask)})
        finally:
            self._appo_cached_logps = None

    def _future_kl_kwargs(self) -> dict:
        a = self.args
        return dict(
            decay=a.future_kl_decay, clip=a.future_kl_clip, clip_high_only=a.future_kl_clip_high_only,
            weight=a.future_kl_weight, safety_thresh=a.future_kl_safety_thresh, dual_clip_c=a.delta or 3.0,
            form=a.future_kl_form,
        )

    def _reweight(self, advantages, weights, mask):
        mode = "train" if self.model.training else "eval"
        mult = weights.multiplier
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        on = mask.bool()
        stats = torch.stack([mult[on].mean(), mult[on].max()]) if on.any() else mult.new_ones(2)
        vals = self.accelerator.gather(stats.unsqueeze(0))
        self._metrics[mode]["appo/future_kl_weight_mean"].append(vals[:, 0].mean().item())
        self._metrics[mode]["appo/future_kl_weight_max"].append(vals[:, 1].max().item())
        return adv * mult.to(adv.dtype)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if self._appo_cached_logps is not None:
            out, self._appo_cached_logps = self._appo_cached_logps, None
            return out
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    # ------------------------------------------------------------------ metrics and artefacts
    def _log_branch_metrics(self, mode, rows, bs, pts, branches, branch_rewards, root_rewards, weights, credit,
                            model_mask, c_ids, timings):
        m = self._metrics[mode]
        gather = self.accelerator.gather
        pts = core.BranchPoints(*(x.cpu() for x in pts))
        device = self.accelerator.device
        R = len(c_ids)
        valid = pts.position >= 0
        lengths = model_mask.new_tensor([max(len(c), 1) for c in c_ids]).float().cpu()
        rel = (pts.position.float() / lengths[pts.root]).masked_fill(~valid, float("nan"))
        near_tool = torch.zeros_like(valid)
        mm = model_mask.cpu()
        for j, (r, s) in enumerate(zip(pts.root.tolist(), pts.position.tolist(), strict=True)):
            if s >= 0:
                lo, hi = max(0, s - 3), min(mm.shape[1], s + 4)
                near_tool[j] = bool((mm[r, lo:hi] == 0).any() and lo < int(lengths[r]))
        local = torch.tensor(
            [
                len(branches) / max(R, 1),
                torch.nanmean(rel).item() if valid.any() else float("nan"),
                near_tool[valid].float().mean().item() if valid.any() else float("nan"),
                (pts.fallback == 0).float().mean().item() if len(pts.fallback) else float("nan"),
                bs.degenerate.float().mean().item() if bs.degenerate.numel() else float("nan"),
                pts.score.abs()[valid].mean().item() if valid.any() else float("nan"),
                sum(sum(b.model_mask[b.prefix_length :]) for b in branches),
                float(sum(sum(x) for x in model_mask.tolist())),
                (pts.fallback == 4).float().mean().item() if len(pts.fallback) else float("nan"),
                (pts.fallback == 5).float().mean().item() if len(pts.fallback) else float("nan"),
            ],
            device=device,
        )
        g = gather(local.unsqueeze(0))
        names = ["branch_points_per_root", "branch_position_rel", "branch_near_tool_frac", "branch_strict_frac",
                 "omega_degenerate_frac", "bs_abs_mean"]
        if self.args.branch_criterion != "bs":  # Ω and BS are not computed for the entropy/random criteria
            names = names[:3]
        for i, name in enumerate(names):
            m[f"appo/{name}"].append(torch.nanmean(g[:, i]).item())
        m["appo/branch_decoded_tokens"].append(g[:, 6].sum().item())
        m["appo/root_model_tokens"].append(g[:, 7].sum().item())
        # Spec §1: duplicated points only when a root has fewer eligible tokens than B, and this is logged.
        m["appo/branch_duplicate_frac"].append(torch.nanmean(g[:, 8]).item())
        m["appo/branch_no_candidate_frac"].append(torch.nanmean(g[:, 9]).item())
        br = (branch_rewards.to(device) * weights.unsqueeze(0)).nansum(dim=1)
        rr = (root_rewards.to(device) * weights.unsqueeze(0)).nansum(dim=1)
        m["appo/branch_reward"].append(br.mean().item())
        m["appo/root_reward"].append(rr.mean().item())
        prefix_mag = credit.abs()[model_mask.bool()].mean() if model_mask.any() else credit.new_zeros(())
        m["appo/credit_abs_mean"].append(gather(prefix_mag.reshape(1)).mean().item())
        for name, secs in zip(("score", "generate", "reward"), timings, strict=True):
            m[f"appo/seconds_{name}_branches"].append(secs)
        self._log_rollout_metrics(branches, mode, prefix="appo/branch")

    def _write_branch_trees(self, rows, bs, pts, branches, branch_rewards, c_ids, c_mask) -> None:
        out_dir = Path(self.args.output_dir) / "branch_trees"
        out_dir.mkdir(parents=True, exist_ok=True)
        tok = self._tokenizer
        weights = self.reward_weights.cpu()
        root_rewards = (rows["appo_root_rewards"].cpu() * weights).nansum(dim=1)
        br = (branch_rewards[: len(branches)].cpu() * weights).nansum(dim=1)
        path = out_dir / f"step_{self.state.global_step:06d}_{self._appo_branch_step:04d}.jsonl"
        self._appo_branch_step += 1
        with open(path, "w") as f:
            for r in range(len(c_ids)):
                sel = (pts.root == r).nonzero().flatten().tolist()
                n = len(c_ids[r])
                f.write(json.dumps({
                    "step": self.state.global_step,
                    "group": int(rows["appo_group"][r]),
                    "tokens": tok.convert_ids_to_tokens(c_ids[r]),
                    "token_text": [tok.decode([t]) for t in c_ids[r]],
                    "model_mask": c_mask[r],
                    "entropy_z": bs.z_entropy[r, :n].tolist(),
                    "omega_z": bs.z_omega[r, :n].tolist(),
                    "bs": bs.scores[r, :n].tolist(),
                    "degenerate": bool(bs.degenerate[r]),
                    "reward": float(root_rewards[r]),
                    "branches": [
                        {"position": int(pts.position[j]), "strict": bool(pts.strict[j]),
                         "fallback": int(pts.fallback[j]), "score": float(pts.score[j]), "reward": float(br[j]),
                         "text": tok.decode(branches[j].completion_ids[branches[j].prefix_length :])}
                        for j in sel
                    ],
                }) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(
                {"generator": self._appo_generator.get_state(), "branch_step": self._appo_branch_step},
                os.path.join(folder, _APPO_STATE_FILE),
            )

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            path = os.path.join(checkpoint, _APPO_STATE_FILE)
            if os.path.exists(path):
                state = torch.load(path, weights_only=True)
                self._appo_generator.set_state(state["generator"])
                self._appo_branch_step = state["branch_step"]

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        a = self.args
        path = Path(a.output_dir) / "README.md"
        if path.exists() and self.accelerator.is_main_process:
            settings = (
                f"\n\n## APPO settings\n\nTrained with APPO (Agentic Procedural Policy Optimization, arXiv 2606.12384) "
                f"via `trl_appo`: M={a.num_generations} rollouts per prompt = N={a.num_roots} roots × (1 + "
                f"B={a.num_branches} branches); criterion `{a.branch_criterion}`, selection `{a.branch_selection}`, "
                f"schedule `{a.branch_schedule}`, Ω vs `{a.omega_reference}` (γ={a.branch_gamma}, ε_Ω={a.omega_clip}); "
                f"dual groups {a.dual_groups}, prefix credit {a.prefix_credit}, procedure scaling {a.procedure_scale} "
                f"(ρ={a.reward_scale_discount}, λ={a.procedure_scale_weight}); future-KL {a.future_kl} (form "
                f"`{a.future_kl_form}`, decay {a.future_kl_decay}, ε_f={a.future_kl_clip}, b={a.future_kl_weight}); "
                f"dual-clip c={a.delta}; tool protocol `{a.tool_protocol}`, max tool calls {a.max_tool_calls}.\n"
            )
            text = path.read_text()
            if "## APPO settings" not in text:
                path.write_text(text + settings)

