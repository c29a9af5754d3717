"""`trl-appo` subcommands: help, inspect on synthetic branch trees, eval on a tiny saved model, bad input."""

import json

import pytest

from trl_appo.cli import EXIT_BAD_INPUT, main


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
    assert "--config" in out and "branch_criterion" in out


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
               "--max-completion-length", "12", "--tools", "python", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "toy" in printed
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
