"""The APPO step, top to bottom: score the roots, pick branch points, branch, reward, credit, build loss rows.

``branch_and_credit(batch, port, settings)`` runs one step on a batch of whole prompt groups of N root rows (TRL's
batch dict, as `_generate_and_score_completions` returns it, plus the `appo_*` columns the trainer adds). It talks
to whoever runs it only through `port` (`trl_appo.port.StepPort`: forwards, the rollout engine, the reward
functions, gather), reads its options from `settings` (`StepSettings`, built once from `APPOConfig`), writes
nothing but its return value, and returns everything it produced (`StepOutput`). In order:

1. **Roots' view.** Rows sorted so each prompt's roots are contiguous (`RootView`), once.
2. **Score** (paper §3.1, Branching Score): one no-grad forward of the current policy gives full-vocabulary
   entropies and log-probs; Ω against the behaviour policy (or the reference); `core.branching_score`.
3. **Points**: `core.branch_candidates` + `core.select_branch_points` (the criterion and allocation rules).
   Under `branch_schedule="online"` (docs/algorithm.md §9) the branches were forked at tool results while the roots
   were generated (`RolloutEngine.run_tree`, the batch's `appo_forks` column): steps 2-4 only read them back
   (`online_points`), with no forward and no generate call.
4. **Branch** (paper §3.2): each prefix continues through the training rollout engine (same tools, stop rules,
   budget). `branch_point_token="keep"` keeps the chosen token s and resamples from s+1 (public release);
   `"resample"` keeps 0..s−1 and re-decides s itself. The shared prefix ends at `shared_end` (s or s−1).
5. **Reward** the branches with the user's reward functions, on prefix + continuation.
6. **Credit** (paper §3.3): dual-group advantages over the gathered batch (`core.dual_group_advantages`), the
   roots' per-token advantages (`core.branch_credit`, credit up to `shared_end`), this rank's slice.
7. **Branch rows for the loss** (`branch_loss="suffix"`, beyond the paper; docs/algorithm.md): each branch's own
   tokens after its prefix, with the advantage of the `branch_advantage` rule (`core.BRANCH_ADVANTAGES`), the
   copied prefix masked out of the loss, and everything TRL's loss reads for those rows (old log-probs when the
   batch is off-policy, reference log-probs when beta > 0, sampling log-probs, importance ratios).

Its metrics (`trl_appo.step_metrics`) and branch-tree records (`trl_appo.records`) come back in the report.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import core, records
from .batch_rows import take_rows
from .port import StepPort
from .rollout.build import completions_for_rewards, executed_tool_calls
from .step_metrics import agreement_metrics, step_metrics


@dataclass(frozen=True)
class StepSettings:
    """APPO's options, read once from `APPOConfig` (`from_config`): what the step, the loss and the model card use.

    Rule names (criterion, allocation, branch advantage, future-KL form) are keys of the `core` registries.
    """

    num_generations: int  # M
    num_roots: int  # N
    num_branches: int  # B per root
    criterion: str
    selection: str  # "per_root" | "pooled"
    allocation: str
    schedule: str
    omega_reference: str
    gamma: float  # Ω discount γ
    omega_clip: float  # ε_Ω
    max_completion_length: int
    min_branch_tokens: int
    min_distance: int
    branch_point_token: str  # "keep" | "resample"
    dual_groups: bool
    prefix_credit: bool
    procedure_scale: bool
    rho: float  # ρ, reward_scale_discount
    lam: float  # λ, procedure_scale_weight
    branch_loss: str  # "none" | "suffix"
    branch_advantage: str
    scale_rewards: str
    multi_objective_aggregation: str
    mask_truncated_completions: bool
    pad_to_multiple_of: int | None
    future_kl: bool
    future_kl_form: str
    future_kl_decay: float
    future_kl_clip: float
    future_kl_clip_high_only: bool
    future_kl_weight: float
    future_kl_safety_thresh: float
    future_kl_normalize: bool
    dual_clip_c: float  # TRL's `delta` (3.0 when unset)
    tool_protocol: str
    max_tool_calls: int

    @classmethod
    def from_config(cls, args) -> StepSettings:
        return cls(
            num_generations=args.num_generations, num_roots=args.num_roots, num_branches=args.num_branches,
            criterion=args.branch_criterion, selection=args.branch_selection, allocation=args.branch_allocation,
            schedule=args.branch_schedule, omega_reference=args.omega_reference, gamma=args.branch_gamma,
            omega_clip=args.omega_clip, max_completion_length=args.max_completion_length,
            min_branch_tokens=args.min_branch_tokens, min_distance=args.branch_min_distance,
            branch_point_token=args.branch_point_token, dual_groups=args.dual_groups,
            prefix_credit=args.prefix_credit, procedure_scale=args.procedure_scale,
            rho=args.reward_scale_discount, lam=args.procedure_scale_weight, branch_loss=args.branch_loss,
            branch_advantage=args.branch_advantage, scale_rewards=args.scale_rewards,
            multi_objective_aggregation=args.multi_objective_aggregation,
            mask_truncated_completions=args.mask_truncated_completions, pad_to_multiple_of=args.pad_to_multiple_of,
            future_kl=args.future_kl, future_kl_form=args.future_kl_form, future_kl_decay=args.future_kl_decay,
            future_kl_clip=args.future_kl_clip, future_kl_clip_high_only=args.future_kl_clip_high_only,
            future_kl_weight=args.future_kl_weight, future_kl_safety_thresh=args.future_kl_safety_thresh,
            future_kl_normalize=args.future_kl_normalize, dual_clip_c=args.delta or 3.0, tool_protocol=args.tool_protocol, max_tool_calls=args.max_tool_calls,
        )

    @property
    def keep_token(self) -> bool:
        return self.branch_point_token == "keep"

    @property
    def uses_omega(self) -> bool:
        """The criterion reads Ω (declared by its registry entry): only then are Ω's reference log-probs computed."""
        return core.uses_omega(self.criterion)

    @property
    def uses_context(self) -> bool:
        """The criterion reads the roots' `core.BranchContext` (declared by its registry entry)."""
        rule = core.BRANCH_CRITERIA.get(self.criterion)
        return bool(rule is not None and rule.needs_context)

    def future_kl_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `core.future_kl_weights` (docs/algorithm.md §4)."""
        return dict(decay=self.future_kl_decay, clip=self.future_kl_clip, clip_high_only=self.future_kl_clip_high_only,
                    weight=self.future_kl_weight, safety_thresh=self.future_kl_safety_thresh,
                    dual_clip_c=self.dual_clip_c, form=self.future_kl_form, normalize=self.future_kl_normalize)

    def describe(self) -> list[str]:
        """One markdown line per setting (the model card): every field, with the registered rule's description."""
        rules = {"criterion": core.BRANCH_CRITERIA, "allocation": core.ALLOCATIONS,
                 "branch_advantage": core.BRANCH_ADVANTAGES, "future_kl_form": core.FUTURE_KL_FORMS}
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            line = f"- {f.name.replace('_', ' ')} `{value}`"
            rule = rules.get(f.name, {}).get(value)
            if rule is not None and rule.description:
                line += f": {rule.description}"
            lines.append(line)
        return lines


