"""One wiring for every entry point: `trl-appo train`, `recipes/train_appo.py`, `python -m trl_appo.scripts`
and the pieces `trl-appo eval` and the demo reuse (reward registry, tools, model and dataset loading).

    trl-appo train --config cpu/demo.yaml --max_steps 20                  # installed command, any directory
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/train_appo.py --config recipes/qwen2.5-7b-instruct/qlora.yaml [--field value ...]
    accelerate launch -m trl_appo.scripts --config qwen2.5-7b-instruct/qlora.yaml   # without a checkout

Every YAML key is a field of one of three dataclasses, parsed by `trl.TrlParser` (YAML first, then command-line
overrides): `APPOScriptArguments` (below: data, rewards, tools), `trl_appo.APPOConfig` (training and every APPO
field) and `trl.ModelConfig` (model, PEFT, quantization). `--config` takes a path or the name of a shipped recipe
(`trl_appo.recipes`: `cpu/demo.yaml`, `qwen2.5-7b-instruct/qlora.yaml`, ...).

Bad input is a `RecipeError` (a `ValueError`) with a one-line message naming the fix: a missing recipe, a YAML
syntax error, an empty YAML, an unknown key (with the closest field name), a value of the wrong type, any error
raised while constructing the dataclasses (every `APPOConfig` check), a missing, empty or unreadable dataset, an
unknown tool or reward, and a `resume_from_checkpoint` that names no checkpoint. `prepare` raises all of them
before anything is written; `main` prints the line and returns 2, and `train`/`main` hold back what third-party
packages print meanwhile (`trl_appo.runtime.held_stderr`), so that line is all a user sees.

Data (`APPOScriptArguments.dataset_name`):
  * `task:tiny_arith`  — offline `What is a * b?` rows for the tiny model (`trl_appo.tasks.make_tiny_tasks`);
  * `task:tool`        — offline arithmetic + search questions over the shipped corpus (`make_tool_tasks`);
  * a folder or a `.parquet` of the ARPO/APPO release (`trl_appo.datasets.load_arpo_dataset`);
  * any other local `.jsonl/.json/.parquet/.csv` file or hub name (`trl_appo.datasets.load_dataset_any`).

Model shortcuts: `--model_name_or_path tiny_warm` is the CPU demo's SFT-warm-started ~1M model
(`trl_appo.demo.warm_tiny_model`, built once and cached; what `cpu/demo.yaml` trains); `tiny` builds the random ~30k-parameter offline tokenizer/model of
`trl_appo.testing` (CPU smoke runs and CI); anything else is loaded by the trainer from the hub or a path with
`ModelConfig.dtype` / `attn_implementation` / quantization.

Tracking: the GPU recipes set `report_to: trackio` and `project: <recipe name>` (TrainingArguments.project, read
by transformers' TrackioCallback). Without trackio installed (`pip install 'trl-appo[track]'`) the run logs to
the console only, after one warning (`fallback_report_to`).

`build_from_args` holds all of the wiring and builds nothing heavy (a hub model is only loaded by the trainer),
so tests can check every recipe on a CPU machine.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl_appo.runtime import held_stderr, quiet_known_noise, set_cpu_threads

quiet_known_noise()  # before TRL imports bitsandbytes (see trl_appo.runtime)

from trl import ModelConfig, ScriptArguments, TrlParser  # noqa: E402

from trl_appo.config import APPOConfig  # noqa: E402

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


class RecipeError(ValueError):
    """Bad recipe or flag: one line that names the fix (the CLI prints it and exits 2)."""


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())

TINY_MODEL = "tiny"
TINY_WARM_MODEL = "tiny_warm"
"""The CPU demo's ~1M-parameter model after its SFT warm start (`trl_appo.demo.warm_tiny_model`: built once, ~1 min
on 2 cores, then cached), so a CPU run shows rewards and gradients move; `tiny` is the random ~30k model."""

REWARD_FUNCS = {
    "format_f1": "format_f1_reward",
    "format_answer_type": "format_answer_type_reward",
    "answer_type": "answer_type_reward",
    "f1": "f1_reward",
    "exact_match": "exact_match_reward",
    "math_equivalence": "math_equivalence_reward",
    "accuracy": "trl.rewards.accuracy_reward",  # TRL's own: needs a `solution` column (TRL's math datasets)
    "think_format": "trl.rewards.think_format_reward",  # TRL's own: 1.0 for a leading <think>...</think>
}
"""Short names of reward functions (`trl_appo.rewards`, and TRL's `trl.rewards`); a full function name of
`trl_appo.rewards` or a dotted import path also works."""

TOOLS = ("python", "search")


def split_names(values) -> list[str]:
    """Tool names given as `python search`, `python,search`, a YAML list or one string: one flat list ('none' and
    blanks dropped)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    names = [n.strip() for v in values for n in str(v).split(",")]
    return [n for n in names if n and n != "none"]
SEARCH_BACKENDS = ("bm25", "arpo_cache", "http")


@dataclass
class APPOScriptArguments(ScriptArguments):
    """Data, reward and tool settings of `recipes/train_appo.py` (TRL's `ScriptArguments` plus the fields below)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Training data: 'task:tiny_arith' or 'task:tool' (offline generators in trl_appo.tasks), a folder "
            "or parquet file of the ARPO/APPO release, or any local .jsonl/.json/.parquet/.csv file or hub name "
            "(trl_appo.datasets.load_dataset_any)."
        },
    )
    dataset_schema: str | None = field(
        default=None,
        metadata={
            "help": "Schema of a non-ARPO file or hub dataset: 'gsm8k', 'math' or 'hotpotqa' (default: detected)."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data, same forms as dataset_name (e.g. the release's valid.parquet). Default: the "
            "dataset_test_split of dataset_name when eval_strategy is not 'no' ('heldout' for task: data)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training rows (task: data: generate N rows). None = all."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation rows."})
    num_task_examples: int = field(
        default=512, metadata={"help": "Rows per split generated for task: data when max_train_samples is unset."}
    )
    task_seed: int = field(default=0, metadata={"help": "Seed of the offline task generators."})
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System prompt for data converted from gsm8k/math/hotpotqa records and task:tool rows: 'paper' "
            "(the release's tag-protocol prompt), 'short' (a compact tag prompt), 'chat' (tools via the chat "
            "template), 'none', or literal text. Default: 'paper' for tag protocol, 'chat' otherwise. ARPO parquet "
            "files keep their own prompt."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["format_f1"],
        metadata={
            "help": f"Reward functions, summed with APPOConfig.reward_weights: {sorted(REWARD_FUNCS)} (docs/algorithm.md §6: "
            "'format_f1' is the paper's; 'format_answer_type' scores math by equivalence instead of F1), a function "
            "name of trl_appo.rewards, or a dotted import path 'pkg.module.fn'."
        },
    )
    tools: list[str] = field(
        default_factory=lambda: ["python", "search"],
        metadata={"help": f"Tools the agent may call, by name: {list(TOOLS)} (empty list: no tools)."},
    )
    python_timeout: float = field(default=10.0, metadata={"help": "Wall-clock seconds per python tool call."})
    python_memory_mb: int = field(default=2048, metadata={"help": "Address-space limit of the python sandbox."})
    search_backend: str = field(
        default="bm25",
        metadata={
            "help": "Search backend: 'bm25' (local BM25 over search_corpus, default the shipped corpus), 'arpo_cache' "
            "(replay of the release's search_cache.json at search_corpus, BM25 over its snippets for other "
            "queries), 'http' (a web-search API at search_url)."
        },
    )
    search_corpus: str | None = field(
        default=None,
        metadata={"help": "bm25: a JSONL corpus (id, title, text); arpo_cache: the search_cache.json path."},
    )
    search_url: str | None = field(default=None, metadata={"help": "http backend: the API endpoint."})
    search_api_key_env: str | None = field(
        default=None, metadata={"help": "http backend: environment variable holding the bearer token."}
    )
    search_cache: str | None = field(
        default=None, metadata={"help": "sqlite file caching search results across runs and processes (None: off)."}
    )
    search_top_k: int = field(default=5, metadata={"help": "Search hits returned per query."})

    def __post_init__(self):
        self.tools = split_names(self.tools)
        for name in self.tools:
            if name not in TOOLS:
                raise RecipeError(f"Unknown tool {name!r} in tools={self.tools}; choose from {list(TOOLS)} (written "
                                  "`--tools python search` or `--tools python,search`).")
        if self.search_backend not in SEARCH_BACKENDS:
            raise RecipeError(f"search_backend={self.search_backend!r}; choose one of {list(SEARCH_BACKENDS)}.")
        if "search" in self.tools and self.search_backend == "arpo_cache" and not self.search_corpus:
            raise RecipeError(
                "search_backend='arpo_cache' needs search_corpus=<path to the release's search_cache.json>."
            )
        if "search" in self.tools and self.search_backend == "http" and not self.search_url:
            raise RecipeError("search_backend='http' needs search_url.")


@dataclass
class Recipe:
    """Everything `APPOTrainer` needs, built from the parsed arguments (see `build_from_args`)."""

    model: Any  # a model id/path (loaded by the trainer) or a model object (the `tiny` shortcut)
    processing_class: Any
    reward_funcs: list
    train_dataset: Any
    eval_dataset: Any
    tools: list
    args: APPOConfig
    peft_config: Any = None
    quantization_config: Any = None

    def trainer(self, **kwargs):
        """Construct the `APPOTrainer` (loads the model when `model` is a name)."""
        from trl_appo.trainer import APPOTrainer

        model = self.model
        if model == TINY_WARM_MODEL:
            from trl_appo.demo import warm_tiny_model

            model = warm_tiny_model()[0]
        return APPOTrainer(
            model=model,
            reward_funcs=self.reward_funcs,
            args=self.args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=self.processing_class,
            peft_config=self.peft_config,
            quantization_config=self.quantization_config,
            tools=self.tools,
            **kwargs,
        )


class _RecipeParser(TrlParser):
    """`TrlParser` whose argparse errors (a bad flag value, a flag without its value) are one-line `RecipeError`s."""

    def error(self, message):  # argparse would print the whole usage and exit
        raise RecipeError(f"{_one_line(message)}; fix that flag (`trl-appo train --help_all` lists every field)")

    def format_help(self):
        """TRL's help with `--config` (handled by TrlParser, not an argparse option) first and a short usage."""
        text = super().format_help()
        body = text.split("\n\n", 1)[1] if "\n\n" in text else text
        config = ("  --config RECIPE       Recipe YAML: a path or a shipped name such as cpu/demo.yaml (`trl-appo "
                  "recipes`);\n                        every --field below overrides it.\n")
        body = body.replace("options:\n", "options:\n" + config, 1) if "options:\n" in body else config + body
        return f"usage: {self.prog} --config RECIPE [--field value ...]\n\n{body}"


def make_parser(prog: str | None = None) -> TrlParser:
    parser = _RecipeParser((APPOScriptArguments, APPOConfig, ModelConfig))
    if prog:
        parser.prog = prog
    return parser


def read_recipe(name: str | os.PathLike) -> tuple[Path, dict]:
    """(resolved path, mapping) of a recipe YAML: a path, or a shipped name (`trl_appo.recipes.find_recipe`).

    Raises `RecipeError` for a missing file, a YAML syntax error, an empty file and a YAML that is not a mapping.
    """
    import yaml

    from trl_appo.recipes import find_recipe

    path = find_recipe(name)
    if path is None:
        raise RecipeError(f"recipe not found: {name} (pass a YAML path, or a shipped recipe name such as "
                          "cpu/demo.yaml; `trl-appo recipes` lists them)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {name}: {_one_line(e)}") from e
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e
        raise RecipeError(f"YAML syntax error in {name}{where}: {_one_line(problem)}; fix the YAML there "
                          "(one `field: value` per line, indented with spaces)") from e
    if config is None:
        raise RecipeError(f"recipe {name} is empty: write `field: value` lines (copy a shipped one with "
                          "`trl-appo recipes --copy DIR`, e.g. cpu/demo.yaml)")
    if not isinstance(config, dict):
        raise RecipeError(f"recipe {name} must be a YAML mapping of `field: value` lines, not a "
                          f"{type(config).__name__}; fix the YAML")
    return path, config


def _type_name(action) -> str | None:
    typ = action.type
    if typ in (int, float):
        return typ.__name__
    if getattr(typ, "__name__", "") == "string_to_bool":
        return "bool"
    return None


def _value_ok(value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in
                                           ("yes", "no", "true", "false", "y", "n", "t", "f", "1", "0"))
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        converted = float(value) if kind == "float" else int(value) if not isinstance(value, float) else value
    except ValueError:
        return False
    return not (kind == "int" and isinstance(converted, float) and not converted.is_integer())


def check_recipe(parser, config: dict, name: str | os.PathLike = "the recipe") -> None:
    """Refuse what TrlParser would pass on unchecked (it sets YAML values as argparse defaults, so no type or
    choice check runs on them): an unknown key (with the closest field name), a list/mapping where one number or
    bool is expected, a non-number for a number field, a value outside a field's choices."""
    actions = {}
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list; the first is --field, not --no_field
        if action.dest != "help":
            actions.setdefault(action.dest, action)
    unknown = [k for k in config if k not in actions and k != "env"]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(actions), n=1)
        hint = f"did you mean {close[0]!r}? Rename it" if close else "remove it or fix its spelling"
        more = f" (also unknown: {', '.join(map(str, unknown[1:]))})" if len(unknown) > 1 else ""
        raise RecipeError(f"unknown recipe key {key!r} in {name}: {hint}{more}; `trl-appo train --help_all` lists "
                          "every field")
    for key, value in config.items():
        action = actions.get(key)
        if action is None or value is None:
            continue
        kind = _type_name(action)
        is_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
        if kind is not None:
            if isinstance(value, dict) or (isinstance(value, list) and not is_list):
                bad = True
            else:
                bad = any(not _value_ok(v, kind) for v in (value if isinstance(value, list) else [value]))
            if bad:
                what = f"{kind} values" if is_list else f"one {kind}"
                example = action.default if action.default is not None and not is_list else 1
                raise RecipeError(f"recipe key {key!r} in {name} must be {what}, got {value!r}; write e.g. "
                                  f"`{key}: {example}`")
        if action.choices and not isinstance(value, (list, dict)):
            choices = [str(getattr(c, "value", c)) for c in action.choices]
            if str(getattr(value, "value", value)) not in choices:
                raise RecipeError(f"recipe key {key!r} in {name} is {value!r}; choose one of {choices}")


