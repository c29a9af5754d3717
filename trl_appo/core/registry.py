"""Registries of APPO's swappable rules, picked by name (as verl's ``core_algos.register_adv_est``).

Each rule is a :class:`Rule`: its function plus what it declares it needs, so callers decide from the registry,
never from a hand-kept list, what to compute for it (e.g. Ω's reference log-probs only for ``needs_omega`` rules):

* ``BRANCH_CRITERIA``   §1 where to branch: ``fn(scores, entropy_key, candidates, generator) -> (tier, primary,
  secondary)`` ranking keys; declares ``needs_omega`` (ranks by the Branching Score, so Ω must be computed) and
  ``needs_context`` (also called with ``context=`` a ``core.BranchContext``: the sampled tokens' log-probs, the
  completions, the dataset rows and the tokenizer, for surprisal or task-aware rules such as a known first error).
* ``ALLOCATIONS``       §1 how many branch points each prompt group gets: ``fn(num_groups, group_size, num_branches)
  -> list[int]`` quotas (``"uniform"``: B per root); a rule that declares ``needs_rewards`` is called
  ``fn(rewards (R,), group_size N, num_branches K) -> list[int]`` per-root counts summing to R·K (``"need"``, §9).
* ``BRANCH_ADVANTAGES`` §3 / §9 the advantage a branch row is trained with (``branch_loss="suffix"``):
  ``fn(inputs: BranchAdvantageInputs) -> (P,)``; declares ``needs_fork_points`` (the gathered points and shared
  ends of every rank's branches).
* ``FUTURE_KL_FORMS``   §4 the multiplier built from the clipped future factor: ``fn(f, weight) -> multiplier``.

An unknown name raises ``ValueError`` listing the valid ones; ``APPOConfig`` validates its fields against these.

Adding a rule (one file, one decorator)::

    @register_branch_criterion("my_rule", needs_omega=True)
    def my_rule(scores, entropy_key, candidates, generator):
        ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ALLOCATIONS",
    "BRANCH_ADVANTAGES",
    "BRANCH_CRITERIA",
    "FUTURE_KL_FORMS",
    "MULTI_OBJECTIVE_AGGREGATIONS",
    "NO_BRANCHING",
    "Registry",
    "Rule",
    "SCALE_REWARDS",
    "get_allocation",
    "get_branch_advantage",
    "get_branch_criterion",
    "get_future_kl_form",
    "omega_criteria",
    "register_allocation",
    "register_branch_advantage",
    "register_branch_criterion",
    "register_future_kl_form",
    "uses_omega",
]


@dataclass(frozen=True)
class Rule:
    """A registered rule: ``fn`` and what it declares it needs. Calling the rule calls ``fn``."""

    name: str
    fn: Callable[..., Any]
    needs_omega: bool = False  # criteria: reads the Branching Score, so Ω's reference log-probs are computed
    needs_fork_points: bool = False  # branch advantages: reads every rank's (root, shared end) of each branch
    needs_rewards: bool = False  # allocations: reads the roots' rewards (per-root counts instead of group quotas)
    needs_context: bool = False  # criteria: called with `context=` (core.BranchContext: log-probs, rows, tokenizer)
    description: str = ""

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class Registry(dict):
    """``name -> Rule`` for one kind of rule; ``register`` is the decorator, ``lookup`` the checked access."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, **needs):
        def deco(fn):
            doc = (fn.__doc__ or "").strip().split("\n")[0]
            self[name] = Rule(name, fn, description=needs.pop("description", doc), **needs)
            return fn

        return deco

    def lookup(self, name: str) -> Rule:
        if name not in self:
            raise ValueError(f"Unknown {self.kind} {name!r}; valid: {sorted(self)}.")
        return self[name]


BRANCH_CRITERIA = Registry("branch criterion")
ALLOCATIONS = Registry("branch allocation")
BRANCH_ADVANTAGES = Registry("branch advantage")
FUTURE_KL_FORMS = Registry("future-KL form")

SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")

NO_BRANCHING = "none"
"""The criterion name that turns branching off (M independent roots: GRPO on the same budget)."""


def register_branch_criterion(name: str, *, needs_omega: bool = False, needs_context: bool = False,
                              description: str | None = None):
    """Decorator: a branch-selection criterion ``fn(scores, entropy_key, candidates, generator) -> (tier, primary,
    secondary)`` under ``name``; ``needs_omega=True`` if it reads the Branching Score (Ω is then computed);
    ``needs_context=True`` if it also takes ``context=`` (``core.BranchContext``)."""
    extra = {} if description is None else {"description": description}
    return BRANCH_CRITERIA.register(name, needs_omega=needs_omega, needs_context=needs_context, **extra)


def register_allocation(name: str, *, needs_rewards: bool = False, description: str | None = None):
    """Decorator: a branch allocation ``fn(num_groups, group_size, num_branches) -> list[int]`` (points per group);
    with ``needs_rewards=True``, ``fn(rewards (R,), group_size N, num_branches K) -> list[int]`` (points per root,
    summing to R·K) and the step passes the roots' scalar rewards."""
    extra = {} if description is None else {"description": description}
    return ALLOCATIONS.register(name, needs_rewards=needs_rewards, **extra)


def register_branch_advantage(name: str, *, needs_fork_points: bool = False, description: str | None = None):
    """Decorator: the advantage of a branch's loss row ``fn(BranchAdvantageInputs) -> (P,)`` under ``name``."""
    extra = {} if description is None else {"description": description}
    return BRANCH_ADVANTAGES.register(name, needs_fork_points=needs_fork_points, **extra)


def register_future_kl_form(name: str, *, description: str | None = None):
    """Decorator: a future-KL form ``fn(f, weight) -> multiplier`` under ``name``."""
    extra = {} if description is None else {"description": description}
    return FUTURE_KL_FORMS.register(name, **extra)


def get_branch_criterion(name: str) -> Rule:
    """The registered branch criterion ``name`` ("bs", "entropy", "surprisal", "random", or one registered since);
    ``ValueError`` listing the valid ones."""
    return BRANCH_CRITERIA.lookup(name)


def get_allocation(name: str) -> Rule:
    """The registered branch allocation ``name`` ("uniform", "need"); ``ValueError`` listing the valid ones."""
    return ALLOCATIONS.lookup(name)


def get_branch_advantage(name: str) -> Rule:
    """The registered branch advantage ``name`` ("dual_group", "local"); ``ValueError`` listing the valid ones."""
    return BRANCH_ADVANTAGES.lookup(name)


def get_future_kl_form(name: str) -> Rule:
    """The registered future-KL form ``name`` ("appo", "fipo"); ``ValueError`` listing the valid ones."""
    return FUTURE_KL_FORMS.lookup(name)


def omega_criteria() -> frozenset[str]:
    """Names of the registered criteria that declare ``needs_omega`` (``core.OMEGA_CRITERIA``)."""
    return frozenset(name for name, rule in BRANCH_CRITERIA.items() if rule.needs_omega)


def uses_omega(name: str) -> bool:
    """Whether criterion ``name`` reads Ω (only then are Ω-reference log-probs computed and BS metrics logged)."""
    rule = BRANCH_CRITERIA.get(name)
    return bool(rule is not None and rule.needs_omega)
