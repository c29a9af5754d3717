"""trl_appo.viz: branch-point HTML/PNG pictures, branch-tree loading and learning curves, on synthetic records."""

import json
import re

import pytest

from trl_appo import viz

pytest.importorskip("matplotlib")


def make_record(step=3, group=1):
    """12 tokens: model tokens 0-4, a tool span 5-7, model tokens 8-11; branch points at 2 and 9 (9 chosen twice)
    plus one branch resampled from the prompt (position -1)."""
    text = ["Let", " me", " compute", " <python>", "1+1", "\n2\n", "</result>", " ok", " so", " the", " answer", "<|im_end|>"]
    mask = [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1]
    text[4], mask[4] = "1+1", 1
    bs = [0.1, -0.4, 1.7, 0.2, -1.2, 0.0, 0.0, 0.0, 0.3, 2.1, -0.5, 0.0]
    return {
        "step": step,
        "group": group,
        "tokens": [t.replace(" ", "Ġ") for t in text],
        "token_text": text,
        "model_mask": mask,
        "entropy_z": [0.5, -0.2, 1.1, 0.4, -1.0, 0.0, 0.0, 0.0, 0.6, 1.4, -0.3, -0.1],
        "omega_z": [0.2, 2.0, 1.5, 0.5, 1.2, 0.0, 0.0, 0.0, 0.5, 1.5, 1.7, 0.0],
        "bs": bs,
        "degenerate": False,
        "reward": 0.5,
        "branches": [
            {"position": 9, "strict": True, "fallback": 0, "score": 2.1, "reward": 1.0, "text": " answer is 2"},
            {"position": 2, "strict": True, "fallback": 0, "score": 1.7, "reward": -1.0, "text": " <x> & \"y\""},
            {"position": 9, "strict": False, "fallback": 1, "score": 2.1, "reward": 0.25, "text": " dup"},
            {"position": -1, "strict": False, "fallback": 3, "score": 0.0, "reward": 0.0, "text": "from prompt"},
        ],
    }


def token_spans(html_text):
    return re.findall(r'<span class="(tok[^"]*)" data-t="(\d+)"', html_text)


def test_html_has_one_span_per_token_grey_tool_tokens_and_marked_branch_points():
    rec = make_record()
    out = viz.render_trajectory_html(rec)
    spans = token_spans(out)
    assert [int(t) for _, t in spans] == list(range(12))
    tool = [int(t) for cls, t in spans if "tool" in cls.split()]
    assert tool == [5, 6, 7]
    branch = [int(t) for cls, t in spans if "branch" in cls.split()]
    assert branch == [2, 9]  # one marked span per distinct branch point; position -1 marks no token
    # The twice-chosen point carries both ranks; rank 1 is the highest score.
    sup9 = re.search(r'data-t="9"[^>]*>[^<]*<sup>([^<]*)</sup>', out).group(1)
    assert sup9.split() == ["1:2.10", "2:2.10"]
    assert "<sup>3:1.70</sup>" in out
    # Tooltips carry branch rewards; branch texts are escaped.
    assert "reward -1.000" in out and "reward +1.000" in out
    assert "&lt;x&gt; &amp;" in out and "<x>" not in out
    # Model tokens are coloured, tool tokens are not; newlines are visible.
    assert re.search(r'class="tok" data-t="0" style="background:rgb\(', out)
    assert not re.search(r'data-t="6" style=', out)
    assert "↵" in out
    # The prompt-resampled branch appears in the table.
    assert "no eligible token" in out


def test_html_colours_by_custom_values_and_full_document():
    rec = make_record()
    adv = [0.5] * 12
    out = viz.render_trajectory_html(rec, values=adv, value_label="advantage", vmax=1.0, full_document=True)
    assert out.startswith("<!DOCTYPE html>") and out.rstrip().endswith("</html>")
    assert "advantage=+0.500" in out
    with pytest.raises(ValueError, match="values"):
        viz.render_trajectory_html(rec, values=[0.0] * 3)
    with pytest.raises(KeyError, match="bs"):
        viz.render_trajectory_html({"tokens": [], "model_mask": [], "branches": []})