def _split_config(argv: list[str]) -> tuple[list[str], str | None]:
    out, config = [], None
    it = iter(argv)
    for token in it:
        if token == "--config":
            config = next(it, None)
            if config is None:
                raise RecipeError("--config needs a value: a recipe YAML path or a shipped name such as cpu/demo.yaml")
        elif token.startswith("--config="):
            config = token.split("=", 1)[1]
        else:
            out.append(token)
    return out, config


def parse_args(argv: list[str] | None = None) -> tuple[APPOScriptArguments, APPOConfig, ModelConfig]:
    """Parse `--config recipe.yaml` plus command-line overrides (`--field value`) into the three dataclasses.

    `--config` takes a path or a shipped recipe name. Every user error is a one-line `RecipeError`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, config_name = _split_config(argv)
    parser = make_parser()
    if config_name is not None:
        path, config = read_recipe(config_name)
        check_recipe(parser, config, config_name)
        rest = ["--config", str(path), *rest]
    try:
        with warnings.catch_warnings():
            # GRPOConfig's own default (gradient_checkpointing=True) trips transformers' rename warning on every
            # construction; nothing a recipe can fix while the transformers range predates the new name.
            warnings.filterwarnings("ignore", message=r"`gradient_checkpointing\w*` is deprecated",
                                    category=FutureWarning)
            return parser.parse_args_and_config(rest)
    except RecipeError:
        raise
    except (ValueError, TypeError) as e:  # dataclass construction: APPOConfig / GRPOConfig / ModelConfig checks
        message = _one_line(e)
        if message.startswith("Some specified arguments are not used"):
            raise RecipeError(f"unknown flag(s): {message.split(':', 1)[1].strip()}; fix the spelling "
                              "(`trl-appo train --help_all` lists every field)") from e
        raise RecipeError(f"invalid settings: {message}") from e


def fallback_report_to(training_args: APPOConfig) -> list[str]:
    """Drop `report_to` trackers that are not installed (trackio, tensorboard), with one warning naming the extra.

    Returns the names dropped. transformers would otherwise fail at trainer construction.
    """
    from transformers.integrations import is_tensorboard_available

    available = {"trackio": lambda: importlib.util.find_spec("trackio") is not None,
                 "tensorboard": is_tensorboard_available}
    report_to = list(training_args.report_to or [])
    missing = [r for r in report_to if r in available and not available[r]()]
    if missing:
        warnings.warn(f"report_to={report_to}: {', '.join(missing)} not installed, so this run logs to the console "
                      "only; pip install 'trl-appo[track]' to track it", UserWarning, stacklevel=2)
        training_args.report_to = [r for r in report_to if r not in missing]
    return missing


# ------------------------------------------------------------------------------------------------ rewards, tools


def build_reward_funcs(names: list[str]) -> list:
    """Reward functions by short name (`REWARD_FUNCS`), `trl_appo.rewards` function name, or dotted import path."""
    from trl_appo import rewards

    funcs = []
    for name in names:
        attr = REWARD_FUNCS.get(name, name)
        if hasattr(rewards, attr) and callable(getattr(rewards, attr)):
            funcs.append(getattr(rewards, attr))
        elif "." in attr:
            module, fn = attr.rsplit(".", 1)
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                funcs.append(getattr(importlib.import_module(module), fn))
            except (ImportError, AttributeError) as e:
                raise RecipeError(f"reward function {name!r} cannot be imported ({_one_line(e)}); fix the dotted "
                                  "path 'pkg.module.fn' (relative to the working directory) or use a short name "
                                  f"{sorted(REWARD_FUNCS)}") from e
        else:
            raise RecipeError(
                f"Unknown reward function {name!r}. Use one of {sorted(REWARD_FUNCS)}, a function of "
                "trl_appo.rewards, or a dotted import path 'pkg.module.fn'."
            )
    return funcs


def reward_by_name(name: str):
    """One reward function by name (see `build_reward_funcs`)."""
    return build_reward_funcs([name])[0]


def make_tools(
    names,
    *,
    python_timeout: float = 10.0,
    python_memory_mb: int = 2048,
    search_backend: str = "bm25",
    search_corpus: str | None = None,
    search_url: str | None = None,
    search_api_key_env: str | None = None,
    search_cache: str | None = None,
    search_top_k: int = 5,
) -> list:
    """`PythonTool` / `SearchTool` objects by name (`TOOLS`; 'none' and blanks are skipped)."""
    tools = []
    for name in split_names(names):
        if name == "python":
            from trl_appo.tools.python import PythonTool, SandboxUnavailable

            try:
                tools.append(PythonTool(timeout=python_timeout, memory_mb=python_memory_mb))
            except SandboxUnavailable as e:  # fail closed, as one line that names the fix
                raise RecipeError(str(e).replace("\n", " ")) from e
        elif name == "search":
            from trl_appo.tools import search

            if search_backend == "bm25":
                backend = search.BM25Backend.from_file(search_corpus) if search_corpus else search.BM25Backend.default()
            elif search_backend == "arpo_cache":
                backend = search.ARPOCacheBackend(search_corpus)
            else:
                backend = search.HTTPSearchBackend(search_url, api_key_env=search_api_key_env)
            try:
                tools.append(search.SearchTool(backend=backend, top_k=search_top_k, cache=search_cache))
            except search.SearchCacheError as e:  # a directory or an unusable file at search_cache: one line
                raise RecipeError(str(e)) from e
        else:
            raise RecipeError(f"Unknown tool {name!r}; choose from {list(TOOLS)} (or 'none'), written "
                              "`--tools python search` or `--tools python,search`.")
    return tools


def build_tools(script_args: APPOScriptArguments) -> list:
    """`PythonTool` / `SearchTool` objects for the names in `script_args.tools`."""
    return make_tools(
        script_args.tools,
        python_timeout=script_args.python_timeout,
        python_memory_mb=script_args.python_memory_mb,
        search_backend=script_args.search_backend,
        search_corpus=script_args.search_corpus,
        search_url=script_args.search_url,
        search_api_key_env=script_args.search_api_key_env,
        search_cache=script_args.search_cache,
        search_top_k=script_args.search_top_k,
    )


# ------------------------------------------------------------------------------------------------ data


def _system_prompt(script_args: APPOScriptArguments, training_args: APPOConfig) -> str | None:
    from trl_appo import datasets as appo_datasets
    from trl_appo import tasks

    choice = script_args.system_prompt
    if choice is None:
        choice = "paper" if training_args.tool_protocol == "tags" else "chat"
    named = {
        "paper": appo_datasets.TAG_PROTOCOL_SYSTEM_PROMPT,
        "short": tasks.SHORT_TAG_SYSTEM_PROMPT,
        "chat": tasks.CHAT_SYSTEM_PROMPT,
        "none": None,
    }
    return named.get(choice, choice)


def _load(name: str, split: str, limit: int | None, script_args, training_args):
    from trl_appo import datasets as appo_datasets
    from trl_appo import tasks

    if name.startswith("task:"):
        kind = name.split(":", 1)[1]
        n = limit or script_args.num_task_examples
        task_split = "heldout" if split not in ("train",) else "train"
        if kind == "tiny_arith":
            data = tasks.make_tiny_tasks(n, n, seed=script_args.task_seed)
        elif kind in ("tool", "arith", "search"):
            kinds = ("arith", "search") if kind == "tool" else (kind,)
            protocol = "tag" if training_args.tool_protocol == "tags" else "chat"
            data = tasks.make_tool_tasks(
                n, n, seed=script_args.task_seed, kinds=kinds, protocol=protocol,
                system_prompt=_system_prompt(script_args, training_args) if script_args.system_prompt else None,
            )
        else:
            raise RecipeError(f"Unknown task generator {name!r}; use 'task:tiny_arith', 'task:tool', 'task:arith' or "
                             "'task:search'.")
        return data[task_split]
    refuse_empty_file(name)
    try:
        data = _load_any(appo_datasets, name, split, limit, script_args, training_args)
    except RecipeError:
        raise
    except FileNotFoundError as e:
        raise RecipeError(f"dataset {name!r} not found ({_one_line(e)}); fix dataset_name / eval_dataset_name "
                          "(a local file or folder, or task:tiny_arith / task:tool)") from e
    except ConnectionError as e:
        raise RecipeError(_one_line(e)) from e
    except (ValueError, KeyError) as e:  # unknown columns, a schema that does not fit, a missing split
        raise RecipeError(f"dataset {name!r} cannot be read for training: {_one_line(e)}; fix its columns or set "
                          "dataset_schema") from e
    if len(data) == 0:
        raise RecipeError(f"dataset {name!r} has no rows: it needs rows with a prompt and a ground_truth")
    return data


def refuse_empty_file(name: str) -> None:
    """An empty .jsonl/.json/.csv file is one line of bad input, not a parser traceback."""
    path = Path(name)
    if path.is_file() and path.suffix in (".jsonl", ".json", ".csv") and not path.read_text(errors="replace").strip():
        raise RecipeError(f"dataset {name} is empty: write one row per line with a prompt and a ground_truth")


def _load_any(appo_datasets, name, split, limit, script_args, training_args):
    return appo_datasets.load_dataset_any(
        name,
        split=split,
        schema=script_args.dataset_schema,
        limit=limit,
        system_prompt=_system_prompt(script_args, training_args),
        **({"name": script_args.dataset_config} if script_args.dataset_config else {}),
    )


def build_datasets(script_args: APPOScriptArguments, training_args: APPOConfig):
    """(train_dataset, eval_dataset or None) in the schema of `trl_appo.datasets` (prompt, ground_truth, ...)."""
    if not script_args.dataset_name:
        raise RecipeError("Set dataset_name (e.g. 'task:tiny_arith', or the ARPO release's train_10k.parquet).")
    train = _load(script_args.dataset_name, script_args.dataset_train_split, script_args.max_train_samples,
                  script_args, training_args)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        name = script_args.eval_dataset_name or script_args.dataset_name
        split = script_args.dataset_test_split
        eval_dataset = _load(name, split, script_args.max_eval_samples, script_args, training_args)
    return train, eval_dataset


# ------------------------------------------------------------------------------------------------ model


def kbit_device_map() -> dict[str, int] | None:
    """Place a k-bit model on this process's GPU (TRL < 1.x exported this as `get_kbit_device_map`)."""
    import torch
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def build_model(model_args: ModelConfig, training_args: APPOConfig):
    """(model, processing_class, quantization_config, peft_config).

    For a hub id or path the model stays a string: the trainer loads it with `training_args.model_init_kwargs`
    (filled here from ModelConfig, as TRL's own scripts do), so nothing heavy happens in this function.
    """
    from trl import get_peft_config, get_quantization_config

    peft_config = get_peft_config(model_args)
    quantization_config = get_quantization_config(model_args)
    if model_args.model_name_or_path == TINY_MODEL:
        from trl_appo.testing import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        return build_tiny_model(tokenizer, seed=training_args.seed), tokenizer, None, peft_config
    if model_args.model_name_or_path == TINY_WARM_MODEL:  # the weights are made (once) when the trainer is built
        from trl_appo.demo import MINI_CHAT_TEMPLATE
        from trl_appo.testing import build_tiny_tokenizer

        return TINY_WARM_MODEL, build_tiny_tokenizer(chat_template=MINI_CHAT_TEMPLATE), None, peft_config
    if not model_args.model_name_or_path:
        raise RecipeError("Set model_name_or_path (a hub id, a local path, or 'tiny').")
    init = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if quantization_config is not None:
        init["device_map"] = kbit_device_map()
    init = {k: v for k, v in init.items() if v is not None}
    init.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = init
    return model_args.model_name_or_path, None, quantization_config, peft_config


