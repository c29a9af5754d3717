"""`APPOConfig`: GRPOConfig plus the APPO fields of docs/algorithm.md §1-§5, validated at construction.

Budget: `num_generations` is APPO's M rollouts per prompt, split into N roots (`num_roots`) and N·B branches
(`num_branches` = B per root), M = N·(1+B). `per_device_train_batch_size` counts rollout slots (roots and branches):
with `branch_loss="suffix"` (default) a micro-batch trains on that many rows, roots and branches, as GRPO does;
with the paper's `"none"` only its `per_device_train_batch_size · N / M` root rows.
With `rollout_budget="tokens"` (docs/algorithm.md §9) M is instead a budget of M full rollouts' worth of decoded
model tokens per prompt, spent on N roots and N·B branches (N·(1 + B·c) ≈ M, c = `expected_branch_cost`), every
leaf trained: a micro-batch then holds `per_device_train_batch_size · N(1+B) / M` rows, trained in forwards of at
most `per_device_train_batch_size` rows.

Any valid GRPOConfig shape is a valid APPOConfig shape, and a pure swap (GRPOConfig -> APPOConfig, same kwargs)
keeps every GRPOConfig default: `APPOConfig(**kw)` equals `APPOConfig.from_grpo(GRPOConfig(**kw))`. Only APPO's own
fields are derived from the shape (`default_split`, `branch_schedule`, `future_kl`), and each such choice is one line
in `appo_notes`, which the trainer logs once at start. The paper's settings (ε_high 0.28, dual-clip 3.0, M = 16,
...) are `APPOConfig.paper(**overrides)` and the shipped recipes. Where the paper and this project's benchmark
disagree, the APPO field's default is the benchmark's (README, Configuration). Every field's help text names its
section of docs/algorithm.md and the paper's symbol.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from . import core

BRANCH_SCHEDULES = ("per_update", "per_generation", "online")
BRANCH_SELECTIONS = ("per_root", "pooled")
OMEGA_REFERENCES = ("behaviour", "reference")
TOOL_PROTOCOLS = ("tags", "chat")
MALFORMED_CALL_POLICIES = ("end", "message")  # trl_appo.rollout.protocols.MALFORMED_CALL_POLICIES
BRANCH_LOSSES = ("none", "suffix")
BRANCH_POINT_TOKENS = ("keep", "resample")
ROLLOUT_BUDGETS = ("rollouts", "tokens")


@dataclass
class APPOConfig(GRPOConfig):
    r"""
    Configuration for [`APPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the APPO fields below.

    With `branch_criterion="none"` APPO is exactly GRPO on the same budget (M independent roots per prompt).
    """


    # ----- GRPOConfig fields with APPO help text; every default is GRPOConfig's (a pure swap changes nothing) -----
    num_generations: int | None = field(
        default=8,
        metadata={
            "help": "APPO budget M: rollouts per prompt, roots plus branches (M = N·(1+B)), or with "
            "rollout_budget='tokens' M full rollouts' worth of decoded model tokens (docs/algorithm.md §9). TRL's "
            "default 8; the paper uses 16."
        },
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper clip ε_high of the surrogate; None = epsilon, as in GRPOConfig. The paper uses 0.28 "
            "(docs/algorithm.md §4; set by `APPOConfig.paper()` and the recipes)."
        },
    )
    delta: float | None = field(
        default=None,
        metadata={
            "help": "Dual-clip constant c; None = off, as in GRPOConfig. The paper uses 3.0 (docs/algorithm.md §4; "
            "set by `APPOConfig.paper()` and the recipes). TRL's `delta` caps the ratio, which for negative "
            "advantages is exactly PPO dual-clip; tokens with log-ratio > ln c (ln 3 when None) are also excluded "
            "from FutureKL."
        },
    )

    # ----- budget split (docs/algorithm.md notation) -----
    num_roots: int | None = field(
        default=None,
        metadata={"help": "N, root ('initial') rollouts per prompt. Default: M / (1 + B). Paper's best: N=4 of M=16."},
    )
    num_branches: int | None = field(
        default=None,
        metadata={
            "help": "B, branch points per root (paper §3.1). Default: `default_split(M, per_device_train_batch_size)` "
            "(docs/config.md: the first B in DEFAULT_BRANCH_PREFERENCE that leaves N >= 2 whole roots per "
            "micro-batch; 0, i.e. no branching, with a warning when none does). 0 with branch_criterion='none'."
        },
    )
    rollout_budget: str = field(
        default="rollouts",
        metadata={
            "help": "What num_generations M buys (docs/algorithm.md §9, budget-matched trees). 'rollouts' (default): "
            "M rollouts per prompt, roots plus branches, M = N·(1+B). 'tokens': M full rollouts' worth of decoded "
            "model tokens per prompt; a root costs its model tokens, a branch only those after its point (about "
            "c = expected_branch_cost of a root), so N roots and N·B branches with N·(1 + B·c) ≈ M are generated "
            "and every leaf is trained (needs branch_loss='suffix'): a step trains N·(1+B) > M rows per prompt "
            "with GRPO's prompts per step and about its decoded tokens at M. Default split: B = 2, N = M/2 "
            "(1.5·M leaves at c = 0.5). Forwards never exceed per_device_train_batch_size rows."
        },
    )
    expected_branch_cost: float = field(
        default=0.5,
        metadata={
            "help": "c, the decoded model tokens of a branch as a fraction of a root's, used by "
            "rollout_budget='tokens' to fit N·(1 + B·c) = M (docs/algorithm.md §9). 0.5 = branch points spread "
            "uniformly; the project's learning benchmark measured 0.45-0.57. Compare with the logged "
            "`appo/branch_cost_fraction` and `appo/rollout_budget_spent`."
        },
    )
    branch_criterion: str = field(
        default="bs",
        metadata={
            "help": "Where to branch (docs/algorithm.md §1): 'bs' (Branching Score z(H)·z(Ω)), 'entropy' (z(H) only, "
            "ARPO-like), 'surprisal' (−log p of the sampled token), 'random' (uniform over candidates, seeded), "
            "'none' (no branching: M independent roots, i.e. GRPO on the same budget), or any rule registered with "
            "`core.register_branch_criterion` (e.g. a task's known first error, via `core.hint_ranking`)."
        },
    )
    branch_selection: str = field(
        default="per_root",
        metadata={
            "help": "'per_root': top-B points per root (paper). 'pooled': top-N·B points over all roots of a "
            "prompt (public release)."
        },
    )
    branch_allocation: str = field(
        default="uniform",
        metadata={
            "help": "How many branch points each prompt group gets, by name from `core.ALLOCATIONS` (a registered "
            "rule is valid too). 'uniform' (paper): B per root. 'need' (docs/algorithm.md §9, after DEEP-GRPO / "
            "DATPO): the same N·B per prompt on average, moved to prompts whose roots' rewards all agree (GRPO "
            "learns nothing from those) and, within a prompt, to its failed roots."
        },
    )
    branch_schedule: str | None = field(
        default=None,
        metadata={
            "help": "When branches are generated (paper §3.2). 'per_update' (paper): before each optimizer step "
            "with the current weights, so Ω carries the updates so far; needs steps_per_generation > "
            "gradient_accumulation_steps. 'per_generation' (public release): once, right after the roots. Default: "
            "'per_update' when the batch shape allows it (each prompt's roots in one optimizer step), else "
            "'per_generation', said once in the log. 'online' (docs/algorithm.md §9, after Tree-GRPO): each branch "
            "forks from its root right after a tool result (the k-th, k uniform in 1..max_tool_calls) while the roots "
            "are generated, so roots and branches share the generate calls and no scoring forward runs; needs "
            "branch_criterion='random', branch_allocation='uniform', max_tool_calls set and tools."
        },
    )
    omega_reference: str = field(
        default="behaviour",
        metadata={
            "help": "Policy π_ref_Ω that Ω is measured against (docs/algorithm.md §1): 'behaviour' (the policy that "
            "sampled the root) or 'reference' (the frozen reference model; needs beta > 0 or a PEFT model)."
        },
    )
    branch_gamma: float = field(
        default=1.0, metadata={"help": "γ, discount of the future log-ratio sum inside Ω (docs/algorithm.md §1). Default 1.0."}
    )
    omega_clip: float = field(
        default=0.2, metadata={"help": "ε_Ω: Ω is clipped to [1-ε_Ω, 1+ε_Ω] (docs/algorithm.md §1). Default 0.2."}
    )
    min_branch_tokens: int = field(
        default=16,
        metadata={
            "help": "A token is a branch candidate only if at least this many tokens of max_completion_length "
            "remain after it (docs/algorithm.md §1)."
        },
    )
    branch_min_distance: int = field(
        default=0, metadata={"help": "Minimum distance in tokens between two branch points of one root (0 = off)."}
    )

    branch_point_token: str = field(
        default="resample",
        metadata={
            "help": "What a branch does with the chosen token s: 'resample' (default: keep 0..s-1 and re-decide s "
            "itself; the prefix credit reaches s-1) or 'keep' (public release: keep 0..s, resample from s+1; "
            "credit reaches s). Chosen by benchmarks/learning.py: re-deciding the uncertain token learned most."
        },
    )
    branch_loss: str = field(
        default="suffix",
        metadata={
            "help": "Do branches enter the loss? 'suffix' (default, beyond the paper: each branch's own tokens after "
            "its point are trained like a root's, with its branch advantage and the same future-KL weight; the "
            "copied prefix never is; a step trains on all M rollouts per prompt, as GRPO does) or 'none' (the "
            "paper: branches only give credit to the roots' prefixes; each step trains on the N roots). Chosen by "
            "benchmarks/learning.py: 'none' learned least (README, Benchmarks)."
        },
    )
    branch_advantage: str = field(
        default="dual_group",
        metadata={
            "help": "Advantage of a branch's suffix rows (branch_loss='suffix'): 'dual_group' (Â_b, the branch-group "
            "advantage the paper uses for credit) or 'local' (the value of the fork: R_b minus the mean reward of "
            "the root and siblings sharing the branch's prefix, scaled like GRPO's). The roots' prefix credit "
            "always uses Â_b."
        },
    )

    # ----- credit assignment (docs/algorithm.md §3) -----
    dual_groups: bool = field(
        default=False,
        metadata={
            "help": "Normalise root and branch rewards in separate groups (paper, docs/algorithm.md §3: True) or in "
            "one group of the prompt's M rollouts (default False). Chosen by benchmarks/learning.py: with resampled "
            "branch tokens and branch rows in the loss, one group learned most and dual groups least."
        },
    )
    prefix_credit: bool = field(
        default=True,
        metadata={"help": "Add the mean advantage of branches sharing token t to root token t (docs/algorithm.md §3)."},
    )
    procedure_scale: bool = field(
        default=True,
        metadata={"help": "Scale per-token advantages by S = mean(1 + λ·BS⁺/max BS⁺·ρ^(s-t)) (docs/algorithm.md §3)."},
    )
    reward_scale_discount: float = field(
        default=0.9, metadata={"help": "ρ, distance discount of procedure-level scaling (docs/algorithm.md §3). Default 0.9."}
    )
    procedure_scale_weight: float = field(
        default=1.0, metadata={"help": "λ, weight of procedure-level scaling (docs/algorithm.md §3). Default 1.0."}
    )

    # ----- future-aware advantage (docs/algorithm.md §4) -----
    future_kl: bool | None = field(
        default=None,
        metadata={
            "help": "Apply the future-aware advantage weight at loss time (paper §3.4). Default: on when branching, "
            "off with branch_criterion='none', so that setting is exactly GRPO (the baseline)."
        },
    )
    future_kl_form: str = field(
        default="appo",
        metadata={"help": "'appo': Ã = A·(1 + b·f). 'fipo': Ã = A·f (docs/algorithm.md §4)."},
    )
    future_kl_decay: float = field(
        default=64.0, metadata={"help": "Half-life in tokens of the FutureKL discount, γ_F = 2^(-1/decay). 64."}
    )
    future_kl_clip: float = field(default=0.2, metadata={"help": "ε_f, clip of f = exp(FutureKL) (docs/algorithm.md §4)."})
    future_kl_clip_high_only: bool = field(
        default=True, metadata={"help": "Clip f to [1, 1+ε_f] (True, paper) or [1-ε_f, 1+ε_f] (docs/algorithm.md §4)."}
    )
    future_kl_weight: float = field(
        default=1.0,
        metadata={
            "help": "b in Ã = A·(1 + b·f) (docs/algorithm.md §4). With future_kl_normalize (default) the weight is "
            "divided by 1 + b, so it is 1 on-policy; unnormalised (the paper), b=1 with f ≥ 1 doubles every "
            "advantage relative to GRPO."
        },
    )
    future_kl_normalize: bool = field(
        default=True,
        metadata={
            "help": "Divide the future-KL multiplier by its on-policy value (1 + b for 'appo'), so on-policy (f = 1) "
            "Ã = A exactly, the loss keeps GRPO's scale (which max_grad_norm clipping makes matter even under "
            "Adam), and off-policy tokens keep the paper's relative weights (docs/algorithm.md §4). False = the "
            "paper's unnormalised form (in `APPOConfig.paper()`)."
        },
    )
    future_kl_safety_thresh: float = field(
        default=6.0,
        metadata={"help": "Where A < 0 and the token ratio exceeds this, f is capped at 1 (docs/algorithm.md §4)."},
    )

    # ----- rollouts and tools (docs/algorithm.md §2, §6) -----
    tool_protocol: str = field(
        default="chat",
        metadata={
            "help": "Tool-call protocol: 'chat' (the chat template's tool calls, as TRL) or 'tags' (the paper's "
            "<python>/<search> tags with <result> blocks, docs/algorithm.md §6)."
        },
    )
    max_tool_calls: int | None = field(
        default=None,
        metadata={
            "help": "Alias of TRL's `max_tool_calling_iterations` (one field, two names; setting both to different "
            "values is an error): the tool-call budget per rollout, counted over the completion only (a branch's "
            "prefix included, never the prompt). Paper: 3-6. None = unlimited."
        },
    )
    max_tool_calls_per_turn: int | None = field(
        default=8,
        metadata={
            "help": "Tool calls one model turn may run (a chat message can ask for many at once); the turn's further "
            "calls are answered with an error message the model sees and do not run. None = unlimited."
        },
    )
    on_malformed_tool_call: str = field(
        default="end",
        metadata={
            "help": "tool_protocol='chat', a tool call the response parser cannot read (bad JSON, no name): 'end' "
            "(default, as GRPOTrainer: the turn stands as text and the episode ends) or 'message' (the model is told "
            "with a tool error and gets another turn). Unknown tools and wrong arguments are always answered with an "
            "error, as in GRPOTrainer."
        },
    )
    max_concurrent_tool_calls: int | None = field(
        default=16,
        metadata={
            "help": "Tool calls running at the same time over the whole batch (each Python call is a sandbox with "
            "its own memory and process caps); further calls wait for a slot. None = unlimited."
        },
    )
    tool_timeout: float = field(default=30.0, metadata={"help": "Seconds before a tool call is abandoned."})
    max_tool_output_chars: int = field(
        default=4000, metadata={"help": "Tool output is truncated to this many characters before it is appended."}
    )
    branch_in_eval: bool = field(
        default=False, metadata={"help": "Branch during evaluation too (default: eval samples independent roots)."}
    )
    log_branch_trees: bool = field(
        default=False,
        metadata={
            "help": "Write each step's branch trees (root tokens, points, scores, branch rewards) as JSONL to "
            "<output_dir>/branch_trees/, for `trl-appo inspect` and the branch-point pictures."
        },
    )

    def __post_init__(self):
        # One line each about what APPO decided for the user; the trainer logs them once at start.
        self.appo_notes: list[str] = []
        user_set_gbs = self.generation_batch_size is not None
        user_set_spg = self.steps_per_generation is not None
        try:
            super().__post_init__()
        except ValueError as e:
            if "must be divisible by num_generations" not in str(e):
                raise
            raise ValueError(self._generation_batch_fix(user_set_gbs, user_set_spg)) from e
        self._validate_appo()

    def _generation_batch_fix(self, user_set_gbs: bool, user_set_spg: bool) -> str:
        """TRL's "generation_batch_size (12) must be divisible by num_generations (16)", in terms of the fields the
        user set, with values that work."""
        M, bs, gbs = self.num_generations, self.per_device_train_batch_size, self.generation_batch_size
        ga = self.gradient_accumulation_steps
        procs = max(1, gbs // (bs * self.steps_per_generation)) if self.steps_per_generation else 1
        if user_set_gbs:
            good = math.lcm(M, bs * procs)
            return (f"generation_batch_size={gbs} must be a multiple of num_generations={M} (whole groups of "
                    f"rollouts per prompt) and of per_device_train_batch_size·processes={bs * procs}: set "
                    f"generation_batch_size={good}, or num_generations to a divisor of {gbs}.")
        spg = self.steps_per_generation
        spg_fix = math.lcm(M // math.gcd(M, bs * procs), ga)
        bs_step = M // math.gcd(M, procs * spg)
        bs_fix = -(-bs // bs_step) * bs_step
        where = "per_device_train_batch_size·steps_per_generation" if procs == 1 else (
            f"per_device_train_batch_size·{procs} processes·steps_per_generation")
        unset = "" if user_set_spg else "; steps_per_generation unset = gradient_accumulation_steps, as in GRPOConfig"
        return (f"a generation batch of {where} = {gbs} rollouts ({bs}·{spg}{unset}) must hold whole groups of "
                f"num_generations={M}: set per_device_train_batch_size={bs_fix}, or steps_per_generation={spg_fix}, "
                f"or num_generations to a divisor of {gbs}.")

    @classmethod
    def from_grpo(cls, grpo_config: GRPOConfig, **appo_fields) -> APPOConfig:
        """An APPOConfig with every field of `grpo_config` (a GRPOConfig), overridden by `appo_fields`.

        Gives the same config as `APPOConfig(...)` with the kwargs that built `grpo_config`. TRL derives
        `generation_batch_size` from `steps_per_generation` (or the reverse), so only `steps_per_generation` is carried
        over (unless `appo_fields` sets `generation_batch_size`).
        """
        values = {f.name: getattr(grpo_config, f.name) for f in dataclasses.fields(GRPOConfig) if f.init}
        values.pop("generation_batch_size", None)
        if "generation_batch_size" in appo_fields:
            values.pop("steps_per_generation", None)
        values.update(appo_fields)
        return cls(**values)

    @classmethod
    def paper(cls, **overrides) -> APPOConfig:
        """The paper's settings (README, "Reproducing the paper's settings"; docs/algorithm.md §5), any field
        overridable: M = 16 = N 4 × (1 + B 3), branches give credit only (`branch_loss="none"`) and keep their point
        token, dual groups, BS criterion, per_update branching with 8 optimizer steps per generation batch, the
        unnormalised future-KL weight (b = 1), ε 0.2/0.28, dual-clip c = 3.0, KL 0, lr 1e-6 (full fine-tuning),
        temperature 1.0, the tag protocol and 4 tool calls per rollout. `per_device_train_batch_size` defaults to
        16 (one prompt's M rollouts per micro-batch)."""
        values = dict(PAPER_SETTINGS)
        values.update(overrides)
        if "steps_per_generation" not in overrides and "generation_batch_size" not in overrides:
            ga = values.get("gradient_accumulation_steps", 1)
            values["steps_per_generation"] = PAPER_OPTIMIZER_STEPS_PER_GENERATION * ga
        return cls(**values)

    # Validation lives in one place so every error names the fix.
    def _validate_appo(self) -> None:
        def check_choice(name, value, choices):
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}.")

        # Names come from the registries in `core` (a registered custom criterion or form is valid here too).
        check_choice("branch_criterion", self.branch_criterion, (*core.BRANCH_CRITERIA, core.NO_BRANCHING))
        check_choice("branch_selection", self.branch_selection, BRANCH_SELECTIONS)
        check_choice("branch_allocation", self.branch_allocation, tuple(core.ALLOCATIONS))
        check_choice("omega_reference", self.omega_reference, OMEGA_REFERENCES)
        check_choice("future_kl_form", self.future_kl_form, tuple(core.FUTURE_KL_FORMS))
        check_choice("tool_protocol", self.tool_protocol, TOOL_PROTOCOLS)
        check_choice("on_malformed_tool_call", self.on_malformed_tool_call, MALFORMED_CALL_POLICIES)
        check_choice("branch_loss", self.branch_loss, BRANCH_LOSSES)
        check_choice("branch_point_token", self.branch_point_token, BRANCH_POINT_TOKENS)
        check_choice("branch_advantage", self.branch_advantage, tuple(core.BRANCH_ADVANTAGES))
        check_choice("rollout_budget", self.rollout_budget, ROLLOUT_BUDGETS)

        self._check_scalars()
        M = self.num_generations
        if self.branch_criterion == core.NO_BRANCHING:
            if self.num_branches not in (None, 0) or self.num_roots not in (None, M):
                raise ValueError(
                    "branch_criterion='none' means M independent roots (GRPO on the same budget), but "
                    f"num_branches={self.num_branches} / num_roots={self.num_roots} were set. Remove them, or "
                    "choose a branching criterion ('bs', 'entropy', 'random')."
                )
            if self.branch_selection != "per_root" or self.branch_min_distance:
                raise ValueError(
                    "branch_criterion='none' does not branch; unset branch_selection / branch_min_distance."
                )
            self.num_branches, self.num_roots = 0, M
        elif self.rollout_budget == "tokens":
            self._split_token_budget()
        else:
            if self.num_branches is None and self.num_roots is None:
                self.num_roots, self.num_branches = default_split(M, self.per_device_train_batch_size)
                need = self.min_branch_tokens + 2
                if self.num_branches == 0:
                    self.appo_notes.append(
                        f"num_generations={M} with per_device_train_batch_size={self.per_device_train_batch_size} "
                        "leaves no split into N >= 2 roots with B >= 1 branches each: APPO runs without branching "
                        "(GRPO). Use num_generations >= 4 with a batch size divisible by 1 + B to branch."
                    )
                elif self.max_completion_length is not None and self.max_completion_length < need:
                    self.num_roots, self.num_branches = M, 0
                    self.appo_notes.append(
                        f"max_completion_length={self.max_completion_length} leaves no room to branch (a branch "
                        f"point needs min_branch_tokens={self.min_branch_tokens} tokens after it): APPO runs without "
                        f"branching (GRPO). Set max_completion_length >= {need} or lower min_branch_tokens to branch."
                    )
                else:
                    self.appo_notes.append(
                        f"num_branches unset: APPO splits num_generations={M} into N={self.num_roots} roots x "
                        f"(1 + B={self.num_branches}) branch per root (default_split); set num_branches to choose."
                    )
            elif self.num_branches is None:
                self.num_branches = M // self.num_roots - 1
            if self.num_branches < 1 and not (self.num_branches == 0 and self.num_roots == M):
                raise ValueError(f"num_branches must be >= 1 when branching (got {self.num_branches}).")
            if self.num_roots is None:
                if M % (1 + self.num_branches):
                    raise ValueError(
                        f"num_generations (M={M}) must equal num_roots·(1+num_branches); M is not divisible by "
                        f"1+B={1 + self.num_branches}. Set num_generations to a multiple of {1 + self.num_branches} "
                        "or set num_roots/num_branches explicitly."
                    )
                self.num_roots = M // (1 + self.num_branches)
            if self.num_roots * (1 + self.num_branches) != M:
                raise ValueError(
                    f"num_generations (M={M}) must equal num_roots·(1+num_branches) = {self.num_roots}·"
                    f"(1+{self.num_branches}) = {self.num_roots * (1 + self.num_branches)}. Set "
                    f"num_generations={self.num_roots * (1 + self.num_branches)} or change num_roots/num_branches."
                )
            if self.num_roots < 2:
                raise ValueError(
                    f"num_roots (N={self.num_roots}) must be >= 2: root advantages are normalised within the N "
                    "roots of a prompt. Increase num_generations or decrease num_branches."
                )
        if self.future_kl is None:
            self.future_kl = self.branching
        if self.branch_schedule is None:
            ga = self.gradient_accumulation_steps
            fits = self.steps_per_generation % ga == 0 and (self.per_device_train_batch_size * ga) % M == 0
            self.branch_schedule = "per_update" if fits or not self.branching else "per_generation"
            if not fits and self.branching:
                self.appo_notes.append(
                    "branch_schedule: per_update needs each prompt's roots in one optimizer step "
                    f"(per_device_train_batch_size·gradient_accumulation_steps a multiple of M={M}); this shape "
                    "is not, so APPO branches once per generation batch (per_generation)."
                )
        check_choice("branch_schedule", self.branch_schedule, BRANCH_SCHEDULES)
        if self.max_tool_calls is not None or self.max_tool_calling_iterations is not None:
            if None not in (self.max_tool_calls, self.max_tool_calling_iterations) and (
                    self.max_tool_calls != self.max_tool_calling_iterations):
                raise ValueError(
                    f"max_tool_calls={self.max_tool_calls} and max_tool_calling_iterations="
                    f"{self.max_tool_calling_iterations} name one budget; set only one of them."
                )
            limit = self.max_tool_calls if self.max_tool_calls is not None else self.max_tool_calling_iterations
            self.max_tool_calls = self.max_tool_calling_iterations = limit

        # Groups must be whole on each rank: branches are generated from sibling roots locally.
        local_rows = self.per_device_train_batch_size * self.steps_per_generation
        if local_rows % M:
            raise ValueError(
                f"The generation batch per rank (per_device_train_batch_size·steps_per_generation = "
                f"{self.per_device_train_batch_size}·{self.steps_per_generation} = {local_rows}) must be a multiple "
                f"of num_generations (M={M}) so each prompt's rollouts stay on one rank. Increase "
                "per_device_train_batch_size or steps_per_generation."
            )
        N = self.num_roots
        if (self.per_device_train_batch_size * N) % M:
            step = M // math.gcd(N, M)
            raise ValueError(
                f"Only the N={N} roots of every M={M} rollouts are trained on, so each micro-batch holds "
                f"per_device_train_batch_size·N/M = {self.per_device_train_batch_size}·{N}/{M} root rows, which must "
                f"be a whole number. Use a per_device_train_batch_size that is a multiple of {step}."
            )
        if self.branching and self.branch_schedule == "per_update":
            if self.steps_per_generation % self.gradient_accumulation_steps:
                raise ValueError(
                    "branch_schedule='per_update' branches before each optimizer step, so optimizer steps must not "
                    f"straddle generation batches: steps_per_generation ({self.steps_per_generation}) must be a "
                    f"multiple of gradient_accumulation_steps ({self.gradient_accumulation_steps})."
                )
            if (self.per_device_train_batch_size * self.gradient_accumulation_steps) % M:
                raise ValueError(
                    "branch_schedule='per_update' branches the roots of each optimizer step together, so a prompt's "
                    f"N roots must fall in one optimizer step: per_device_train_batch_size·gradient_accumulation_steps "
                    f"({self.per_device_train_batch_size}·{self.gradient_accumulation_steps}) must be a multiple of "
                    f"M={M}. Increase per_device_train_batch_size, or use branch_schedule='per_generation'."
                )
            if (self.steps_per_generation <= self.gradient_accumulation_steps and self.num_iterations == 1
                    and core.uses_omega(self.branch_criterion)):
                ga = self.gradient_accumulation_steps
                self.appo_notes.append(
                    f"steps_per_generation={self.steps_per_generation} (GRPO's default = gradient_accumulation_steps) "
                    "is one optimizer step per generation batch: the policy never moves between sampling and "
                    "branching, so Ω is degenerate and the Branching Score falls back to entropy. For a live Ω set "
                    f"steps_per_generation={4 * ga} (a multiple of gradient_accumulation_steps > 1; paper: 6-8 "
                    "optimizer steps per generation batch) or num_iterations > 1."
                )
        if self.branching and self.branch_schedule == "online":
            if self.branch_criterion != "random":
                raise ValueError(
                    f"branch_schedule='online' forks branches while the roots are generated, before any score "
                    f"exists, at tool results chosen at random: set branch_criterion='random' (got "
                    f"{self.branch_criterion!r}), or use branch_schedule='per_generation' for a scored criterion."
                )
            if self.branch_allocation != "uniform":
                raise ValueError(
                    f"branch_schedule='online' forks before the roots' rewards exist, so branch_allocation="
                    f"{self.branch_allocation!r} cannot place branches by them: use branch_allocation='uniform' or "
                    "branch_schedule='per_generation'."
                )
            if not self.max_tool_calls:
                raise ValueError(
                    "branch_schedule='online' forks after the root's k-th tool result, k uniform in 1..max_tool_calls: "
                    "set max_tool_calls (the most tool calls a rollout makes) to a positive number."
                )
        if self.branching:
            need = self.min_branch_tokens + 2
            if self.max_completion_length is not None and self.max_completion_length < need:
                raise ValueError(
                    f"max_completion_length={self.max_completion_length} leaves no room to branch: a branch point "
                    f"needs at least min_branch_tokens={self.min_branch_tokens} tokens of budget after it and a "
                    f"token before it. Increase max_completion_length to >= {need} or lower min_branch_tokens."
                )
        if self.branch_in_eval and self.branch_criterion != core.NO_BRANCHING and self.num_generations_eval not in (None, M):
            raise ValueError(
                f"branch_in_eval splits each eval prompt's num_generations_eval rollouts into N={self.num_roots} roots "
                f"and their branches, so num_generations_eval must equal num_generations (M={M}) or be unset."
            )
        if self.min_branch_tokens < 1:
            raise ValueError("min_branch_tokens must be >= 1 (a branch must be able to generate something).")
        if not 0 < self.reward_scale_discount <= 1:
            raise ValueError(f"reward_scale_discount (ρ) must be in (0, 1], got {self.reward_scale_discount}.")
        if self.future_kl_decay <= 0:
            raise ValueError(f"future_kl_decay must be > 0 tokens, got {self.future_kl_decay}.")
        if self.max_tool_calls is not None and self.max_tool_calls < 0:
            raise ValueError("max_tool_calls must be >= 0 or None (unlimited).")
        for name in ("max_tool_calls_per_turn", "max_concurrent_tool_calls"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None (unlimited), got {getattr(self, name)}.")

    @property
    def branching(self) -> bool:
        """Whether APPO branches at all (a criterion other than 'none' and B >= 1)."""
        return self.branch_criterion != core.NO_BRANCHING and self.num_branches != 0

    def _split_token_budget(self) -> None:
        """N and B under rollout_budget='tokens' (docs/algorithm.md §9): N·(1 + B·c) ≈ M, every leaf trained."""
        M, c, bs = self.num_generations, self.expected_branch_cost, self.per_device_train_batch_size
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ValueError(f"expected_branch_cost (c) must be in (0, 1], got {c!r}; 0.5 = points spread uniformly.")
        if self.branch_loss != "suffix":
            raise ValueError(
                "rollout_budget='tokens' spends the budget of M rollouts on more than M leaves, which only helps if "
                f"every leaf is trained, but branch_loss={self.branch_loss!r}: set branch_loss='suffix' (the "
                "default) or rollout_budget='rollouts'."
            )
        N, B = self.num_roots, self.num_branches
        if N is None and B is None:
            N, B = token_budget_split(M, bs, c)
            need = self.min_branch_tokens + 2
            if B == 0:
                self.appo_notes.append(
                    f"rollout_budget='tokens': num_generations={M} with per_device_train_batch_size={bs} leaves no "
                    "split into N >= 2 roots with B >= 1 branches each (per_device_train_batch_size·N/M whole): APPO "
                    "runs without branching (GRPO). Use an even num_generations >= 4 and an even batch size."
                )
            elif self.max_completion_length is not None and self.max_completion_length < need:
                N, B = M, 0
                self.appo_notes.append(
                    f"max_completion_length={self.max_completion_length} leaves no room to branch (a branch point "
                    f"needs min_branch_tokens={self.min_branch_tokens} tokens after it): APPO runs without "
                    f"branching (GRPO). Set max_completion_length >= {need} or lower min_branch_tokens to branch."
                )
        elif N is None:
            if B < 1:
                raise ValueError(f"num_branches must be >= 1 when branching (got {B}).")
            N = round(M / (1 + B * c))
        elif B is None:
            B = round((M / N - 1) / c) if N < M else 0
            if B < 1:
                raise ValueError(
                    f"rollout_budget='tokens': num_roots={N} roots cost about {N} of the M={M} rollouts' budget and "
                    f"leave none for branches (c={c}); set num_roots <= {int(M / (1 + c))}."
                )
        if B and N < 2:
            raise ValueError(
                f"num_roots (N={N}) must be >= 2: root advantages are normalised within the N roots of a prompt. "
                "Increase num_generations or decrease num_branches."
            )
        if B and N > M:
            raise ValueError(f"rollout_budget='tokens': num_roots={N} roots alone exceed the budget of M={M}; "
                             f"set num_roots < {M}.")
        self.num_roots, self.num_branches = N, B
        if B:
            rows = bs * N * (1 + B) / M
            self.appo_notes.append(
                f"rollout_budget='tokens': M={M} rollouts' worth of decoded tokens per prompt = N={N} roots + "
                f"N·B={N * B} branches (planned {N * (1 + B * c):g} rollouts' worth at expected_branch_cost={c:g}); "
                f"{N * (1 + B)} leaves trained per prompt; micro-batches of {rows:g} rows, forwards of at most {bs}."
            )

    def _check_scalars(self) -> None:
        """Numbers TRL accepts silently but that cannot train."""
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"learning_rate must be a non-negative number, got {lr!r}; e.g. learning_rate=1e-6.")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(
                f"temperature must be a positive number, got {t!r}: APPO samples roots and branches (1.0 in the paper)."
            )


PAPER_OPTIMIZER_STEPS_PER_GENERATION = 8
"""Optimizer steps per generation batch of `APPOConfig.paper()` (the paper: 6-8)."""

PAPER_SETTINGS = dict(
    num_generations=16, num_branches=3, per_device_train_batch_size=16, branch_criterion="bs",
    branch_selection="per_root", branch_schedule="per_update", branch_loss="none", branch_point_token="keep",
    dual_groups=True, prefix_credit=True, procedure_scale=True, future_kl=True, future_kl_form="appo",
    future_kl_weight=1.0, future_kl_normalize=False, epsilon=0.2, epsilon_high=0.28, delta=3.0, beta=0.0,
    learning_rate=1e-6, temperature=1.0, tool_protocol="tags", max_tool_calls=4,
)
"""The paper's settings as `APPOConfig` fields (`APPOConfig.paper()`; steps_per_generation is added there)."""

DEFAULT_BRANCH_PREFERENCE = (1, 3)
"""B values tried in order by `default_split` (chosen by benchmarks/learning.py; see benchmarks/README.md)."""


def default_split(num_generations: int, per_device_train_batch_size: int) -> tuple[int, int]:
    """(N, B) for a budget of M rollouts when the user gives neither: the first B of `DEFAULT_BRANCH_PREFERENCE`
    with N = M / (1 + B) >= 2 whole roots and whole roots per micro-batch (per_device_train_batch_size divisible by
    1 + B); (M, 0), no branching, when none fits (M < 4, or an odd batch size)."""
    for b in DEFAULT_BRANCH_PREFERENCE:
        if num_generations % (1 + b) == 0 and num_generations // (1 + b) >= 2 and per_device_train_batch_size % (1 + b) == 0:
            return num_generations // (1 + b), b
    return num_generations, 0


TOKEN_BUDGET_BRANCH_PREFERENCE = (2, 1, 3)
"""B values tried in order by `token_budget_split` (rollout_budget='tokens'): B = 2 at c = 0.5 gives N = M/2 and
1.5·M leaves, the ratio Tree-GRPO reports (docs/algorithm.md §9)."""

TOKEN_BUDGET_TOLERANCE = 0.1
"""How far (a fraction of M) the planned cost N·(1 + B·c) of `token_budget_split`'s split may be from M."""


def token_budget_split(num_generations: int, per_device_train_batch_size: int,
                       expected_branch_cost: float) -> tuple[int, int]:
    """(N, B) for a budget of M full rollouts' worth of decoded tokens (rollout_budget='tokens'): the first B of
    `TOKEN_BUDGET_BRANCH_PREFERENCE` with N = round(M / (1 + B·c)), 2 <= N < M, a planned cost N·(1 + B·c) within
    `TOKEN_BUDGET_TOLERANCE` of M, no fewer leaves N·(1+B) than M, and whole roots per micro-batch
    (per_device_train_batch_size·N divisible by M); (M, 0), no branching, when none fits."""
    M, bs, c = num_generations, per_device_train_batch_size, expected_branch_cost
    for b in TOKEN_BUDGET_BRANCH_PREFERENCE:
        n = round(M / (1 + b * c))
        close = abs(n * (1 + b * c) - M) <= TOKEN_BUDGET_TOLERANCE * M + 1e-9
        if 2 <= n < M and close and n * (1 + b) >= M and (bs * n) % M == 0:
            return n, b
    return M, 0
