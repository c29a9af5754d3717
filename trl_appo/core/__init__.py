"""Pure tensor mathematics of APPO (docs/algorithm.md §1, §3, §4). Torch only: no model, tokenizer or trainer.

One file per section of docs/algorithm.md; this package face re-exports the public names
(``from trl_appo import core; core.branching_score(...)``):

* ``scan.py``       ``discounted_suffix_sum``  — the O(T) discounted reverse scan both Ω (§1) and FutureKL (§4) need.
* ``score.py``      §1 ``branching_score``, ``branch_candidates``.
* ``selection.py``  §1 ``select_branch_points`` with the criteria and the allocation rules.
* ``advantages.py`` §3 ``dual_group_advantages`` (TRL's GRPO normalisation, op for op), ``scalar_rewards``.
* ``credit.py``     §3 ``branch_credit`` (the per-token credit formula), the branch advantages, ``fork_advantages``.
* ``future_kl.py``  §4 ``future_kl_weights`` and its forms.
* ``registry.py``   the registries every swappable rule is an entry of, with what each rule needs.

Criteria, allocations, branch advantages and future-KL forms are registry entries that declare what they need
(``BRANCH_CRITERIA``, ``ALLOCATIONS``, ``BRANCH_ADVANTAGES``, ``FUTURE_KL_FORMS``; ``register_*`` decorators), as
in verl's ``core_algos``; reward scalings and aggregations are the tuples ``SCALE_REWARDS`` and
``MULTI_OBJECTIVE_AGGREGATIONS``. An unknown name raises ``ValueError`` listing the valid ones.

Conventions shared by every function:

* ``B`` rows (rollouts), ``T`` completion tokens, masks ``(B, T)`` bool or 0/1 numbers (1 = model token).
* Values at masked-out positions (tool output, template glue, padding) are never read: they may hold anything,
  including NaN. Non-finite log-probs / entropies *on model tokens* raise ``ValueError``.
* Arithmetic runs in float32, or float64 when an input is float64 (bf16 log-probs are upcast: a sum over
  thousands of bf16 values in bf16 is meaningless). Outputs use that compute dtype.
* Nothing returns NaN, including for empty batches, empty rows, singleton or zero-variance groups.

Deviations from the paper / public release (see docs/algorithm.md §8), stated once here:

* Suffix sums are a blocked O(T) scan (release: a T×T decay matrix per row, O(T²) time and memory).
* Selection fills (§1 "fill by descending BS, then by descending entropy") are read as tiers: strict candidates
  (z_H>0 and z_Ω>0) by BS, then the remaining candidates with BS>0 by BS, then the rest by entropy. In a
  degenerate row (Ω constant) BS := z_H and no candidate is strict: the row ranks by entropy alone and every
  pick is reported as the entropy fallback (code 2), so "strict" counts only picks Ω actually informed.
* ``min_distance`` is soft: it is relaxed (in rank order) before any point is duplicated, so duplicates
  happen only when a root (a group, when pooled) has fewer candidates than points asked for.
* The procedure-level factor multiplies the *advantage* (release: the reward, where it cancels).
"""

from __future__ import annotations

from .advantages import _grpo_advantages, _nanstd, dual_group_advantages, scalar_rewards
from .credit import BranchAdvantageInputs, branch_credit, fork_advantages
from .future_kl import FutureKLWeights, future_kl_weights
from .registry import (
    ALLOCATIONS,
    BRANCH_ADVANTAGES,
    BRANCH_CRITERIA,
    FUTURE_KL_FORMS,
    MULTI_OBJECTIVE_AGGREGATIONS,
    NO_BRANCHING,
    SCALE_REWARDS,
    Registry,
    Rule,
    get_allocation,
    get_branch_advantage,
    get_branch_criterion,
    get_future_kl_form,
    omega_criteria,
    register_allocation,
    register_branch_advantage,
    register_branch_criterion,
    register_future_kl_form,
    uses_omega,
)
from .scan import discounted_suffix_sum
from .score import BranchingScore, branch_candidates, branching_score
from .selection import (
    FALLBACK_CODES,
    FALLBACK_TOOL_RESULT,
    BranchContext,
    BranchPoints,
    groups_all_equal,
    hint_ranking,
    need_allocation,
    select_branch_points,
)

__all__ = [
    "ALLOCATIONS",
    "BRANCH_ADVANTAGES",
    "BRANCH_CRITERIA",
    "FALLBACK_CODES",
    "FALLBACK_TOOL_RESULT",
    "FUTURE_KL_FORMS",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "NO_BRANCHING",
    "OMEGA_CRITERIA",
    "SCALE_REWARDS",
    "BranchAdvantageInputs",
    "BranchContext",
    "BranchPoints",
    "BranchingScore",
    "FutureKLWeights",
    "Registry",
    "Rule",
    "branch_candidates",
    "branch_credit",
    "branching_score",
    "discounted_suffix_sum",
    "dual_group_advantages",
    "fork_advantages",
    "future_kl_weights",
    "get_allocation",
    "get_branch_advantage",
    "get_branch_criterion",
    "get_future_kl_form",
    "groups_all_equal",
    "hint_ranking",
    "need_allocation",
    "omega_criteria",
    "register_allocation",
    "register_branch_advantage",
    "register_branch_criterion",
    "register_future_kl_form",
    "scalar_rewards",
    "select_branch_points",
    "uses_omega",
]


def __getattr__(name: str):
    # OMEGA_CRITERIA is derived from the registry on every access, so a criterion registered later with
    # needs_omega=True is in it without being added anywhere by hand.
    if name == "OMEGA_CRITERIA":
        return omega_criteria()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