def test_branch_ranks_and_tool_spans():
    ranks = viz.branch_ranks(make_record())
    assert sorted(ranks) == [2, 9]
    assert [r for r, _ in ranks[9]] == [1, 2] and [r for r, _ in ranks[2]] == [3]
    assert viz.tool_spans([1, 0, 0, 1, 0]) == [(1, 3), (4, 5)]
    assert viz.tool_spans([]) == []


def test_png_is_written_with_token_boxes_signal_panel_and_branch_lines(tmp_path):
    rec = make_record()
    path = tmp_path / "traj.png"
    fig = viz.render_trajectory_png(rec, path)
    assert path.exists() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_tok, ax_bar, ax_sig = fig.axes
    assert len(ax_tok.patches) == 12  # one box per token
    edged = [p for p in ax_tok.patches if p.get_linewidth() > 1]
    assert len(edged) == 2  # branch points (positions 2 and 9)
    labels = [line.get_label() for line in ax_sig.get_lines()]
    assert {"z(H) entropy", "z(Ω) future likelihood gain", "BS = z(H)·z(Ω)"} <= set(labels)
    vlines = [line for line in ax_sig.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_xdata()[0] for line in vlines) == [2, 9]
    assert len(ax_sig.patches) == 1  # one shaded tool span (tokens 5-7)
    bs_line = next(line for line in ax_sig.get_lines() if line.get_label().startswith("BS"))
    ydata = list(bs_line.get_ydata())
    assert ydata[2] == pytest.approx(1.7) and all(y != y for y in ydata[5:8])  # NaN on tool tokens


def test_png_truncates_long_records(tmp_path):
    rec = make_record()
    fig = viz.render_trajectory_png(rec, None, max_tokens=5)
    assert len(fig.axes[0].patches) == 5
    assert "first 5 of 12" in fig.axes[0].get_title(loc="left")


def test_load_branch_trees_reads_the_trainer_layout(tmp_path):
    folder = tmp_path / "branch_trees"
    folder.mkdir()
    for name, step in (("step_000002_0001.jsonl", 2), ("step_000001_0000.jsonl", 1)):
        with open(folder / name, "w") as f:
            for g in range(2):
                f.write(json.dumps(make_record(step=step, group=g)) + "\n")
    recs = viz.load_branch_trees(tmp_path)
    assert [(r["step"], r["group"]) for r in recs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert recs[0]["file"] == "step_000001_0000.jsonl"
    assert len(viz.load_branch_trees(folder, step=2)) == 2
    assert len(viz.load_branch_trees(folder / "step_000001_0000.jsonl")) == 2
    with pytest.raises(FileNotFoundError, match="log_branch_trees"):
        viz.load_branch_trees(tmp_path / "nothing")


def history(offset, steps=10, key="reward"):
    return [{"step": s, key: offset + 0.1 * s, "loss": 1.0} for s in range(1, steps + 1)] + [{"train_runtime": 1.0}]


def test_learning_curves_mean_and_band_over_seeds(tmp_path):
    state = tmp_path / "grpo" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"log_history": history(0.0)}))
    jsonl = tmp_path / "arpo.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in history(0.2)))
    runs = {
        "APPO": [history(0.4), history(0.6), history(0.5, steps=8)],  # three seeds
        "GRPO": state.parent,  # an output_dir
        "ARPO": str(jsonl),
    }
    out = tmp_path / "curves.png"
    fig = viz.plot_learning_curves(runs, metric="reward", path=out)
    assert out.exists() and out.stat().st_size > 5_000
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"APPO (n=3)", "GRPO", "ARPO"}
    appo = lines["APPO (n=3)"]
    assert list(appo.get_xdata()) == list(range(1, 9))  # range every seed covers
    assert appo.get_ydata()[0] == pytest.approx(0.5 + 0.1)
    assert len(ax.collections) == 1  # one band, only for the label with several seeds
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["APPO (n=3)", "GRPO", "ARPO"]


def test_learning_curves_suffix_metric_and_errors(tmp_path):
    runs = {"APPO": history(0.0, key="appo/branch_reward")}
    fig = viz.plot_learning_curves(runs, metric="branch_reward", spread="none")
    assert fig.axes[0].get_ylabel() == "branch_reward"
    with pytest.raises(ValueError, match="Logged keys"):
        viz.plot_learning_curves(runs, metric="missing")
    with pytest.raises(ValueError, match="spread"):
        viz.plot_learning_curves(runs, spread="iqr")