def build_from_args(
    script_args: APPOScriptArguments,
    training_args: APPOConfig,
    model_args: ModelConfig,
    *,
    with_data: bool = True,
    with_tools: bool = True,
) -> Recipe:
    """Wire a `Recipe` from parsed arguments; `with_data` / `with_tools` False skip loading data / starting tools
    (used by tests that only check a recipe is consistent)."""
    fallback_report_to(training_args)
    model, processing_class, quantization_config, peft_config = build_model(model_args, training_args)
    train, eval_dataset = build_datasets(script_args, training_args) if with_data else (None, None)
    return Recipe(
        model=model,
        processing_class=processing_class,
        reward_funcs=build_reward_funcs(script_args.reward_funcs),
        train_dataset=train,
        eval_dataset=eval_dataset,
        tools=build_tools(script_args) if with_tools else [],
        args=training_args,
        peft_config=peft_config,
        quantization_config=quantization_config,
    )


# ------------------------------------------------------------------------------------------------ eval helpers

GOLD_COLUMNS = ("ground_truth", "reward_model", "solution")


def load_pretrained(name: str, seed: int = 0):
    """(model, tokenizer) for evaluation: a local `save_pretrained` folder, `tiny` or `smollm2` (offline)."""
    if name == "smollm2":
        from trl_appo.models import ModelNotAvailableError, load_smollm2

        try:
            return load_smollm2()
        except ModelNotAvailableError as e:
            raise RecipeError(_one_line(e)) from e
    if name == TINY_MODEL:
        from trl_appo.testing import build_tiny_model, build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        return build_tiny_model(tok, seed=seed), tok
    if name == TINY_WARM_MODEL:
        from trl_appo.demo import warm_tiny_model

        return warm_tiny_model()
    path = Path(name)
    if not path.exists():
        raise RecipeError(f"model not found: {name} (pass a local directory written by save_pretrained, tiny or "
                          "smollm2)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    try:
        # Keeps a hand-made tokenizer's pipeline as saved (AutoTokenizer may rebuild it for qwen2 configs).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception:  # noqa: BLE001 - fall back to the auto class (sentencepiece etc.)
        tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def trained_settings(model: str) -> dict:
    """The rollout settings a model folder was trained with (`appo_settings.json`, written by APPOTrainer when it
    saves), or {}."""
    import json

    path = Path(model) / "appo_settings.json"  # trl_appo.trainer.APPO_SETTINGS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def trained_max_completion_length(model: str) -> int | None:
    value = trained_settings(model).get("max_completion_length")
    return value if isinstance(value, int) and value > 0 else None


def load_eval_dataset(name: str, split: str | None = None, default_split: str = "heldout"):
    """A `datasets.Dataset` from `task:tiny_arith` / `task:tool`, a `save_to_disk` folder or a
    .jsonl/.json/.parquet/.csv file; refuses a missing, empty or row-less source and one without the
    `prompt` and gold columns."""
    if name.startswith("task:"):
        from trl_appo import tasks

        kind = name.split(":", 1)[1]
        if kind == "tiny_arith":
            dd = tasks.make_tiny_tasks(64, 64)
        elif kind == "tool":
            dd = tasks.make_tool_tasks(64, 64)
        else:
            raise RecipeError(f"unknown task {name!r}; use task:tiny_arith or task:tool")
        key = split or default_split
        if key not in dd:
            raise RecipeError(f"split {key!r} not in {list(dd)}; pass --split with one of them")
        return dd[key]
    path = Path(name)
    if not path.exists():
        raise RecipeError(f"dataset not found: {name}")
    import datasets as hf_datasets

    if path.is_dir():
        ds = hf_datasets.load_from_disk(str(path))
    else:
        fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if fmt is None:
            raise RecipeError(f"unsupported dataset file {path.name}: use .jsonl, .json, .parquet or .csv")
        refuse_empty_file(name)
        ds = hf_datasets.load_dataset(fmt, data_files=str(path), split="train")
    if isinstance(ds, hf_datasets.DatasetDict):
        key = split or next((s for s in ("heldout", "test", "validation", "train") if s in ds), None)
        if key not in ds:
            raise RecipeError(f"split {split!r} not in {list(ds)}; pass --split with one of them")
        ds = ds[key]
    if len(ds) == 0:
        raise RecipeError(f"dataset {name} has no rows: it needs rows with a prompt and a ground_truth")
    check_eval_columns(ds)
    return ds


def check_eval_columns(ds) -> None:
    cols = list(ds.column_names)
    missing = []
    if "prompt" not in cols:
        missing.append("prompt")
    if not any(c in cols for c in GOLD_COLUMNS):
        missing.append("one of " + "/".join(GOLD_COLUMNS))
    if missing:
        raise RecipeError(f"dataset is missing column(s): {', '.join(missing)} (it has: {', '.join(cols)})")


# ------------------------------------------------------------------------------------------------ entry points


def check_resume(training_args: APPOConfig) -> None:
    """Refuse a `resume_from_checkpoint` that names no checkpoint, before anything is created."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", False):
        return
    if str(value).lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        out = Path(training_args.output_dir)
        if not out.is_dir() or get_last_checkpoint(str(out)) is None:
            raise RecipeError(f"resume_from_checkpoint=true but {out} holds no checkpoint-N folder; train without "
                              "it first (save_strategy steps/epoch), or pass the path of a checkpoint folder")
        training_args.resume_from_checkpoint = True
        return
    path = Path(str(value))
    if not path.is_dir():
        raise RecipeError(f"resume_from_checkpoint {value}: no such checkpoint folder; pass a checkpoint-N folder of "
                          "an earlier run (e.g. runs/cpu-demo/checkpoint-4), 'true' for the latest in output_dir, or "
                          "drop the flag")
    if not any((path / name).exists() for name in ("trainer_state.json", "model.safetensors",
                                                    "adapter_model.safetensors", "pytorch_model.bin")):
        raise RecipeError(f"resume_from_checkpoint {value} is a folder but not a checkpoint (no trainer_state.json); "
                          "pass a checkpoint-N folder written by a run with save_strategy steps or epoch")


def _accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or (
        torch.backends.mps.is_available())


def prepare(argv: list[str] | None = None):
    """Parse, check, wire and construct the trainer: (trainer, script_args, training_args).

    Every bad input raises `RecipeError` here, before the output directory or anything else is written.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    script_args, training_args, model_args = parse_args(argv)
    check_resume(training_args)
    if model_args.model_name_or_path in (TINY_MODEL, TINY_WARM_MODEL):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe = build_from_args(script_args, training_args, model_args)
    if training_args.use_cpu or not _accelerator_available():
        print(set_cpu_threads()[1], flush=True)  # a CPU run: as many threads as the load leaves free
    trainer = recipe.trainer()
    return trainer, script_args, training_args


def run(trainer, script_args, training_args):
    """Train, save state and model (and push when asked); returns the trainer."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # <output_dir>/trainer_state.json: log history for trl_appo.viz.plot_learning_curves
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    return trainer


def train(argv: list[str] | None = None):
    """Parse, wire, train, save; returns the trainer. Bad input raises `RecipeError` (nothing else on stderr)."""
    with held_stderr(discard_on=(RecipeError,)):
        prepared = prepare(argv)
    return run(*prepared)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry (`python -m trl_appo.scripts`, `recipes/train_appo.py`): exit code 2 and one line on
    stderr for bad input, 0 after training (`trl_appo.cli.train_script_main`)."""
    from trl_appo.cli import train_script_main

    return train_script_main(argv, prog=prog or os.path.basename(sys.argv[0] or "train_appo"))


if __name__ == "__main__":
    sys.exit(main(prog="python -m trl_appo.scripts"))