@dataclass
class BranchCompletions:
    """What TRL's completions table lists for this step's branches (the trainer writes it when it logs them)."""

    prompts: list
    completions: list
    rewards: torch.Tensor  # (P_all, F) gathered
    advantages: torch.Tensor  # (P,) the advantage each branch is trained with (Â_b when it only gives credit)
    positions: torch.Tensor  # (P,) branch points
    root_log_index: torch.Tensor | None  # (R,) the roots' rows in the completions table (the trainer's column)
    root_credit_mean: torch.Tensor  # (R,) mean of A_{i,t} over each root's model tokens (in view order)


@dataclass
class StepReport:
    """What the step measured and recorded: `appo/*` metric values, branch-tree records (when asked for), the
    branch rollouts (the trainer logs their tool use as it does the roots') and the completions-table rows."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]
    branches: list
    completions: BranchCompletions


@dataclass
class StepOutput:
    """What one APPO step produced for this rank."""

    advantages: torch.Tensor  # (R, C) per-token advantages of the roots, in the batch's row order
    branch_rows: dict[str, Any] | None  # loss rows of the branches (branch_loss="suffix" and for_loss), else None
    report: StepReport


@dataclass
class RootView:
    """The roots of one batch, sorted so each prompt's N roots are contiguous (`order` undoes the sort)."""

    rows: dict[str, Any]
    order: torch.Tensor
    model_mask: torch.Tensor  # (R, C) 1 on policy tokens
    lengths: torch.Tensor  # (R,)
    prompt_ids: list[list[int]]  # unpadded
    completion_ids: list[list[int]]
    completion_model_mask: list[list[int]]
    completion_logprobs: list[list[float]] | None

    @classmethod
    def of(cls, batch: dict[str, Any]) -> RootView:
        order = torch.argsort(batch["appo_group"].cpu(), stable=True)
        rows = take_rows(batch, order)
        c_ids, c_mask, p_ids, p_mask = (rows["completion_ids"], rows["completion_mask"], rows["prompt_ids"],
                                        rows["prompt_mask"])
        model_mask = c_mask * rows["tool_mask"] if rows.get("tool_mask") is not None else c_mask
        lengths = c_mask.sum(dim=1)
        n = lengths.tolist()
        sampling = rows.get("sampling_per_token_logps")
        return cls(
            rows=rows, order=order, model_mask=model_mask, lengths=lengths,
            prompt_ids=[p_ids[i][p_mask[i].bool()].tolist() for i in range(len(n))],
            completion_ids=[c_ids[i][: n[i]].tolist() for i in range(len(n))],
            completion_model_mask=[model_mask[i][: n[i]].tolist() for i in range(len(n))],
            completion_logprobs=None if sampling is None else [sampling[i][: n[i]].tolist() for i in range(len(n))],
        )


