"""`trl-appo` subcommands: help, inspect on synthetic branch trees, eval on a tiny saved model, bad input (exit 2
and one line on stderr naming the fix), the installed command outside the checkout."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trl_appo.cli import EXIT_BAD_INPUT, main

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "demo.yaml"


def _record(step=3):
    tokens = ["<python>", "print", "(", "2", "*", "3", ")", "</python>", " <result>", "\n6\n", "</result>", "<answer>",
              "\\boxed{6}", "</answer>"]
    n = len(tokens)
    mask = [1] * 8 + [0] * 3 + [1] * 3
    return {
        "step": step, "group": 0, "tokens": tokens, "token_text": tokens, "model_mask": mask,
        "entropy_z": [0.1] * n, "omega_z": [0.0] * n, "bs": [0.5 if i == 3 else -0.2 for i in range(n)],
        "degenerate": False, "reward": 1.0,
        "branches": [
            {"position": 3, "strict": True, "fallback": 0, "score": 0.5, "reward": 0.0, "text": "7)</python>"},
            {"position": 11, "strict": False, "fallback": 2, "score": -0.2, "reward": 1.0, "text": "\\boxed{6}"},
        ],
    }


@pytest.fixture
def branch_dir(tmp_path):
    d = tmp_path / "run" / "branch_trees"
    d.mkdir(parents=True)
    (d / "step_000003_0000.jsonl").write_text(json.dumps(_record()) + "\n")
    return tmp_path / "run"


@pytest.mark.parametrize("command", [[], ["eval"], ["inspect"], ["demo"]])
def test_help_of_each_subcommand(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower()


def test_train_help_lists_recipe_fields(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "branch_criterion" in out and "--help_all" in out
    assert main(["train", "--help_all"]) == 0  # every field, from TRL's parser
    out = capsys.readouterr().out
    assert "--num_branches" in out and "--lora_r" in out and "--search_backend" in out
    first = next(line for line in out.split("options:", 1)[1].splitlines() if line.strip().startswith("-"))
    assert first.strip().startswith("--config RECIPE")


_HELP_PROBE = """
import sys
from trl_appo.cli import main
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["inspect", "--help"], ["recipes"]):
    assert main(argv) == 0, argv
