"""recipes/: every YAML parses into APPOScriptArguments / APPOConfig / ModelConfig and builds on CPU (no 7B model is
loaded), the headers keep their promises, accelerate configs load, and the CPU demo trains end to end."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TRAINING_YAMLS = sorted(p for p in RECIPES.glob("*/*.yaml") if p.parent.name != "accelerate")
ACCELERATE_YAMLS = sorted((RECIPES / "accelerate").glob("*.yaml"))
GPU_YAMLS = [p for p in TRAINING_YAMLS if p.parent.name != "cpu"]
ARPO = ROOT.parent / "shared" / "data" / "arpo"


def ids(paths):
    return [str(p.relative_to(RECIPES)) for p in paths]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_appo", RECIPES / "train_appo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_appo"] = module
    spec.loader.exec_module(module)
    return module


def test_every_expected_recipe_exists():
    expected = {
        "cpu/demo.yaml",
        "qwen2.5-7b-instruct/lora.yaml",
        "qwen2.5-7b-instruct/qlora.yaml",
        "qwen2.5-7b-instruct/multi_gpu_vllm_server.yaml",
        "qwen3-8b/qlora.yaml",
        "llama-3.1-8b-instruct/qlora.yaml",
    }
    assert expected <= set(ids(TRAINING_YAMLS))
    assert {p.stem for p in ACCELERATE_YAMLS} >= {"single_gpu", "multi_gpu_ddp", "deepspeed_zero2", "deepspeed_zero3",
                                                   "fsdp2"}


@pytest.mark.parametrize("path", TRAINING_YAMLS, ids=ids(TRAINING_YAMLS))
def test_recipe_header_states_memory_and_paper_hyperparameters(path):
    text = path.read_text()
    header = text.split("\n\n")[0]
    assert header.startswith("# ")
    assert "memory" in header.lower()
    assert "follows:" in text and "departs:" in text
    assert isinstance(yaml.safe_load(text), dict)


def cpu_overrides(path):
    """Make a GPU recipe constructible on this CPU machine without downloads: no bf16, CPU, the shared ARPO data
    (a few rows) when present, else no data and the shipped BM25 corpus for search."""
    args = ["--config", str(path), "--bf16", "false", "--use_cpu", "true"]
    if path.parent.name == "cpu":
        return args, True
    config = yaml.safe_load(path.read_text())
    if ARPO.exists():
        args += ["--dataset_name", str(ARPO / Path(config["dataset_name"]).name), "--max_train_samples", "16"]
        if config.get("search_backend") == "arpo_cache":
            args += ["--search_corpus", str(ARPO / "search_cache.json")]
        return args, True
    return args + ["--search_backend", "bm25", "--search_corpus", ""], False


@pytest.mark.parametrize("path", TRAINING_YAMLS, ids=ids(TRAINING_YAMLS))
def test_recipe_builds_on_cpu(script, path, tmp_path):
    argv, with_data = cpu_overrides(path)
    script_args, training_args, model_args = script.parse_args(argv + ["--output_dir", str(tmp_path)])
    config = yaml.safe_load(path.read_text())

    # YAML values reach the dataclasses (spot check every key that is not overridden above).
    merged = {**vars(script_args), **training_args.to_dict(), **vars(model_args)}
    overridden = {"bf16", "use_cpu", "output_dir", "dataset_name", "search_corpus", "search_backend",
                  "report_to"}  # report_to 'none' becomes []
    for key, value in config.items():
        if key in overridden:
            continue
        got = merged[key]
        got = getattr(got, "value", got)  # enums (lr_scheduler_type, save_strategy, ...)
        assert got == value or str(got) == str(value), (key, got, value)

    # The paper's budget split and loss constants, which every header claims to follow (docs/algorithm.md §5).
    assert (training_args.num_roots, training_args.num_branches, training_args.num_generations) == (4, 3, 16)
    assert training_args.temperature == 1.0 and training_args.beta == 0.0
    assert (training_args.epsilon, training_args.epsilon_high, training_args.delta) == (0.2, 0.28, 3.0)
    assert training_args.future_kl_decay == 64 and training_args.future_kl_clip == 0.2
    assert training_args.future_kl_weight == 1.0 and training_args.reward_scale_discount == 0.9
    assert training_args.future_kl_normalize is False  # the paper's unnormalised weight
    assert training_args.branch_schedule == "per_update" and training_args.tool_protocol == "tags"
    if path in GPU_YAMLS:
        steps = training_args.steps_per_generation // training_args.gradient_accumulation_steps
        assert 6 <= steps <= 8, "paper: 6-8 optimizer steps per generation batch"
        assert 3 <= training_args.max_tool_calls <= 6, "paper: tool-call limit 3-6"
        lr_full = 1e-6
        if model_args.use_peft:
            assert training_args.learning_rate > lr_full
        else:
            assert training_args.learning_rate == lr_full

    recipe = script.build_from_args(script_args, training_args, model_args, with_data=with_data)
    assert recipe.reward_funcs and all(callable(f) for f in recipe.reward_funcs)
    assert [t.name for t in recipe.tools] == script_args.tools
    assert (recipe.peft_config is not None) == bool(config.get("use_peft"))
    assert (recipe.quantization_config is not None) == bool(config.get("load_in_4bit"))
    if recipe.quantization_config is not None:
        assert recipe.quantization_config.bnb_4bit_quant_type == "nf4"
    if path.parent.name == "cpu":  # the warm-started tiny model is made (once, cached) when the trainer is built
        assert recipe.model == "tiny_warm" and recipe.processing_class is not None
    else:
        assert recipe.model == config["model_name_or_path"]  # loaded by the trainer, never here
        assert training_args.model_init_kwargs["dtype"] == "bfloat16"
    if with_data:
        assert len(recipe.train_dataset) > 0
        assert {"prompt", "ground_truth"} <= set(recipe.train_dataset.column_names)


def test_command_line_overrides_the_yaml(script, tmp_path):
    s, a, m = script.parse_args(["--config", str(RECIPES / "cpu" / "demo.yaml"), "--learning_rate", "3e-4",
                                 "--num_generations", "8", "--num_roots", "4", "--num_branches", "1",
                                 "--per_device_train_batch_size", "8", "--tools", "python", "search",
                                 "--output_dir", str(tmp_path)])
    assert a.learning_rate == 3e-4 and (a.num_roots, a.num_branches) == (4, 1)
    assert s.tools == ["python", "search"] and m.model_name_or_path == "tiny_warm"


def test_baseline_and_ablation_overrides_from_docs(script, tmp_path):
    base = ["--config", str(RECIPES / "qwen2.5-7b-instruct" / "qlora.yaml"), "--bf16", "false", "--use_cpu", "true",
            "--output_dir", str(tmp_path)]
    _, grpo, _ = script.parse_args(base + ["--branch_criterion", "none", "--num_roots", "16", "--num_branches", "0"])
    assert (grpo.num_roots, grpo.num_branches, grpo.num_generations) == (16, 0, 16)
    _, ablation, _ = script.parse_args(base + ["--branch_criterion", "entropy", "--dual_groups", "false",
                                               "--future_kl", "false", "--procedure_scale", "false"])
    assert ablation.branch_criterion == "entropy" and not (ablation.dual_groups or ablation.future_kl)


def test_unknown_yaml_key_and_bad_names_fail(script, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "cpu" / "demo.yaml").read_text() + "\nnum_brances: 2\n")
    with pytest.raises(ValueError, match="num_brances"):
        script.parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="Unknown tool"):
        script.APPOScriptArguments(tools=["calculator"])
    with pytest.raises(ValueError, match="Unknown reward"):
        script.build_reward_funcs(["nope"])
    assert script.build_reward_funcs(["format_f1", "f1_reward"])[1].__name__ == "f1_reward"


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=ids(ACCELERATE_YAMLS))
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert path.read_text().startswith("# ")
    config = load_config_from_file(str(path))  # a ClusterConfig: unknown keys raise
    expected = {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED",
                "deepspeed_zero3": "DEEPSPEED", "fsdp2": "FSDP"}[path.stem]
    assert str(config.distributed_type).split(".")[-1] == expected
    assert config.mixed_precision == "bf16"
    if path.stem.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if path.stem == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2


def test_cpu_demo_trains_end_to_end(script, tmp_path):
    from trl_appo.viz import load_branch_trees, load_log_history

    # the random `tiny` model: the pipeline in seconds (the recipe's warm start is the slow test below)
    trainer = script.main(["--config", str(RECIPES / "cpu" / "demo.yaml"), "--max_steps", "1",
                           "--model_name_or_path", "tiny", "--output_dir", str(tmp_path)])
    assert trainer.state.global_step == 1
    assert (tmp_path / "model.safetensors").exists()
    import json

    saved = json.loads((tmp_path / "appo_settings.json").read_text())  # what `trl-appo eval` defaults to
    assert saved["max_completion_length"] == 48 and saved["tool_protocol"] == "tags"
    history = load_log_history(tmp_path)  # trainer_state.json written by the script
    assert any("appo/branch_points_per_root" in e for e in history)
    records = load_branch_trees(tmp_path)
    assert records and all(len(r["branches"]) == 3 for r in records)  # B=3 per root
    assert len(records) == 4  # the N=4 roots of the step's prompt


def test_cpu_recipe_starts_from_the_warm_started_model(script, tmp_path):
    # build_from_args stays light: the warm start (SFT, then cached) happens when the trainer is built
    from trl_appo.scripts import TINY_WARM_MODEL

    s, a, m = script.parse_args(["--config", str(RECIPES / "cpu" / "demo.yaml"), "--output_dir", str(tmp_path)])
    assert m.model_name_or_path == TINY_WARM_MODEL
    recipe = script.build_from_args(s, a, m, with_data=False, with_tools=False)
    assert recipe.model == TINY_WARM_MODEL and recipe.processing_class is not None


@pytest.mark.slow
def test_cpu_recipe_log_shows_rewards_and_gradients_move(script, tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_APPO_CACHE", str(tmp_path / "cache"))  # the SFT warm start runs here (~1 min)
    trainer = script.main(["--config", str(RECIPES / "cpu" / "demo.yaml"), "--output_dir", str(tmp_path / "out")])
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert any(e["loss"] != 0 for e in logs) and any(e["grad_norm"] > 0 for e in logs)
    rewards = [e["reward"] for e in logs if "reward" in e]
    assert any(r > -1 for r in rewards), rewards  # not the format penalty everywhere, as with a random model


# ------------------------------------------------------------------------------------------------ one wiring, shipped


def test_script_is_a_thin_wrapper_over_the_package_module(script):
    from trl_appo import scripts

    assert script.parse_args is scripts.parse_args and script.build_from_args is scripts.build_from_args
    assert script.main is scripts.train  # returns the trainer, as before
    assert len((RECIPES / "train_appo.py").read_text().splitlines()) < 60


def test_checkout_recipes_are_the_shipped_package_data():
    import fnmatch
    import tomllib

    from trl_appo.recipes import find_recipe, list_recipes, recipes_dir

    shipped = list_recipes(include_accelerate=True)
    assert shipped == sorted(ids(TRAINING_YAMLS + ACCELERATE_YAMLS))
    for name in shipped:
        assert (recipes_dir() / name).read_text() == (RECIPES / name).read_text()
        shipped_path = (recipes_dir() / name).resolve()
        assert find_recipe(name).resolve() == shipped_path == find_recipe("recipes/" + name).resolve()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all(any(fnmatch.fnmatch(n, p) for p in patterns["trl_appo.recipes"]) for n in shipped)


@pytest.mark.parametrize("path", TRAINING_YAMLS, ids=ids(TRAINING_YAMLS))
def test_recipe_tracking(path):
    config = yaml.safe_load(path.read_text())
    if path.parent.name == "cpu":
        assert config["report_to"] == "none"  # the demo used in tests runs without trackio
    else:
        assert config["report_to"] == "trackio"
        assert config["project"] == f"appo-{path.parent.name}-{path.stem}"


def test_trackio_missing_falls_back_with_one_warning(script, tmp_path, monkeypatch):
    import importlib.util
    import warnings

    from trl_appo import scripts

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    _, args, _ = script.parse_args(["--config", str(RECIPES / "cpu" / "demo.yaml"), "--report_to", "trackio",
                                    "--output_dir", str(tmp_path)])
    assert args.report_to == ["trackio"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert scripts.fallback_report_to(args) == ["trackio"]
    assert len(caught) == 1 and "trl-appo[track]" in str(caught[0].message)
    assert args.report_to == []
    monkeypatch.setattr(importlib.util, "find_spec", real)


@pytest.mark.parametrize(
    "text, match",
    [("", "is empty"), ("a: [1\n", "YAML syntax error"), ("- 1\n", "YAML mapping"),
     ("learning_rate: [1, 2]\n", "must be one float"), ("lr_scheduler_type: sometimes\n", "choose one of"),
     ("use_cpu: maybe\n", "must be one bool")],
)
def test_bad_recipe_files_raise_one_line_recipe_errors(script, tmp_path, text, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(script.RecipeError, match=match) as info:
        script.parse_args(["--config", str(bad)])
    assert "\n" not in str(info.value)


def test_script_entry_exits_2_with_one_line(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(RECIPES / "train_appo.py"), "--config", "cpu/demo.yaml",
                           "--num_roots", "3", "--output_dir", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "num_roots" in lines[0], proc.stderr


def test_reward_registry_includes_trl_rewards(script):
    from trl.rewards import accuracy_reward, think_format_reward

    assert script.build_reward_funcs(["accuracy", "think_format"]) == [accuracy_reward, think_format_reward]
    with pytest.raises(script.RecipeError, match="cannot be imported"):
        script.build_reward_funcs(["no_such_pkg.fn"])


def test_a_directory_as_search_cache_is_a_one_line_recipe_error(tmp_path):
    from trl_appo import scripts

    with pytest.raises(scripts.RecipeError, match="is a directory; pass the path of a cache file") as info:
        scripts.make_tools(["search"], search_cache=str(tmp_path))
    assert "\n" not in str(info.value) and tmp_path.is_dir()