def whitespace_token_table(tokenizer, vocab_size: int = 0) -> torch.Tensor:
    """(max(vocab_size, len(tokenizer)),) bool: True where a token decodes to whitespace only (never a branch point,
    docs/algorithm.md §1); a token that decodes to nothing is not whitespace."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    table = torch.zeros(max(vocab_size, len(texts)), dtype=torch.bool)
    table[: len(texts)] = torch.tensor([t.strip() == "" and t != "" for t in texts])
    return table


def shared_end(position: torch.Tensor, keep_token: bool) -> torch.Tensor:
    """Last token a branch shares with its root: s when the chosen token is kept, s − 1 when it is resampled."""
    return position if keep_token else torch.where(position >= 0, position - 1, position)


def prefixes_at(view: RootView, points: core.BranchPoints, keep_token: bool):
    """The engine's start of each branch: its root's prompt ids and a `Prefix` (None: start from the prompt)."""
    from .rollout import Prefix

    prompts, prefixes = [], []
    for r, e in zip(points.root.tolist(), shared_end(points.position, keep_token).tolist(), strict=True):
        prompts.append(view.prompt_ids[r])
        if e < 0:
            prefixes.append(None)  # nothing shared: the branch starts from the prompt
        else:
            logp = view.completion_logprobs
            prefixes.append(Prefix(view.completion_ids[r][: e + 1], view.completion_model_mask[r][: e + 1],
                                   None if logp is None else logp[r][: e + 1]))
    return prompts, prefixes


def online_points(view: RootView, forks: list, num_branches: int, keep_token: bool):
    """(BranchPoints, rollouts) of the branches forked at tool results while the roots were generated
    (`branch_schedule="online"`): `forks[r]` lists root r's `rollout.Fork`s in the batch's row order. A fork that
    shares k completion tokens has shared end k − 1, so its point is k (resample) or k − 1 (keep); one that shares
    nothing, or whose root has no token after the fork, gets −1 (no prefix credit, as a point with no candidate)."""
    roots, positions, branches = [], [], []
    for v, r in enumerate(view.order.tolist()):
        if len(forks[v]) != num_branches:
            raise RuntimeError(f"root {r} has {len(forks[v])} online branches, expected B={num_branches}")
        for fork in forks[v]:
            k = fork.shared
            point = -1 if k == 0 or k >= int(view.lengths[v]) else (k if not keep_token else k - 1)
            roots.append(v)
            positions.append(point)
            branches.append(fork.rollout)
    root = torch.tensor(roots, dtype=torch.long)
    position = torch.tensor(positions, dtype=torch.long)
    fallback = torch.where(position >= 0, core.FALLBACK_TOOL_RESULT, 5)
    return core.BranchPoints(root, position, fallback == 0, fallback, torch.zeros(len(roots))), branches


@torch.no_grad()
def branch_and_credit(batch: dict[str, Any], port: StepPort, settings: StepSettings, *, for_loss: bool = True,
                      want_records: bool = False) -> StepOutput:
    """One APPO step on `batch` (whole prompt groups of N roots): the roots' per-token advantages, the branches'
    loss rows when `for_loss` and ``branch_loss="suffix"``, and the report. `batch` is not modified."""
    device = port.device
    N, B = settings.num_roots, settings.num_branches
    t0 = time.perf_counter()

    # 1-2. Roots' view; score every model token with the current policy (paper §3.1).
    view = RootView.of(batch)
    rows, model_mask = view.rows, view.model_mask
    input_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)  # (R, prompt + C)
    attention_mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
    C = rows["completion_ids"].size(1)
    online = settings.schedule == "online"
    if online:  # the branches exist already, placed at random tool results: nothing to score
        logp_current = entropy = logp_reference = torch.zeros(model_mask.shape, device=model_mask.device)
    else:
        logp_current, entropy = port.policy_logps(input_ids, attention_mask, C, compute_entropy=True)  # (R, C) each
        logp_reference = (port.omega_reference_logps(rows, input_ids, attention_mask, C, logp_current)
                          if settings.uses_omega else logp_current)
    mask_f = model_mask.float()
    bs = core.branching_score(entropy.float() * mask_f, logp_current.float() * mask_f,
                              logp_reference.float() * mask_f, mask_f, gamma=settings.gamma,
                              omega_clip=settings.omega_clip)

    # 3. Branch points.
    by_need = core.get_allocation(settings.allocation).needs_rewards  # per-root counts from the roots' rewards
    if online:
        pts, forked = online_points(view, rows["appo_forks"], B, settings.keep_token)
    else:
        candidates = core.branch_candidates(
            model_mask.bool(), view.lengths, settings.max_completion_length, settings.min_branch_tokens,
            whitespace_mask=port.whitespace_table()[rows["completion_ids"]] & rows["completion_mask"].bool(),
        )
        root_scalar = (rows["appo_root_rewards"].float().cpu() * port.reward_weights.cpu()).nansum(dim=1)  # (R,)
        pts = core.select_branch_points(
            bs, candidates, B, criterion=settings.criterion, pooled=settings.selection == "pooled", group_size=N,
            min_distance=settings.min_distance, generator=port.generator, entropy=entropy,
            allocation=settings.allocation, rewards=root_scalar if by_need else None,
            context=core.BranchContext(logp_current * model_mask, view.completion_ids, view.completion_model_mask,
                                       rows["appo_inputs"], port.tokenizer, settings.keep_token)
            if settings.uses_context else None,
        )  # (P,) each
    ends = shared_end(pts.position, settings.keep_token)
    t_score = time.perf_counter()

    # 4. Branch through the same engine (paper §3.2). A TRL environment is forked by replaying the prefix's tool
    # calls into a fresh instance (`rollout.environments`); the branches run and are rewarded on those instances.
    root_inputs = [rows["appo_inputs"][r] for r in pts.root.tolist()]
    with port.fork_environments(root_inputs) as (sessions, branch_prompts):
        if online:
            branches = forked
        else:
            branch_prompt_ids, prefixes = prefixes_at(view, pts, settings.keep_token)
            branches = port.rollout(branch_prompt_ids, prefixes, sessions)
        t_gen = time.perf_counter()

        # 5. Reward the branches on the full trajectory (prefix + continuation); gathered across ranks.
        # Each branch row is its root's input row with its own executed tool calls (the root's came with the row).
        branch_inputs = [{**row, "executed_tool_calls": calls}
                         for row, calls in zip(root_inputs, executed_tool_calls(branches), strict=True)]
        completions = completions_for_rewards(branch_prompts, branches)
        branch_rewards = port.branch_rewards(branch_inputs, branch_prompts, completions,
                                             [b.completion_ids for b in branches])  # (P_all, F)
    t_reward = time.perf_counter()

    # 6. Credit (paper §3.3) over the gathered batch, then this rank's slice.
    root_rewards = port.gather(rows["appo_root_rewards"].to(device))  # (R_all, F)
    weights = port.reward_weights.to(device)
    rank, R, P = port.rank, len(view.prompt_ids), len(branches)
    # Each branch's prompt over all ranks: implied (N·B per prompt) unless the allocation varies it per prompt.
    branch_prompt = (port.gather(pts.root.to(device) // N + rank * (R // N)) if by_need
                     else torch.arange(branch_rewards.shape[0], device=device) // max(N * B, 1))
    root_adv_all, branch_adv_all = core.dual_group_advantages(
        root_rewards, branch_rewards.to(device), weights, N, N * B, scale_rewards=settings.scale_rewards,
        dual_groups=settings.dual_groups, multi_objective_aggregation=settings.multi_objective_aggregation,
        branch_prompt=branch_prompt if by_need else None,
    )
    root_adv = root_adv_all[rank * R : (rank + 1) * R]
    branch_adv = branch_adv_all[rank * P : (rank + 1) * P]
    credit = core.branch_credit(
        root_adv, branch_adv, pts.root.to(device), ends.to(device), pts.score.to(device), model_mask.to(device),
        rho=settings.rho, lam=settings.lam, prefix_credit=settings.prefix_credit,
        procedure_scale=settings.procedure_scale,
    )  # (R, C) in view order
    advantages = torch.empty_like(credit)
    advantages[view.order.to(device)] = credit

    # 7. The branches' own tokens as loss rows (beyond the paper).
    branch_rows = None
    trained = branch_adv
    if for_loss and settings.branch_loss == "suffix":
        trained = branch_loss_advantages(port, settings, pts, ends, root_rewards, branch_rewards.to(device), weights,
                                         branch_adv_all, R)[rank * P : (rank + 1) * P]
        branch_rows = build_branch_rows(port, settings, view, pts, branches, trained)

    metrics = step_metrics(view=view, scores=bs, points=pts, branches=branches, branch_rewards=branch_rewards,
                           root_rewards=root_rewards, weights=weights, credit=credit,
                           timings=(t_score - t0, t_gen - t_score, t_reward - t_gen), branch_rows=branch_rows,
                           uses_omega=settings.uses_omega, gather=port.gather, device=device,
                           hinted=settings.uses_context)
    metrics.update(agreement_metrics(root_rewards, branch_rewards, weights, branch_prompt, N))
    on = model_mask.to(credit.device).float()
    table = BranchCompletions(prompts=branch_prompts, completions=completions, rewards=branch_rewards,
                              advantages=trained, positions=pts.position, root_log_index=rows.get("appo_log_index"),
                              root_credit_mean=(credit * on).sum(dim=1) / on.sum(dim=1).clamp(min=1))
    trees = tree_records(port, settings, view, bs, pts, branches, branch_rewards, credit) if want_records else []
    return StepOutput(advantages=advantages, branch_rows=branch_rows,
                      report=StepReport(metrics=metrics, records=trees, branches=branches, completions=table))


def branch_loss_advantages(port: StepPort, settings: StepSettings, pts: core.BranchPoints, ends: torch.Tensor,
                           root_rewards: torch.Tensor, branch_rewards: torch.Tensor, weights: torch.Tensor,
                           dual_group_advantage: torch.Tensor, num_local_roots: int) -> torch.Tensor:
    """(P_all,) advantages of the branches' loss rows from the `branch_advantage` rule (`core.BRANCH_ADVANTAGES`);
    a rule that declares `needs_fork_points` gets every rank's (root, shared end) of each branch."""
    rule = core.get_branch_advantage(settings.branch_advantage)
    fork_root = fork_end = None
    if rule.needs_fork_points:
        device = port.device
        where = torch.stack([pts.root.to(device) + port.rank * num_local_roots, ends.to(device)], dim=1)
        where_all = port.gather(where)
        fork_root, fork_end = where_all[:, 0], where_all[:, 1]
    return rule(core.BranchAdvantageInputs(
        root_rewards=root_rewards, branch_rewards=branch_rewards, reward_weights=weights,
        dual_group_advantage=dual_group_advantage, num_roots=settings.num_roots, scale_rewards=settings.scale_rewards,
        branch_root=fork_root, branch_shared_end=fork_end,
    ))


