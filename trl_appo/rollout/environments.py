"""TRL environments (`environment_factory`) in APPO's rollout engine, and forking them at a branch point.

TRL's contract (`GRPOTrainer(environment_factory=...)`, kept unchanged): the factory returns an object with a
`reset(**row)` method (called with the dataset row before each rollout; a returned string is appended to the last
user message) and public methods that the model calls as tools; an optional `get_reward()` scores the finished
rollout from the environment's state. Each rollout gets its own instance (TRL pools and resets them). A `dict`
factory routes each row to an environment by its `environment` column. TRL validates all of this in its constructor
and creates and resets the roots' instances in `_generate_and_score_completions`; APPO's engine then runs the tool
calls on the rollout's own instance (`EnvironmentTool`, the engine's session key carries the instance).

Forking (docs/algorithm.md §2). A branch continues a root's prefix, so it needs the root's environment *as it was at
the branch point*, while the root's instance has moved on to the end of its episode. APPO rebuilds that state by
replay: a pooled instance of the same environment is reset with the root's dataset row, and the tool calls that the
prefix executed are called again on it, in order, with the same arguments (results discarded; a call that raised is
ignored, as it was answered with an error). This is exact only for a **deterministic** environment: `reset` and
every tool method must depend only on their arguments and the instance's state (no unseeded randomness, clock,
network or shared global state). An environment that is not replayable says so with a class attribute::

    class Browser:
        replayable = False  # APPOTrainer cannot fork it: trains without branching (as GRPO), with one warning

The branch's `get_reward()` is then called on its own (forked) instance.

Order of a row's calls. Calls of one assistant turn on the same instance run one after another in the order the
model wrote them (TRL runs a turn's sync calls in order too), so that a replay reproduces them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

from ..tools.base import Tool, ToolError, ToolRegistry

REPLAYABLE_ATTRIBUTE = "replayable"
"""Class attribute an environment sets to False when replaying its calls does not reproduce its state."""

_NOT_TOOLS = ("reset", "get_reward")


def is_replayable(environment: Any) -> bool:
    """Whether APPO may fork `environment` by replaying calls (default True; see the module docstring)."""
    return bool(getattr(type(environment), REPLAYABLE_ATTRIBUTE, True))


def tool_names(environment: Any) -> list[str]:
    """The methods TRL exposes as tools: public functions of the class, except `reset` and `get_reward`."""
    return [
        name
        for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
        if name not in _NOT_TOOLS and not name.startswith("_")
    ]


class EnvironmentSession:
    """The engine's session key of one rollout that runs on an environment instance (hashable by identity)."""

    __slots__ = ("environment", "_names")

    def __init__(self, environment: Any):
        self.environment = environment
        self._names = frozenset(tool_names(environment))

    def method(self, name: str):
        if name not in self._names:
            raise ToolError(f"unknown tool '{name}'. Available tools: {', '.join(sorted(self._names)) or 'none'}")
        return getattr(self.environment, name)


class EnvironmentTool(Tool):
    """One environment method name, executed on the instance of the rollout that calls it (its session).

    The JSON schema comes from the method of a probe instance (TRL's probe); arguments are checked against that
    signature. `sequential`: calls of one rollout run in order (see the module docstring).
    """

    sequential = True

    def __init__(self, method):
        super().__init__(method)

    def invoke(self, bound, session: Any = None) -> Any:
        if not isinstance(session, EnvironmentSession):
            raise ToolError(f"tool '{self.name}' belongs to an environment, and this rollout has none")
        return session.method(self.name)(*bound.args, **bound.kwargs)

    def prime(self, session: Any, arguments: dict[str, Any] | str) -> None:
        """Replay one call of a branch's prefix into the branch's instance (result discarded)."""
        if not isinstance(session, EnvironmentSession):
            return
        try:
            bound = self.bind(arguments)
            value = session.method(self.name)(*bound.args, **bound.kwargs)
            if inspect.isawaitable(value):
                _run_coroutine(value)
        except Exception:  # noqa: BLE001 - the original call raised too and was answered with an error
            pass


