"""`APPOTrainer`: APPO inside TRL's GRPO loop. This module orchestrates; every formula lives in `trl_appo.core`.

How one step flows (docs/algorithm.md §1-§4), and which TRL hook carries it:

* Roots. `_generate_and_score_completions` keeps the N root slots of each prompt's M and calls `super()` on them
  with the group size temporarily N. TRL then generates through our rollout engine (passed to TRL as its
  `rollout_func`: multi-turn, tools, model-token mask), computes old/ref log-probs, rewards and the root
  advantages Â_i exactly as GRPO does (docs/algorithm.md §3: the root half of the dual groups *is* TRL's computation).
* Branches (`trl_appo.branching.branch_and_credit`, the APPO step read top to bottom): score the roots' model
  tokens with one no-grad forward of the current policy, pick branch points, continue each prefix through the same
  engine, reward the branches with the user's reward functions, turn root and branch rewards into per-token root
  advantages, and (`branch_loss="suffix"`) build loss rows of the branches' own tokens.
  - `per_generation`: right after the roots; the branch rows join the generation batch TRL then shuffles and splits.
  - `per_update` (paper): `_prepare_inputs` keeps each prompt's roots in one optimizer step and branches them
    just before that step, with the current weights, so Ω measures how the updates so far moved each suffix; the
    branch rows are shared out equally over that step's micro-batches.
* Loss. `_compute_loss` multiplies advantages by the future-aware weight (`core.future_kl_weights`) computed from
  the same forward pass TRL's loss uses (one forward: the log-probs are handed to `super()` through `HookHandoff`).

The step talks to the trainer through `TrainerPort` (the `trl_appo.port.StepPort` this module implements) and
returns what it produced; the hooks here write it where TRL reads it. Between hooks, data travels as TRL passes
it (the rollout engine's rollouts ride in the `rollout_func` output's extra fields), except where TRL leaves no
argument to carry it: `HookHandoff`, the one documented mailbox (see its docstring).

Deviations from the public release are listed in docs/algorithm.md §8 and docs; the ones this module owns: Ω compares
the current policy with the behaviour policy (never two computations of the same weights), entropies are full-
vocabulary, a branch's tool budget counts only its completion, and branch rows are never forwarded with a zero mask
(with branch_loss="none" they get no forward at all).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import trl
from packaging.version import Version
from transformers import TrainerCallback
from transformers.utils import logging
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from . import batch_rows, branching, core, records
from .budget import BudgetMeter, rollout_spend
from .branching import StepOutput, StepSettings, whitespace_token_table
from .config import APPOConfig
from .rollout.build import build_engine, completions_for_rewards, executed_tool_calls
from .rollout.stopping import generate_stopping_at, stopping_criteria, strip_stop_padding
from .step_metrics import budget_metrics, late_fork_frac, rollout_metrics

logger = logging.get_logger(__name__)

APPO_SETTINGS_FILE = "appo_settings.json"
"""Written next to saved weights by `APPOTrainer._save`; read by `trl-appo eval` for its defaults."""

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


class HookHandoff:
    """The one channel between TRL hooks that TRL gives no argument for: a value one hook puts and the next takes.

    Three values travel this way, each put and taken within one call into TRL:

    * ``"root_rewards"``: `_calculate_rewards` → `_generate_and_score_completions`. TRL computes the roots'
      (rows, reward functions) rewards inside `super()._generate_and_score_completions` and returns only their
      advantages; the APPO step needs the rewards themselves (its dual groups normalise roots and branches).
    * ``"loss_logps"``: `_compute_loss` → `_get_per_token_logps_and_entropies`. The future-aware weight needs the
      loss's own forward; TRL's `_compute_loss` makes that forward itself, so the one we made is handed to it
      instead of a second forward.
    * ``"online_forks"``: `_appo_rollout` → `_generate_and_score_completions` (``branch_schedule="online"``). The
      branches forked while TRL's `rollout_func` generated the roots; TRL keeps only the roots' fields.

    A `put` replaces an unread value; `take` returns it once (None when there is none).
    """

    def __init__(self):
        self._values: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self._values[key] = value

    def take(self, key: str) -> Any:
        return self._values.pop(key, None)


class PreparedBatch:
    """A loss micro-batch `APPOTrainer.training_step` already took from the generation buffer: `_prepare_inputs`
    returns its rows as they are (one of the sub-batches of an oversize micro-batch, rollout_budget='tokens')."""

    def __init__(self, rows: dict[str, Any]):
        self.rows = rows


class TrainerPort:
    """`trl_appo.port.StepPort` for `APPOTrainer`: what the APPO step may use of the trainer, and nothing else."""

    def __init__(self, trainer: APPOTrainer):
        self._trainer = trainer

    @property
    def device(self) -> torch.device:
        return self._trainer.accelerator.device

    @property
    def rank(self) -> int:
        return self._trainer.accelerator.process_index

    @property
    def pad_token_id(self) -> int:
        return self._trainer._tokenizer.pad_token_id

    @property
    def eos_token_ids(self):
        return self._trainer.eos_token_ids

    @property
    def reward_weights(self) -> torch.Tensor:
        return self._trainer.reward_weights

    @property
    def generator(self) -> torch.Generator:
        return self._trainer._appo_generator

    @property
    def global_step(self) -> int:
        return self._trainer.state.global_step

    @property
    def tokenizer(self):
        return self._trainer._tokenizer

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._trainer.accelerator.gather(tensor)

    def policy_logps(self, input_ids, attention_mask, logits_to_keep, compute_entropy=False):
        return self._trainer._policy_logps(input_ids, attention_mask, logits_to_keep, compute_entropy=compute_entropy)

    def reference_logps(self, input_ids, attention_mask, logits_to_keep):
        return self._trainer._reference_logps(input_ids, attention_mask, logits_to_keep)

    def omega_reference_logps(self, rows, input_ids, attention_mask, logits_to_keep, logp_current):
        return self._trainer._omega_reference_logps(rows, input_ids, attention_mask, logits_to_keep, logp_current)

    def whitespace_table(self) -> torch.Tensor:
        return self._trainer._whitespace_table(self.device)

    def fork_environments(self, inputs):
        return self._trainer._branch_environments(inputs)

    def rollout(self, prompt_ids, prefixes, sessions=None):
        with self._trainer._appo_spending("seconds_generate"):
            return self._trainer._appo_engine.run(prompt_ids, prefixes=prefixes, group_size=1, sessions=sessions)

    def branch_rewards(self, inputs, prompts, completions, completion_ids):
        with self._trainer._appo_spending("seconds_reward"):
            return self._trainer._branch_rewards(inputs, prompts, completions, completion_ids)


class _BudgetClock(TrainerCallback):
    """Opens and closes `APPOTrainer`'s budget accounting around each optimizer step (`trl_appo.budget`)."""

    def __init__(self, trainer: APPOTrainer):
        self._trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self._trainer._appo_budget.start_step()

    def on_step_end(self, args, state, control, **kwargs):
        metrics = self._trainer._metrics["train"]
        for name, value in self._trainer._appo_budget.end_step().items():
            if "/total_" in name:  # cumulative, like TRL's num_tokens: the latest value
                metrics[name] = [value]
            else:  # this step's spend: TRL averages it over the steps of a logging window
                metrics[name].append(value)