def tree_records(port: StepPort, settings: StepSettings, view: RootView, bs, pts, branches, branch_rewards,
                 credit) -> list[dict[str, Any]]:
    """The step's branch-tree records (`trl_appo.records`): one per root, with its branches."""
    weights = port.reward_weights.cpu()
    tok = port.tokenizer
    return records.build_records(
        tokenizer=tok, step=port.global_step, point_token=settings.branch_point_token, prompt_ids=view.prompt_ids,
        completion_ids=view.completion_ids, model_masks=view.completion_model_mask,
        groups=view.rows["appo_group"].tolist(), inputs=view.rows["appo_inputs"], scores=bs,
        root_rewards=(view.rows["appo_root_rewards"].cpu() * weights).nansum(dim=1), points=pts,
        branch_rewards=(branch_rewards[: len(branches)].cpu() * weights).nansum(dim=1),
        branch_texts=[tok.decode(b.completion_ids[b.prefix_length:]) for b in branches], credit=credit,
    )


def build_branch_rows(port: StepPort, settings: StepSettings, view: RootView, pts: core.BranchPoints, branches,
                      advantages: torch.Tensor) -> dict[str, Any]:
    """TRL loss rows for the branches: the root's prompt, the branch's whole completion, the loss mask zero on the
    copied prefix and equal to the model mask after it, and every column TRL's loss reads for the roots' rows."""
    from trl.trainer.utils import pad

    device = port.device
    rows = view.rows
    pad_id = port.pad_token_id
    multiple = settings.pad_to_multiple_of
    roots = pts.root.tolist()
    prompt_ids = rows["prompt_ids"][pts.root.to(rows["prompt_ids"].device)]
    prompt_mask = rows["prompt_mask"][pts.root.to(rows["prompt_mask"].device)]

    def right(seqs, value, dtype=None):
        return pad([torch.tensor(s, dtype=dtype) for s in seqs], padding_value=value, padding_side="right",
                   pad_to_multiple_of=multiple).to(device)

    completion_ids = right([b.completion_ids for b in branches], pad_id, torch.long)
    completion_mask = right([[1] * len(b.completion_ids) for b in branches], 0, torch.long)
    loss_mask = right([[0] * b.prefix_length + list(b.model_mask[b.prefix_length:]) for b in branches], 0, torch.long)
    if settings.mask_truncated_completions:
        ends = [*port.eos_token_ids, pad_id]
        kept = torch.tensor([bool(b.completion_ids) and b.completion_ids[-1] in ends for b in branches],
                            device=device).unsqueeze(1).long()
        completion_mask, loss_mask = completion_mask * kept, loss_mask * kept
    out: dict[str, Any] = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "tool_mask": loss_mask,
        "advantages": advantages.to(device).float().unsqueeze(1).expand(-1, completion_ids.size(1)).contiguous(),
    }
    C = completion_ids.size(1)
    need_old = rows.get("old_per_token_logps") is not None
    need_ref = rows.get("ref_per_token_logps") is not None
    if need_old or need_ref:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        if need_old:  # branches were sampled by the current weights: their behaviour log-probs are these
            out["old_per_token_logps"], _ = port.policy_logps(input_ids, attention_mask, C)
        if need_ref:
            out["ref_per_token_logps"] = port.reference_logps(input_ids, attention_mask, C)
    if rows.get("sampling_per_token_logps") is not None:
        out["sampling_per_token_logps"] = right(
            [b.logprobs if b.logprobs is not None else [0.0] * len(b.completion_ids) for b in branches], 0.0,
            torch.float32)
    ratio = rows.get("importance_sampling_ratio")
    if ratio is not None:  # vLLM's sampler ≈ the trainer's for fresh branch rows: no correction (ratio 1)
        out["importance_sampling_ratio"] = ratio.new_ones((len(roots), 1 if ratio.shape[1] == 1 else C))
    return out