def _run_coroutine(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop (unusual for a trainer): run it on a private one in a thread.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class TrainerEnvironments:
    """What `APPOTrainer` needs on top of TRL's environment set-up (TRL's constructor has validated and probed them).

    Args:
        trainer: the `GRPOTrainer` whose constructor processed `environment_factory` (reads its factories, probe
            instances, `environments` of the current batch and `_batch_environments`).
        standalone_tools: the tools passed with `tools=` (offered with every environment, as in TRL).
    """

    def __init__(self, trainer: Any, standalone_tools: Sequence[Any] = ()):
        self.trainer = trainer
        self.factories: dict[Any, Any] = dict(trainer.environment_factories)
        self.multi = bool(trainer._multi_environment)
        probes = {name: pool[0] for name, pool in trainer._environment_pool.items()}
        self.tools: list[EnvironmentTool] = []
        seen: set[str] = set()
        standalone = list(standalone_tools)
        self._registries: dict[Any, ToolRegistry] = {}
        for name, probe in probes.items():
            own = [EnvironmentTool(getattr(probe, n)) for n in tool_names(probe)]
            self.tools += [t for t in own if t.name not in seen]
            seen.update(t.name for t in own)
            self._registries[name] = ToolRegistry(standalone + own)  # this environment's prompt schema
        self.not_replayable = sorted({type(p).__name__ for p in probes.values() if not is_replayable(p)})
        self._branch_pool: dict[Any, list[Any]] = {}

    @property
    def forkable(self) -> bool:
        return not self.not_replayable

    def fallback_warning(self) -> str:
        names = ", ".join(self.not_replayable)
        return (
            f"APPO cannot fork environment {names} ({REPLAYABLE_ATTRIBUTE} = False): training without branching "
            "(GRPO on all num_generations rollouts); remove the attribute if replaying its calls reproduces its state."
        )

    # -- roots: TRL created and reset `trainer.environments` for this batch ------------------------------------

    def root_sessions(self) -> list[EnvironmentSession]:
        return [EnvironmentSession(env) for env in self.trainer.environments]

    def tokenize_prompts(self, protocol, prompts: Sequence[Any], names: Sequence[Any] | None = None) -> list[list[int]]:
        """Each prompt rendered with its own environment's tools (TRL's per-example schema)."""
        names = list(names) if names is not None else list(self.trainer._batch_environments)
        return [protocol.tokenize_prompt(p, self._registries[n]) for p, n in zip(prompts, names, strict=True)]

    # -- branches -------------------------------------------------------------------------------------------

    def _name(self, row: dict) -> Any:
        return row.get("environment") if self.multi else None

    def _acquire(self, names: Sequence[Any]) -> list[Any]:
        """Instances for this step's branches, from a pool of their own (construct once, reset often, as TRL)."""
        cursor: dict[Any, int] = {}
        out = []
        for name in names:
            pool = self._branch_pool.setdefault(name, [])
            i = cursor.get(name, 0)
            if i == len(pool):
                pool.append(self.factories[name]())
            cursor[name] = i + 1
            out.append(pool[i])
        return out

    @contextlib.contextmanager
    def branches(self, rows: Sequence[dict]) -> Iterator[tuple[list[EnvironmentSession], list[Any]]]:
        """Reset one instance per branch with its root's row; yields (session keys, prompts as TRL built them).

        The engine replays each prefix's calls into its session (`EnvironmentTool.prime`). While the block runs,
        `trainer.environments` lists the branches' instances, so `get_reward` (and any reward function that reads
        `environments`) scores each branch on its own instance; the roots' list is restored afterwards.
        """
        names = [self._name(row) for row in rows]
        environments = self._acquire(names)
        prompts = []
        for env, row in zip(environments, rows, strict=True):
            prompt = row.get("prompt", [{"role": "user", "content": ""}])
            kwargs = {k: v for k, v in row.items() if k != "environment"} if self.multi else row
            observation = env.reset(**kwargs)
            prompts.append(_with_observation(prompt, observation))
        trainer = self.trainer
        saved = trainer.environments, getattr(trainer, "_batch_environments", None)
        trainer.environments, trainer._batch_environments = environments, names
        try:
            yield [EnvironmentSession(env) for env in environments], prompts
        finally:
            trainer.environments, trainer._batch_environments = saved


def _with_observation(prompt: Any, observation: Any) -> Any:
    """The prompt TRL generates from: `reset`'s observation appended to the last message (TRL's rule)."""
    if observation is None:
        return prompt
    content = prompt[-1]["content"]
    if isinstance(observation, list) and isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if isinstance(observation, str) and isinstance(content, list):
        observation = [{"type": "text", "text": observation}]
    return prompt[:-1] + [{**prompt[-1], "content": content + observation}]