print("HEAVY", sorted(m for m in ("torch", "trl", "transformers") if m in sys.modules))
"""


def test_help_imports_no_torch_or_trl_and_lists_config_first():
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    train_help = proc.stdout.split("usage: trl-appo train", 1)[1]
    options = train_help.split("options:", 1)[1].splitlines()
    first = next(line for line in options if line.strip().startswith("-"))
    assert first.strip().startswith("--config"), first


def test_eval_flags_take_underscores_and_the_old_dashes():
    from trl_appo.cli import build_parser

    parser = build_parser()
    new = parser.parse_args(["eval", "--model", "m", "--dataset", "d", "--max_completion_length", "7",
                             "--max_tool_calls", "1", "--top_p", "0.5", "--batch_size", "3"])
    old = parser.parse_args(["eval", "--model", "m", "--dataset", "d", "--max-completion-length", "7",
                             "--max-tool-calls", "1", "--top-p", "0.5", "--batch-size", "3"])
    assert vars(new) == vars(old)
    assert (new.max_completion_length, new.max_tool_calls, new.top_p, new.batch_size) == (7, 1, 0.5, 3)


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2


def test_inspect_prints_markers_and_writes_html(branch_dir, tmp_path, capsys):
    html = tmp_path / "out" / "traj.html"
    assert main(["inspect", str(branch_dir), "--html", str(html), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "⟨BP1⟩" in out and "⟨BP2⟩" in out
    # BP1 (highest score) sits right after the token it keeps: the first digit of the product.
    assert "print(2⟨BP1⟩*3)" in out
    assert html.exists() and "<html" in html.read_text().lower()


def test_inspect_colours_when_asked(branch_dir, capsys):
    assert main(["inspect", str(branch_dir), "--color", "always"]) == 0
    assert "\033[" in capsys.readouterr().out


def test_inspect_bad_inputs_exit_2(branch_dir, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == EXIT_BAD_INPUT
    assert "No branch trees" in capsys.readouterr().err
    assert main(["inspect", str(branch_dir), "--step", "99"]) == EXIT_BAD_INPUT
    assert "logged steps: [3]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from trl_appo.testing import build_tiny_model, build_tiny_tokenizer, save_tiny_pair

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    return save_tiny_pair(model, tok, str(tmp_path_factory.mktemp("tiny_model")))


def test_eval_on_tiny_saved_model_writes_json_table(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "What is 2 * 3?", "ground_truth": "6", "data_source": "toy"},
            {"prompt": "What is 4 + 4?", "ground_truth": "8", "data_source": "toy"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res.json"
    rc = main(["eval", "--model", tiny_model_dir, "--dataset", str(data), "--k", "1", "--n", "2",
               "--max_completion_length", "12", "--tools", "python", "--output", str(out),
               "--progress", "always"])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "pass@1" in printed and "toy" in printed
    assert "eval" in captured.err and "2/2" in captured.err  # the tqdm bar: prompts done / total
    result = json.loads(out.read_text())
    assert result["overall"]["num_rollouts"] == 4
    assert result["overall"]["pass_at"]["pass@1"] == pytest.approx(0.0)  # a random model never answers
    assert result["settings"]["n"] == 2


def test_eval_missing_columns_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "What is 2 * 3?", "answer": "6"}) + "\n")
    rc = main(["eval", "--model", tiny_model_dir, "--dataset", str(data), "--k", "1", "--n", "2"])
    assert rc == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "missing column(s): prompt" in err and "ground_truth" in err and "question, answer" in err


def test_eval_bad_k_and_missing_files(tmp_path, capsys):
    assert main(["eval", "--model", "x", "--dataset", "y", "--k", "4", "--n", "2"]) == EXIT_BAD_INPUT
    assert "--k" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--dataset", str(tmp_path / "none.jsonl")]) == EXIT_BAD_INPUT
    assert "dataset not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad input


def _bad(argv, capsys, *needles):
    """Exit 2 with exactly one line on stderr containing every needle."""
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("trl-appo"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def _scripts_imported():
    import trl_appo.scripts  # noqa: F401 - import-time noise stays out of the captured test output


def _recipe(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_train_unknown_yaml_key(tmp_path, capsys, _scripts_imported):
    path = _recipe(tmp_path, DEMO.read_text() + "\nnum_brances: 2\n")
    _bad(["train", "--config", path], capsys, "unknown recipe key 'num_brances'", "did you mean 'num_branches'")


def test_train_yaml_syntax_error(tmp_path, capsys, _scripts_imported):
    path = _recipe(tmp_path, "model_name_or_path: tiny\nmax_steps: [1\n")
    _bad(["train", "--config", path], capsys, "YAML syntax error", "line 3", "fix the YAML")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n"], ids=["empty", "comment", "list"])
def test_train_empty_or_non_mapping_yaml(tmp_path, capsys, text, _scripts_imported):
    path = _recipe(tmp_path, text)
    line = _bad(["train", "--config", path], capsys, "recipe")
    assert "is empty" in line or "must be a YAML mapping" in line


@pytest.mark.parametrize("value", ["[1, 2]", "fast", "{a: 1}"])
def test_train_learning_rate_of_the_wrong_type(tmp_path, capsys, value, _scripts_imported):
    text = "".join(line + "\n" for line in DEMO.read_text().splitlines() if not line.startswith("learning_rate"))
    path = _recipe(tmp_path, text + f"learning_rate: {value}\n")
    _bad(["train", "--config", path], capsys, "'learning_rate'", "must be one float", "learning_rate: ")


@pytest.mark.parametrize(
    "override",
    [["--num_generations", "15"],  # GRPOConfig: generation batch not divisible by M
     ["--num_roots", "3"],  # APPOConfig: N * (1 + B) != M
     ["--branch_criterion", "bogus"],
     ["--max_steps", "abc"]],
    ids=["grpo_divisible", "appo_budget", "choice", "flag_type"],
)
def test_train_config_construction_errors_are_one_line(override, capsys, _scripts_imported):
    _bad(["train", "--config", str(DEMO), *override], capsys, override[0].lstrip("-"))


def test_train_budget_error_message_comes_from_appo_config(capsys, _scripts_imported):
    from trl_appo.config import APPOConfig

    with pytest.raises(ValueError) as info:
        APPOConfig(output_dir="x", num_generations=16, num_roots=3, num_branches=3, use_cpu=True, bf16=False,
                   per_device_train_batch_size=16, gradient_accumulation_steps=1, steps_per_generation=2)
    line = _bad(["train", "--config", str(DEMO), "--num_roots", "3"], capsys, "invalid settings")
    assert " ".join(str(info.value).split()) in line


def test_train_missing_recipe_and_unknown_flag(tmp_path, capsys, _scripts_imported):
    _bad(["train", "--config", str(tmp_path / "none.yaml")], capsys, "recipe not found", "trl-appo recipes")
    _bad(["train"], capsys, "--config")
    _bad(["train", "--config", str(DEMO), "--max_stepz", "3"], capsys, "--max_stepz")
    _bad(["train", "--config", str(DEMO), "--tools", "calculator"], capsys, "calculator", "python")


def test_eval_empty_jsonl(tmp_path, capsys, _scripts_imported):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _bad(["eval", "--model", "tiny", "--dataset", str(empty)], capsys, "is empty", "prompt")
    empty.write_text("\n\n")
    _bad(["eval", "--model", "tiny", "--dataset", str(empty)], capsys, "is empty")


def test_inspect_refuses_jsonl_without_branch_trees(tmp_path, capsys):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "hi", "ground_truth": "1"}) + "\n" + json.dumps([1, 2]) + "\n")
    _bad(["inspect", str(other)], capsys, "no branch-tree records", "tokens, model_mask, bs, branches",
         "log_branch_trees=True")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _bad(["inspect", str(empty)], capsys, "no branch-tree records")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    _bad(["inspect", str(garbage)], capsys, "not JSON lines")


def test_unknown_arguments_are_one_line(capsys):
    _bad(["inspect", "x", "--frob"], capsys, "--frob")
    _bad(["eval", "--model", "m"], capsys, "--dataset")


# ------------------------------------------------------------------------------------------------ outside the checkout


def test_train_finds_shipped_recipe_from_any_directory(tmp_path, monkeypatch, capsys, _scripts_imported):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the shipped copy inside the package is used
    for name in ("recipes/cpu/demo.yaml", "cpu/demo.yaml", "cpu/demo"):
        # Reaches APPOConfig (the flag error), so the recipe itself was found and read.
        _bad(["train", "--config", name, "--num_roots", "3"], capsys, "invalid settings")


def test_recipes_command_lists_and_copies(tmp_path, capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "cpu/demo.yaml" in out and "qwen2.5-7b-instruct/qlora.yaml" in out and "accelerate/fsdp2.yaml" in out
    assert main(["recipes", "--copy", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "cpu" / "demo.yaml").read_text() == DEMO.read_text()
    assert (tmp_path / "mine" / "accelerate" / "single_gpu.yaml").exists()


def _installed_command() -> str:
    found = Path(sys.executable).parent / "trl-appo"
    return str(found) if found.exists() else shutil.which("trl-appo")


@pytest.mark.skipif(_installed_command() is None, reason="trl-appo is not installed")
def test_installed_command_uses_shipped_recipes_outside_checkout(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}  # the installed package, not this checkout on sys.path
    listed = subprocess.run([_installed_command(), "recipes"], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=60)
    assert listed.returncode == 0 and "cpu/demo.yaml" in listed.stdout, listed.stderr
    # The recipe is found and parsed up to APPOConfig's budget check; exit 2 with one line on stderr.
    proc = subprocess.run([_installed_command(), "train", "--config", "cpu/demo.yaml", "--num_roots", "3"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trl-appo train: error: invalid settings"), proc.stderr


def test_train_missing_dataset_file(tmp_path, capsys, _scripts_imported):
    _bad(["train", "--config", str(DEMO), "--dataset_name", str(tmp_path / "none.jsonl"),
          "--output_dir", str(tmp_path / "out")], capsys, "not found", "dataset_name")


def test_demo_takes_underscore_flags():
    from trl_appo.cli import _underscore_to_dash

    assert _underscore_to_dash(["--output_dir", "x_y", "--no_progress", "--b_lr=1e-4", "--quick"]) == [
        "--output-dir", "x_y", "--no-progress", "--b-lr=1e-4", "--quick"]


# ------------------------------------------------------------------------------------------------ issue 17: bad input


@pytest.mark.parametrize("content,needles", [
    ("", ("is empty", "prompt")),
    ('{"q": "What is 2 * 3?", "a": "6"}\n', ("cannot tell the schema", "['a', 'q']", "dataset_schema")),
])
def test_train_empty_or_unreadable_dataset_is_one_line(tmp_path, capsys, content, needles):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    _bad(["train", "--config", str(DEMO), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")],
         capsys, *needles)
    assert not (tmp_path / "out").exists()


def test_train_resume_from_missing_checkpoint_fails_before_creating_anything(tmp_path, capsys):
    out = tmp_path / "out"
    _bad(["train", "--config", str(DEMO), "--resume_from_checkpoint", str(tmp_path / "nosuch"), "--output_dir",
          str(out)], capsys, "no such checkpoint folder", "checkpoint-N")
    assert not out.exists()
    _bad(["train", "--config", str(DEMO), "--resume_from_checkpoint", "true", "--output_dir", str(out)], capsys,
         "holds no checkpoint-N folder")
    assert not out.exists()


def test_impossible_generation_batch_names_the_fields_the_user_set(tmp_path, capsys):
    # TRL would say "generation_batch_size (12) must be divisible by num_generations (16)", a number never set.
    line = _bad(["train", "--config", str(DEMO), "--per_device_train_batch_size", "12", "--steps_per_generation", "1",
                 "--output_dir", str(tmp_path / "out")], capsys, "num_generations=16",
                "per_device_train_batch_size=16", "steps_per_generation=4")
    assert "generation_batch_size (" not in line
    from trl_appo.config import APPOConfig

    kw = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=16)
    APPOConfig(per_device_train_batch_size=16, steps_per_generation=1, **kw)  # the values it names do work
    APPOConfig(per_device_train_batch_size=12, steps_per_generation=4, **kw)


@pytest.mark.parametrize("spelling", [["python", "search"], ["python,search"]])
def test_tools_take_both_spellings_in_train_and_eval(spelling, capsys):
    from trl_appo import scripts
    from trl_appo.cli import build_parser

    script_args, _, _ = scripts.parse_args(["--config", str(DEMO), "--tools", *spelling])
    assert script_args.tools == ["python", "search"]
    args = build_parser().parse_args(["eval", "--model", "tiny", "--dataset", "task:tool", "--tools", *spelling])
    assert scripts.split_names(args.tools) == ["python", "search"]
    # a wrong name, in either spelling, is one line that shows both spellings
    bad = [s.replace("search", "serch") for s in spelling]
    _bad(["train", "--config", str(DEMO), "--tools", *bad], capsys, "'serch'", "python search", "python,search")
    _bad(["eval", "--model", "tiny", "--dataset", "task:tool", "--tools", *bad], capsys, "'serch'",
         "python search", "python,search")


def _noisy(result):
    """A stand-in for `scripts.prepare` that prints what third-party packages print on import, then returns or
    raises `result`."""

    def prepare(argv):  # fd-level (C extensions, subprocesses) and Python-level (print, logging's last resort)
        import os

        os.write(2, b"Skipping publisher trust check for 'kernels-community/x' because Hugging Face Hub is offline.\n")
        print("Failed to load CPU gemm_4bit_forward from kernels-community", file=sys.stderr)
        if isinstance(result, Exception):
            raise result
        return result

    return prepare


def test_third_party_stderr_never_joins_a_one_line_error(monkeypatch, capfd):
    from trl_appo import scripts

    monkeypatch.setattr(scripts, "prepare", _noisy(scripts.RecipeError("bad recipe: fix it")))
    assert main(["train", "--config", str(DEMO)]) == EXIT_BAD_INPUT
    err = capfd.readouterr().err
    assert err.splitlines() == ["trl-appo train: error: bad recipe: fix it"], err


def test_third_party_stderr_is_passed_on_when_the_input_is_good(monkeypatch, capfd):
    from trl_appo import scripts

    ran = []
    monkeypatch.setattr(scripts, "prepare", _noisy(("trainer", "script_args", "training_args")))
    monkeypatch.setattr(scripts, "run", lambda *a: ran.append(a))
    assert main(["train", "--config", str(DEMO)]) == 0
    err = capfd.readouterr().err
    assert ran == [("trainer", "script_args", "training_args")]
    for line in ("Skipping publisher trust check", "gemm_4bit_forward"):
        assert line in err, err


def test_demo_bad_flag_is_one_line(capsys):
    _bad(["demo", "--part", "c"], capsys, "--part", "'a', 'b', 'all'")


def test_known_import_noise_loggers_are_quiet_unless_configured():
    import logging

    import trl_appo  # noqa: F401 - importing the package lowers them

    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.ERROR


def test_eval_budget_defaults_to_the_trained_models(tiny_model_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "appo_settings.json").write_text(json.dumps({"max_completion_length": 9, "tool_protocol": "tags"}))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 * 3?", "ground_truth": "6"}) + "\n")
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(model), "--dataset", str(data), "--k", "1", "--n", "1", "--output",
                 str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["max_completion_length"] == 9
    assert main(["eval", "--model", str(model), "--dataset", str(data), "--k", "1", "--n", "1", "--output",
                 str(out), "--max_completion_length", "7"]) == 0  # a value given wins
    assert json.loads(out.read_text())["settings"]["max_completion_length"] == 7
    from trl_appo import scripts

    (model / "appo_settings.json").unlink()  # nothing recorded: the documented default
    assert scripts.trained_max_completion_length(str(model)) is None


# ------------------------------------------------------------------------------------------------ issue 18: one floor


def test_every_subcommand_declares_its_flags_as_one_dataclass(capsys):
    """Each flag of each subcommand is a field of its `FLAGS` dataclass, with help; `--field_name` and the dashed
    spelling parse to the same dataclass; the help text shown is the field's."""
    import dataclasses

    from trl_appo.cli import COMMANDS, build_parser
    from trl_appo.cli._args import field_rows, from_namespace

    assert set(COMMANDS) == {"train", "eval", "inspect", "demo", "recipes"}
    parser = build_parser()
    for name, module in COMMANDS.items():
        assert dataclasses.is_dataclass(module.FLAGS), name
        rows = field_rows(module.FLAGS)
        assert all(row["help"] for row in rows), name
        assert main([name, "--help"]) == 0
        shown = " ".join(capsys.readouterr().out.split())
        for row in rows:
            assert " ".join(row["help"].split())[:40] in shown, (name, row["name"])
        required = [r for r in rows if r["default"] == "required"]
        base = [name] + [a for r in required for a in ((r["flags"][0], "x") if r["flags"][0].startswith("--")
                                                      else ("x",))]
        for row in rows:
            if len(row["flags"]) < 2 or row["default"] == "required" or row["name"].startswith("help"):
                continue
            value = {"int": "3", "float": "0.5", "bool": "true"}.get(row["type"], None)
            if value is None:
                value = row["type"].split(" | ")[-1]
            values = ["a", "b"] if row["type"].endswith("...") else [value]
            underscore = parser.parse_args([*base, row["flags"][0], *values])
            dashed = parser.parse_args([*base, row["flags"][1], *values])
            assert vars(underscore) == vars(dashed), (name, row["flags"])
            if name != "eval" or row["name"] not in ("k", "n"):
                from_namespace(module.FLAGS, underscore)  # builds (checks in __post_init__ pass)


def test_demo_flags_take_underscores_the_old_dashes_and_one_line_errors(capsys):
    from trl_appo.cli import demo as demo_cli

    new = demo_cli.parse(["--output_dir", "o", "--no_progress", "--b_lr", "1e-4", "--quick"])
    old = demo_cli.parse(["--output-dir", "o", "--no-progress", "--b-lr", "1e-4", "--quick", "true"])
    assert new == old and new.no_progress and new.quick and new.b_lr == 1e-4 and new.output_dir == "o"
    with pytest.raises(SystemExit) as e:  # `python -m trl_appo.demo` says it as `trl-appo demo` does
        demo_cli.parse(["--part", "c"])
    assert e.value.code == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trl-appo demo: error: argument --part") and "'all'" in lines[0]


def test_eval_flag_errors_name_the_subcommand(capsys):
    line = _bad(["eval", "--model", "m", "--dataset", "d", "--k", "many"], capsys, "--k", "'many'")
    assert line.startswith("trl-appo eval: error:")


def test_cli_docs_are_generated_from_the_flag_dataclasses():
    script = Path(__file__).resolve().parents[1] / "scripts" / "gen_cli_docs.py"
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr + res.stdout