class APPOTrainer(GRPOTrainer):
    """GRPOTrainer with APPO's branched rollouts, dual-group prefix credit and future-aware loss weights.

    Drop-in: same constructor as [`~trl.GRPOTrainer`]. `tools` are executed by trl_appo's rollout engine with the
    protocol chosen by `args.tool_protocol` ('chat': the chat template's tool calls, 'tags': the paper's
    `<python>`/`<search>` tags); they may be plain typed, documented functions or `trl_appo.tools.Tool` objects.
    `environment_factory` works as in TRL (validated by TRL, one instance per rollout, environment-owned rewards);
    a branch forks its root's environment by replaying the prefix's tool calls into a fresh instance, which assumes
    a deterministic environment (`trl_appo.rollout.environments`; `replayable = False` on the class trains without
    branching). `rollout_func` is not supported: APPO owns the rollout.
    """

    _tag_names = ["trl", "appo"]
    _name = "APPO"
    _appo_early_stop = True  # stop generate at the protocol's stops (`_protocol_stops`); False: eos only, as TRL
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
        self._appo_tools = list(tools or [])
        self._appo_env = None  # TrainerEnvironments when environment_factory is given
        self._appo_engine = None
        self._appo_handoff = HookHandoff()
        self._appo_whitespace = None
        self._appo_generator = torch.Generator().manual_seed(args.seed)
        self._appo_branch_step = 0
        self._appo_sampled_at_step = 0
        self._appo_window = None  # (first micro-step, loss batches) of the current optimizer step (per_update)
        self._appo_logged_rows = 0  # rows ever appended to TRL's completions table (roots and branches, all ranks)
        self._appo_budget = BudgetMeter()  # what each optimizer step spends (trl_appo.budget)

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
                environment_factory=environment_factory,  # TRL validates it and runs reset/get_reward as for GRPO
            )
        if environment_factory is not None:
            self._setup_environments()
        if args.omega_reference == "reference" and core.uses_omega(args.branch_criterion):
            if self.ref_model is None and not self._is_peft_model():
                raise ValueError(
                    "omega_reference='reference' measures Ω against the reference model, but there is none: set "
                    "beta > 0 (loads a reference model) or train a PEFT adapter (reference = adapters disabled)."
                )
        self.appo_settings = StepSettings.from_config(args)  # APPO's options, read once
        # rollout_budget='tokens' trains N·(1+B) > M rows per prompt: micro-batches hold more than
        # per_device_train_batch_size rows and `training_step` splits them into forwards of at most that many.
        self._appo_split_micro_batches = args.rollout_budget == "tokens" and args.branching
        if self._appo_split_micro_batches and self.is_deepspeed_enabled:
            raise ValueError(
                "rollout_budget='tokens' trains a micro-batch in several backward passes, which DeepSpeed's own "
                "gradient accumulation counts as micro-steps: use rollout_budget='rollouts' with DeepSpeed."
            )
        self.add_callback(_BudgetClock(self))
        self._appo_port = TrainerPort(self)
        self._appo_engine = self._build_engine()
        if args.branching and args.branch_schedule == "online":
            if self._appo_env is not None:
                raise ValueError(
                    "branch_schedule='online' forks rollouts mid-generation, which environment_factory's instances "
                    "cannot follow yet: use branch_schedule='per_generation' with environments."
                )
            if not len(self._appo_engine.tools):
                raise ValueError(
                    "branch_schedule='online' forks each branch after a tool result of its root, and this run has "
                    "no tools: pass tools=[...] or use branch_schedule='per_generation'."
                )
        for note in args.appo_notes:  # defaults APPO chose for this config, said once
            logger.warning(note)
        if self._appo_tools:
            from .tools import describe_isolation

            isolation = describe_isolation(self._appo_tools)  # the sandbox level actually achieved, said once
            (logger.warning if "isolation=none" in isolation else logger.info)(f"APPO tools: {isolation}")

    # ------------------------------------------------------------------ setup
    def _setup_environments(self) -> None:
        """After TRL's constructor validated `environment_factory`: APPO's engine runs the environments' tools.
        An environment that cannot be replayed cannot be forked: the run trains without branching (as GRPO, so
        future_kl is off too, as with branch_criterion='none'), said in one warning line."""
        from .rollout.environments import TrainerEnvironments

        if self.args.tool_protocol != "chat":
            raise ValueError(
                "environment_factory needs tool_protocol='chat' (environment methods are called with the chat "
                f"template's tool calls), got tool_protocol={self.args.tool_protocol!r}."
            )
        self._appo_env = TrainerEnvironments(self, self._appo_tools)
        args = self.args
        if args.branching and not self._appo_env.forkable:
            logger.warning(self._appo_env.fallback_warning())
            args.num_roots, args.num_branches = args.num_generations, 0  # APPOConfig.branching is now False
            args.future_kl = False

    def _is_peft_model(self) -> bool:
        return hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter")

    def _build_engine(self):
        """The rollout engine of roots and branches (`trl_appo.rollout.build_engine`: evaluation uses the same)."""
        args = self.args
        tokenizer = self._tokenizer
        tools = self._appo_tools + (self._appo_env.tools if self._appo_env is not None else [])
        if args.tool_protocol == "chat":
            if tools and getattr(tokenizer, "response_template", None) is None and getattr(
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
        return build_engine(
            self._engine_generate, tokenizer, tools, protocol=args.tool_protocol,
            max_completion_length=args.max_completion_length, max_tool_calls=args.max_tool_calls,
            eos_token_ids=self.eos_token_ids, chat_template_kwargs=self.chat_template_kwargs,
            tool_timeout=args.tool_timeout, max_tool_output_chars=args.max_tool_output_chars,
            max_tool_calls_per_turn=args.max_tool_calls_per_turn,
            max_concurrent_tool_calls=args.max_concurrent_tool_calls,
            on_malformed_tool_call=args.on_malformed_tool_call,
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
        with self._max_new_tokens(gen_config, max_new_tokens), self._protocol_stops() as stopping:
            ids, logprobs = self._generate_single_turn(contexts, None, {}, num_generations)
        if stopping and self._tokenizer.pad_token_id not in set(self.eos_token_ids):
            ids = [strip_stop_padding(row, self._tokenizer.pad_token_id) for row in ids]
        return ids, logprobs

    @contextlib.contextmanager
    def _protocol_stops(self):
        """The transformers `generate` path also stops each row at the engine protocol's stops (`</python>`, ...).

        TRL's generate call stops at eos only, so a tool turn would decode the whole remaining budget and the engine
        would cut it at the closing tag (`trl_appo.rollout.stopping`). Yields whether criteria were added. vLLM and
        transformers' continuous batching keep their own stop handling (untouched); the stops are never eos ids,
        so TRL's eos trimming and masks are unchanged.
        """
        engine = getattr(self, "_appo_engine", None)
        if (not self._appo_early_stop or engine is None or self.use_vllm
                or getattr(self, "use_transformers_continuous_batching", False)):
            yield False
            return
        if getattr(self, "_appo_stopping", None) is None:
            protocol = engine.protocol  # eos ids already end generate; only the protocol's other stops are added
            self._appo_stopping = stopping_criteria(
                protocol.tokenizer, protocol.stop_strings, set(protocol.stop_token_ids) - set(self.eos_token_ids)
            ) or ()
        model = self.accelerator.unwrap_model(self.model_wrapped)
        with generate_stopping_at(model, self._appo_stopping):
            yield bool(self._appo_stopping)

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
        if self._appo_env is None:
            prompt_ids, sessions = self._appo_engine.tokenize_prompts(prompts), None
        else:  # TRL has created and reset one environment instance per row (`self.environments`)
            prompt_ids = self._appo_env.tokenize_prompts(self._appo_engine.protocol, prompts)
            sessions = self._appo_env.root_sessions()
        with self._appo_spending("seconds_generate"):
            if self._branching and self.args.branch_schedule == "online":
                rollouts = self._online_tree(prompt_ids, group)
            else:
                rollouts = self._appo_engine.run(prompt_ids, group_size=group, sessions=sessions)
        self._log_rollout_metrics(rollouts, mode, prefix="appo/root")
        self._count_spend(rollouts, "roots")
        logprobs = None if any(r.logprobs is None for r in rollouts) else [r.logprobs for r in rollouts]
        return {
            "prompt_ids": [r.prompt_ids for r in rollouts],
            "completion_ids": [r.completion_ids for r in rollouts],
            "logprobs": logprobs,
            "env_mask": [r.model_mask for r in rollouts],
            "appo_rollouts": rollouts,  # an extra field: `_generate` takes it back out before TRL sees it
        }

    def _online_tree(self, prompt_ids: list, group: int) -> list:
        """branch_schedule='online': the roots, with B branches each forked after the root's k-th tool result (k
        uniform in 1..max_tool_calls) in the same generate calls (`RolloutEngine.run_tree`). The forks wait in the
        handoff, one list per root row, until `_generate_and_score` adds them to the batch for the step."""
        args = self.args
        draws = torch.randint(1, args.max_tool_calls + 1, (len(prompt_ids), args.num_branches),
                              generator=self._appo_port.generator)
        roots, forks = self._appo_engine.run_tree(prompt_ids, draws.tolist(), group_size=group,
                                                  min_room=args.min_branch_tokens)
        per_root: list[list] = [[] for _ in roots]
        for fork in forks:
            per_root[fork.root].append(fork)
        self._appo_handoff.put("online_forks", per_root)
        # Forks whose root ended before their k-th result start at its last one, in generate calls of their own:
        # a high share means max_tool_calls is well above the calls rollouts make (all ranks).
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["appo/branch_late_frac"].append(
            late_fork_frac(forks, self.accelerator.gather, self.accelerator.device))
        return roots

    def _generate(self, prompts: list):
        # TRL parses a rollout_func's completion as a single assistant turn; reward functions must see the engine's
        # multi-turn messages (assistant/tool turns, or the full tag-protocol text) instead. The rollouts come back
        # in the extra fields of `_appo_rollout`'s output, removed here so that they never reach reward kwargs.
        # The engine has executed every tool call (environments' methods included, which TRL lists in `self.tools`):
        # TRL's own tool loop must not run again on the engine's output.
        trl_tools, self.tools = self.tools, []
        try:
            (prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images,
             tool_images) = super()._generate(prompts)
        finally:
            self.tools = trl_tools
        rollouts = extra_fields.pop("appo_rollouts", None)
        if rollouts is not None:
            completions = completions_for_rewards(prompts, rollouts)
            # Reward functions get each row's executed tool calls as the keyword `executed_tool_calls`
            # (trl_appo.rewards); TRL merges extra fields into the reward inputs row by row.
            extra_fields["executed_tool_calls"] = executed_tool_calls(rollouts)
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    def _log_rollout_metrics(self, rollouts, mode: str, prefix: str) -> None:
        """Tool use and decoded tokens (a branch's copied prefix is not decoded), summed over all ranks."""
        metrics = rollout_metrics(rollouts, self.accelerator.gather, self.accelerator.device, prefix,
                                  with_tools=bool(len(self._appo_engine.tools)))
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)

    # ------------------------------------------------------------------ budget accounting (trl_appo.budget)
    def _appo_spending(self, kind: str, remainder: bool = False):
        """Count the block's seconds as ``kind`` of this optimizer step (``remainder``: only the seconds not
        counted inside it); evaluation is not counted."""
        if not self.model.training:
            return contextlib.nullcontext()
        meter = self._appo_budget
        return meter.remainder(kind) if remainder else meter.timed(kind)

    def _count_spend(self, rollouts, kind: str) -> None:
        """Add the decoded model tokens and tool calls of `rollouts` (``kind``: "roots" or "branches", all ranks)."""
        if not self.model.training:
            return
        decoded, calls = rollout_spend(rollouts, self.accelerator.gather, self.accelerator.device)
        self._appo_budget.add(f"decoded_tokens_{kind}", decoded)
        self._appo_budget.add(f"tool_calls_{kind}", calls)

    # ------------------------------------------------------------------ rewards
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self._appo_spending("seconds_reward"):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._appo_handoff.put("root_rewards", rewards)  # gathered (R_all, F); taken right after super() returns
        return rewards

    # ------------------------------------------------------------------ the APPO step
    @property
    def _branching(self) -> bool:
        args = self.args
        if not args.branching:
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
        # What this hook spends beyond generating and rewarding (old/ref log-probs, APPO's scoring) is scoring.
        with self._appo_spending("seconds_score", remainder=True):
            return self._generate_and_score(inputs)

    def _generate_and_score(self, inputs):
        if not self._branching:
            return super()._generate_and_score_completions(inputs)
        args = self.args
        M, N = (self.num_generations if self.model.training else self.num_generations_eval), args.num_roots
        if len(inputs) % M:
            raise RuntimeError(f"Expected whole groups of M={M} rows on each rank, got {len(inputs)} rows.")
        root_inputs = [row for j, row in enumerate(inputs) if j % M < N]
        with self._group_size(N):
            out = super()._generate_and_score_completions(root_inputs)
        rewards = self._appo_handoff.take("root_rewards")
        R = len(root_inputs)
        rank = self.accelerator.process_index
        out["appo_root_rewards"] = rewards[rank * R : (rank + 1) * R].to(out["advantages"].device)
        out["appo_root_advantages"] = out["advantages"]
        out["appo_group"] = torch.arange(R, device=out["advantages"].device) // N
        out["appo_inputs"] = [copy.copy(row) for row in root_inputs]
        if args.branch_schedule == "online":
            out["appo_forks"] = self._appo_handoff.take("online_forks")
        if self.log_completions:  # TRL just added these roots to its completions table: mark them
            out["appo_log_index"] = self._mark_logged_roots(R)
        self._appo_sampled_at_step = self.state.global_step
        if args.branch_schedule in ("per_generation", "online") or not self.model.training:
            step = self._appo_step(out, for_loss=self.model.training)
            out.pop("appo_forks", None)  # the branches' rollouts are the step's now
            out["advantages"] = step.advantages
            if step.branch_rows is not None:
                # The generation batch now holds all M rollouts per prompt; TRL shuffles and splits it as for GRPO.
                num_items = out["num_items_in_batch"]
                out = batch_rows.append_rows(out, step.branch_rows, self._tokenizer.pad_token_id)
                out["num_items_in_batch"] = num_items + self.accelerator.gather(
                    batch_rows.loss_tokens(step.branch_rows).reshape(1)).sum()
        return out

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's training step; under rollout_budget='tokens' a micro-batch of more than per_device_train_batch_size
        rows is trained as sub-batches of at most that many, each through `super().training_step`, its loss scaled
        (`batch_rows.loss_sub_batches`, the ``appo_loss_scale`` column) so the summed gradient is the whole
        micro-batch's for every TRL loss_type."""
        if not self._appo_split_micro_batches:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()  # as TRL's step does before `_prepare_inputs`, which reads the mode
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        parts = batch_rows.loss_sub_batches(self._prepare_inputs(inputs), self.args.per_device_train_batch_size,
                                            self.loss_type)
        step, times = self._step, self._metrics["train"]["step_time"]
        total = None
        for i, part in enumerate(parts):
            self._step = step  # TRL counts micro-batches (its buffer index): this one once, however it is split
            logged = len(times)
            last = i == len(parts) - 1
            # Gradients are reduced across ranks once, on the micro-batch's last backward (a no-op on one process).
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, PreparedBatch(part), num_items_in_batch)
            total = loss if total is None else total + loss
            if not last and len(times) > logged:  # the optimizer step's time is logged once, at its end
                self._current_train_step_time = times.pop()
        return total

    def _prepare_inputs(self, generation_batch):
        if isinstance(generation_batch, PreparedBatch):
            return generation_batch.rows
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
        if self._step % ga == 0 or regenerate or self._appo_window is None:
            # Branch the roots of this optimizer step's micro-batches together, with the current weights.
            first = k - (k % ga)
            chunks = self._buffered_inputs[first : first + ga]
            merged = batch_rows.cat_rows(chunks)
            step = self._appo_step(merged, for_loss=True)
            offset = 0
            for chunk in chunks:
                n = chunk["advantages"].shape[0]
                chunk["advantages"] = step.advantages[offset : offset + n]
                offset += n
            window = list(chunks)
            if step.branch_rows is not None:
                # Each micro-batch gets an equal share of the branch rows, so a forward holds
                # per_device_train_batch_size rows, as in GRPO; DAPO-style normalisers count this window's tokens.
                parts = batch_rows.split_rows(step.branch_rows, ga)
                window = [batch_rows.append_rows(c, b, self._tokenizer.pad_token_id) for c, b in zip(chunks, parts)]
                tokens = sum(batch_rows.loss_tokens(w) for w in window)
                window_items = self.accelerator.gather(tokens.reshape(1)).sum() * args.steps_per_generation / ga
                for w in window:
                    w["num_items_in_batch"] = window_items
            self._appo_window = (first, window)
        first, window = self._appo_window
        return window[k - first]

    def _regroup_buffer(self) -> None:
        """Re-split the buffered generation batch so each prompt's roots fall in one optimizer step.

        TRL shuffles rows across the whole generation batch; per_update branching needs a prompt's N roots
        together (their branch group is normalised jointly), so we shuffle whole groups instead.
        """
        merged = batch_rows.cat_rows(self._buffered_inputs)
        groups = merged["appo_group"]
        order = torch.randperm(int(groups.max().item()) + 1)
        rank_of_group = torch.empty_like(order)
        rank_of_group[order] = torch.arange(len(order))
        index = torch.argsort(rank_of_group[groups.cpu()] * len(groups) + torch.arange(len(groups)), stable=True)
        self._buffered_inputs = split_tensor_dict(batch_rows.take_rows(merged, index), self.args.steps_per_generation)
        self._appo_window = None

    def _appo_step(self, batch: dict[str, Any], for_loss: bool) -> StepOutput:
        """Run the APPO step (`trl_appo.branching`) and write what it reports where it belongs: `appo/*` metrics,
        the branches' tool use, TRL's completions table, the branch-tree file. The caller writes the advantages
        and branch rows into its batch."""
        args = self.args
        mode = "train" if self.model.training else "eval"
        want = args.log_branch_trees and self.accelerator.is_main_process and self.model.training
        with self._appo_spending("seconds_score", remainder=True):
            step = branching.branch_and_credit(batch, self._appo_port, self.appo_settings, for_loss=for_loss,
                                               want_records=want)
        report = step.report
        self._count_spend(report.branches, "branches")
        metrics = {**report.metrics, **budget_metrics(
            batch, report.branches, trained_branches=step.branch_rows is not None, num_roots=args.num_roots,
            gather=self.accelerator.gather, device=self.accelerator.device)}
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        self._log_rollout_metrics(report.branches, mode, prefix="appo/branch")
        if self.log_completions:
            self._log_branch_completions(report.completions)
        if want:
            name = f"step_{self.state.global_step:06d}_{self._appo_branch_step:04d}.jsonl"
            records.write_branch_trees(Path(args.output_dir) / "branch_trees" / name, report.records)
            self._appo_branch_step += 1
        return step

    def _mark_logged_roots(self, num_local_rows: int) -> torch.Tensor:
        """TRL has just added this batch's roots (all ranks, in rank order) to its completions table: mark them as
        roots and return each local row's position in that table, so its advantage can show the trained credit
        later."""
        logs, procs = self._logs, self.accelerator.num_processes
        added = num_local_rows * procs
        logs["extra"]["appo_row"].extend(["root"] * added)
        logs["extra"]["appo_point"].extend([-1] * added)
        start = self._appo_logged_rows + self.accelerator.process_index * num_local_rows
        self._appo_logged_rows += added
        return torch.arange(start, start + num_local_rows, device=self.accelerator.device)

    def _log_branch_completions(self, table: branching.BranchCompletions) -> None:
        """Add the branches to TRL's completions table (``appo_row="branch"``, ``appo_point`` = its point, its
        reward and the advantage it is trained with, or Â_b when branches only give credit), and show each root's
        trained credit (the mean of A_{i,t} over its model tokens) in the roots' ``advantage`` column."""
        from accelerate.utils import gather_object

        logs, gather = self._logs, self.accelerator.gather
        total_before = self._appo_logged_rows
        if table.root_log_index is not None:  # the roots' rows, where they are still in the (bounded) table
            mean_credit = table.root_credit_mean
            pairs = gather(torch.stack([table.root_log_index.to(mean_credit.device).float(), mean_credit.float()],
                                       dim=1))
            offset = total_before - len(logs["advantages"])
            for i, value in pairs.tolist():
                pos = int(i) - offset
                if 0 <= pos < len(logs["advantages"]):
                    logs["advantages"][pos] = value
        g_prompts, g_completions = gather_object(list(table.prompts)), gather_object(list(table.completions))
        n = len(g_prompts)
        logs["prompt"].extend(g_prompts)
        logs["completion"].extend(g_completions)
        for i, name in enumerate(self.reward_func_names):
            logs["rewards"][name].extend(table.rewards[:, i].tolist())
        logs["advantages"].extend(gather(table.advantages.float()).tolist())
        points = gather(table.positions.to(self.accelerator.device)).tolist()
        for column, values in logs["extra"].items():
            if column == "appo_row":
                values.extend(["branch"] * n)
            elif column == "appo_point":
                values.extend(points)
            else:  # a column the user's reward functions log for roots (branch values are kept out of the table)
                values.extend([None] * n)
        self._appo_logged_rows += n

    def _branch_rewards(self, inputs, prompts, completions, completion_ids):
        """The user's reward functions on branch rows. What they log through `log_extra`/`log_metric` is kept out
        of TRL's completions table (which lists the roots) and reported as `appo/branch/<name>` instead."""
        mode = "train" if self.model.training else "eval"
        saved = self._pending_extra_logs, self._pending_metrics
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        try:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids)
        finally:
            branch_metrics = self._pending_metrics
            self._pending_extra_logs, self._pending_metrics = saved
            for name, values in branch_metrics.items():
                if values:
                    self._metrics[mode][f"appo/branch/{name}"].append(sum(values) / len(values))

    @contextlib.contextmanager
    def _branch_environments(self, rows: list[dict]):
        """(session keys, prompts) for branches of these roots' rows (`TrainerPort.fork_environments`): forked
        environments when there are any (`rollout.environments`; `self.environments` lists them until the block
        ends), else (None, the rows' prompts)."""
        if self._appo_env is None:
            yield None, [row["prompt"] for row in rows]
            return
        with self._appo_env.branches(rows) as forked:
            yield forked

    @contextlib.contextmanager
    def _no_grad_forward(self):
        from trl.models.utils import disable_gradient_checkpointing

        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            yield

    def _policy_logps(self, input_ids, attention_mask, C, compute_entropy: bool = False):
        """No-grad log-probs (and full-vocabulary entropies) of the current policy, TRL's forward in chunks."""
        with self._no_grad_forward():
            logps, entropy, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, C, batch_size=self.args.per_device_train_batch_size,
                compute_entropy=compute_entropy,
            )
        return logps, entropy

    def _reference_logps(self, input_ids, attention_mask, C):
        """Log-probs of the reference model, found as TRL finds it (ref model, or the PEFT base / "ref" adapter)."""
        if self.ref_model is not None:
            model_ctx, model = contextlib.nullcontext(), self.ref_model
        else:
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in getattr(unwrapped, "peft_config", {}) else None
            model_ctx, model = use_adapter(unwrapped, adapter_name=name), self.model
        with model_ctx, self._no_grad_forward():
            ref, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, C, batch_size=self.args.per_device_train_batch_size
            )
        return ref

    def _omega_reference_logps(self, rows, input_ids, attention_mask, C, logp_current):
        """log π_ref_Ω of the sampled tokens (paper §3.1). Degenerate (= current) when the policy has not moved."""
        if self.args.omega_reference == "behaviour":
            old = rows.get("old_per_token_logps")
            # No optimizer step since sampling (per_generation, or the first step of a generation batch): the
            # behaviour policy *is* the current one, so Ω is degenerate by construction and BS falls back to
            # entropy. Decided structurally, never by comparing two computations of the same weights (their
            # numerical noise would pass for signal: a defect of the public release, see README).
            moved = self.state.global_step != getattr(self, "_appo_sampled_at_step", self.state.global_step)
            return old if (old is not None and moved) else logp_current
        ref = rows.get("ref_per_token_logps")
        return ref if ref is not None else self._reference_logps(input_ids, attention_mask, C)


    def _whitespace_table(self, device) -> torch.Tensor:
        """(V,) bool: token decodes to whitespace only (never a branch point, docs/algorithm.md §1)."""
        if self._appo_whitespace is None:
            vocab = self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size
            self._appo_whitespace = whitespace_token_table(self._tokenizer, vocab)
        return self._appo_whitespace.to(device)

    # ------------------------------------------------------------------ loss (docs/algorithm.md §4)
    def _compute_loss(self, model, inputs):
        loss = self._future_aware_loss(model, inputs)
        scale = inputs.get("appo_loss_scale")  # a sub-batch's share of its micro-batch (`training_step`)
        return loss if scale is None else loss * scale

    def _future_aware_loss(self, model, inputs):
        advantages = inputs["advantages"]
        settings = self.appo_settings
        if not settings.future_kl:
            return super()._compute_loss(model, inputs)
        old = inputs.get("old_per_token_logps")
        mask = inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
        if old is None:
            # π_θ = π_old exactly (no off-policy lag): δ ≡ 0, f ≡ 1, a constant multiplier; no extra work.
            logp = torch.zeros_like(mask, dtype=torch.float32)
            weights = core.future_kl_weights(logp, logp, mask.float(), advantages, **settings.future_kl_kwargs())
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
            out[0].detach().float(), old.float(), mask.float(), advantages, **settings.future_kl_kwargs()
        )
        self._appo_handoff.put("loss_logps", out)  # taken by the very next `_get_per_token_logps_and_entropies`
        try:
            return super()._compute_loss(model, {**inputs, "advantages": self._reweight(advantages, weights, mask)})
        finally:
            self._appo_handoff.take("loss_logps")

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
        cached = self._appo_handoff.take("loss_logps")  # the forward `_compute_loss` already made
        if cached is not None:
            return cached
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(
                {"generator": self._appo_generator.get_state(), "branch_step": self._appo_branch_step,
                 "budget_totals": dict(self._appo_budget.totals)},
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
                self._appo_budget.totals.update(state.get("budget_totals", {}))

    def _base_model_description(self) -> str:
        """The base model's hub id or path, or, for a model passed as an object built in code, what it is."""
        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", "") if config is not None else ""
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            name = name or getattr(model.get_base_model().config, "_name_or_path", "")
        if name:
            return f"`{name}`"
        params = sum(p.numel() for p in model.parameters())
        kind = getattr(config, "model_type", type(model).__name__)
        return f"a `{kind}` model passed as an object ({type(model).__name__}, {params:,} parameters, no hub id)"

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """TRL's save, plus `appo_settings.json` beside the weights: the rollout settings the model was trained with,
        which `trl-appo eval` uses as its defaults (e.g. max_completion_length)."""
        super()._save(output_dir, state_dict=state_dict)
        a = self.args
        settings = {"max_completion_length": a.max_completion_length, "tool_protocol": a.tool_protocol,
                    "max_tool_calls": a.max_tool_calls, "temperature": a.temperature}
        Path(output_dir or a.output_dir, APPO_SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        a = self.args
        path = Path(a.output_dir) / "README.md"
        if path.exists() and self.accelerator.is_main_process:
            settings = (
                f"\n\n## APPO settings\n\nBase model: {self._base_model_description()}.\n\n"
                f"Trained with APPO (Agentic Procedural Policy Optimization, arXiv 2606.12384) via `trl_appo`: "
                + (f"M={a.num_generations} rollouts per prompt = N={a.num_roots} roots × (1 + B={a.num_branches} "
                   "branches)." if a.rollout_budget == "rollouts" else
                   f"a budget of M={a.num_generations} rollouts' worth of decoded tokens per prompt spent on "
                   f"N={a.num_roots} roots and N·B={a.num_roots * a.num_branches} branches, every leaf trained "
                   "(rollout_budget='tokens').") + "\n\n" + "\n".join(self.appo_settings.describe()) + "\n"
            )
            text = path.read_text()
            if "## APPO settings" not in text:
                path.write_text(text + settings)
