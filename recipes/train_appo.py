"""Train a tool-using agent with APPO: one script for every recipe under recipes/.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/train_appo.py --config recipes/qwen2.5-7b-instruct/qlora.yaml [--field value ...]

    python recipes/train_appo.py --config recipes/cpu/demo.yaml          # tiny CPU run, no GPU, no downloads

Every YAML key is a field of one of three dataclasses, parsed by `trl.TrlParser` (YAML first, then command-line
overrides): `APPOScriptArguments` (below: data, rewards, tools), `trl_appo.APPOConfig` (training and every APPO
field) and `trl.ModelConfig` (model, PEFT, quantization). An unknown key is an error, so a typo cannot silently
fall back to a default. `python recipes/train_appo.py --help` lists every field with its help text.

Data (`APPOScriptArguments.dataset_name`):
  * `task:tiny_arith`  — offline `What is a * b?` rows for the tiny model (`trl_appo.tasks.make_tiny_tasks`);
  * `task:tool`        — offline arithmetic + search questions over the shipped corpus (`make_tool_tasks`);
  * a folder or a `.parquet` of the ARPO/APPO release (`trl_appo.datasets.load_arpo_dataset`);
  * any other local `.jsonl/.json/.parquet/.csv` file or hub name (`trl_appo.datasets.load_dataset_any`).

Model shortcut: `--model_name_or_path tiny` builds the ~30k-parameter offline tokenizer/model of
`trl_appo.testing` (CPU smoke runs and CI); anything else is loaded by the trainer from the hub or a path with
`ModelConfig.dtype` / `attn_implementation` / quantization.

`build_from_args` holds all of the wiring and builds nothing heavy (a hub model is only loaded by the trainer),
so tests can check every recipe on a CPU machine.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments, TrlParser

from trl_appo.config import APPOConfig

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny"

REWARD_FUNCS = {
    "format_f1": "format_f1_reward",
    "format_answer_type": "format_answer_type_reward",
    "answer_type": "answer_type_reward",
    "f1": "f1_reward",
    "exact_match": "exact_match_reward",
    "math_equivalence": "math_equivalence_reward",
}
"""Short names of `trl_appo.rewards` functions; a full function name or a dotted import path also works."""

TOOLS = ("python", "search")
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
        metadata={"help": "Schema of a non-ARPO file or hub dataset: 'gsm8k', 'math' or 'hotpotqa' (default: detected)."},
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
            "help": f"Reward functions, summed with APPOConfig.reward_weights: {sorted(REWARD_FUNCS)} (APPO_SPEC §6: "
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
        for name in self.tools:
            if name not in TOOLS:
                raise ValueError(f"Unknown tool {name!r} in tools={self.tools}; choose from {list(TOOLS)}.")
        if self.search_backend not in SEARCH_BACKENDS:
            raise ValueError(f"search_backend={self.search_backend!r}; choose one of {list(SEARCH_BACKENDS)}.")
        if "search" in self.tools and self.search_backend == "arpo_cache" and not self.search_corpus:
            raise ValueError("search_backend='arpo_cache' needs search_corpus=<path to the release's search_cache.json>.")
        if "search" in self.tools and self.search_backend == "http" and not self.search_url:
            raise ValueError("search_backend='http' needs search_url.")


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

        return APPOTrainer(
            model=self.model,
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


def make_parser() -> TrlParser:
    return TrlParser((APPOScriptArguments, APPOConfig, ModelConfig))


def parse_args(argv: list[str] | None = None) -> tuple[APPOScriptArguments, APPOConfig, ModelConfig]:
    """Parse `--config recipe.yaml` plus command-line overrides (`--field value`) into the three dataclasses."""
    return make_parser().parse_args_and_config(argv)


# ------------------------------------------------------------------------------------------------ rewards, tools


def build_reward_funcs(names: list[str]) -> list:
    """Reward functions by short name (`REWARD_FUNCS`), `trl_appo.rewards` function name, or dotted import path."""
    from trl_appo import rewards

    funcs = []
    for name in names:
        attr = REWARD_FUNCS.get(name, name)
        if hasattr(rewards, attr) and callable(getattr(rewards, attr)):
            funcs.append(getattr(rewards, attr))
        elif "." in name:
            module, fn = name.rsplit(".", 1)
            sys.path.insert(0, os.getcwd())
            funcs.append(getattr(importlib.import_module(module), fn))
        else:
            raise ValueError(
                f"Unknown reward function {name!r}. Use one of {sorted(REWARD_FUNCS)}, a function of "
                "trl_appo.rewards, or a dotted import path 'pkg.module.fn'."
            )
    return funcs


def build_tools(script_args: APPOScriptArguments) -> list:
    """`PythonTool` / `SearchTool` objects for the names in `script_args.tools`."""
    tools = []
    for name in script_args.tools:
        if name == "python":
            from trl_appo.tools.python import PythonTool

            tools.append(PythonTool(timeout=script_args.python_timeout, memory_mb=script_args.python_memory_mb))
        elif name == "search":
            from trl_appo.tools import search

            if script_args.search_backend == "bm25":
                backend = (
                    search.BM25Backend.from_file(script_args.search_corpus)
                    if script_args.search_corpus
                    else search.BM25Backend.default()
                )
            elif script_args.search_backend == "arpo_cache":
                backend = search.ARPOCacheBackend(script_args.search_corpus)
            else:
                backend = search.HTTPSearchBackend(script_args.search_url, api_key_env=script_args.search_api_key_env)
            tools.append(
                search.SearchTool(backend=backend, top_k=script_args.search_top_k, cache=script_args.search_cache)
            )
    return tools


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
            raise ValueError(f"Unknown task generator {name!r}; use 'task:tiny_arith', 'task:tool', 'task:arith' or "
                             "'task:search'.")
        return data[task_split]
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
        raise ValueError("Set dataset_name (e.g. 'task:tiny_arith', or the ARPO release's train_10k.parquet).")
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
    if not model_args.model_name_or_path:
        raise ValueError("Set model_name_or_path (a hub id, a local path, or 'tiny').")
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


def main(argv: list[str] | None = None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    script_args, training_args, model_args = parse_args(argv)
    if model_args.model_name_or_path == TINY_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe = build_from_args(script_args, training_args, model_args)
    trainer = recipe.trainer()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # <output_dir>/trainer_state.json: log history for trl_appo.viz.plot_learning_curves
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    return trainer


if __name__ == "__main__":
    main()
