"""Pictures of APPO's branch points (HTML and PNG) and learning curves. Reads files; trains nothing.

What this module owns:

* ``load_branch_trees``          — the JSONL records ``APPOTrainer`` writes with ``log_branch_trees=True``
  (``<output_dir>/branch_trees/step_*.jsonl``, one JSON object per root rollout).
* ``render_trajectory_html``     — one root rollout token by token: background = Branching Score (diverging
  colormap, docs/algorithm.md §1), tool output greyed (model_mask 0: never trained on, never branched at), branch points
  boxed with a superscript "rank:score" and a tooltip holding the branch's reward and continuation.
* ``render_trajectory_png``      — the same rollout as a matplotlib figure: wrapped token boxes coloured by BS,
  and a panel with z(H), z(Ω), BS along the sequence, branch points as vertical lines, tool spans shaded.
* ``plot_learning_curves``       — one metric against the step for several labelled runs (APPO and its
  baselines); runs sharing a label (seeds) are drawn as mean ± spread.

A record is a dict with keys ``tokens``, ``token_text``, ``model_mask``, ``entropy_z``, ``omega_z``, ``bs``,
``degenerate``, ``reward``, ``branches`` (each ``{position, strict, fallback, score, reward, text}``), and
optionally ``step`` and ``group``; see ``trl_appo.branching.branch_tree_records``. Any per-token array of the same
length (for instance the advantage each token received) can be shown instead of BS with ``values=``.

matplotlib is only needed for the PNG and the curves (``pip install trl-appo[plot]``); the HTML needs nothing.
Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so this works headless and in threads.
"""

from __future__ import annotations

import glob
import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .records import REQUIRED_KEYS

__all__ = [
    "branch_ranks",
    "load_branch_trees",
    "load_log_history",
    "plot_learning_curves",
    "render_trajectory_html",
    "render_trajectory_png",
    "tool_spans",
]



# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


def load_branch_trees(output_dir: str | os.PathLike, step: int | None = None) -> list[dict[str, Any]]:
    """Read the branch trees an ``APPOTrainer(log_branch_trees=True)`` run wrote.

    Args:
        output_dir: the run's ``output_dir`` (containing ``branch_trees/``), the ``branch_trees`` folder itself,
            or one ``step_*.jsonl`` file.
        step: keep only records of this optimizer step (the ``step`` key).

    Returns:
        Records in file order (files sorted by name, i.e. by step and then by branching call), one per root
        rollout. Each record gets a ``file`` key with the name of the JSONL file it came from.

    Raises:
        FileNotFoundError: no ``step_*.jsonl`` file was found, with the path that was searched.
    """
    path = Path(output_dir)
    if path.is_file():
        files = [path]
    else:
        folder = path / "branch_trees" if (path / "branch_trees").is_dir() else path
        files = sorted(folder.glob("step_*.jsonl"))
        if not files:
            raise FileNotFoundError(
                f"No branch trees (step_*.jsonl) under {folder}. Train with APPOConfig(log_branch_trees=True) and "
                "pass the run's output_dir."
            )
    records = []
    for f in files:
        with open(f) as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    if not isinstance(rec, dict):  # JSON, but not a record (a list, a number): not a branch tree
                        continue
                    if step is None or rec.get("step") == step:
                        rec["file"] = f.name
                        records.append(rec)
    return records


def _check_record(record: Mapping[str, Any], values: Sequence[float] | None) -> int:
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise KeyError(f"Branch-tree record lacks {missing}; expected the keys written by APPOTrainer "
                       f"(log_branch_trees=True): {list(REQUIRED_KEYS)} and more.")
    n = len(record["tokens"])
    for key in ("model_mask", "bs", "token_text", "entropy_z", "omega_z"):
        if key in record and len(record[key]) != n:
            raise ValueError(f"record[{key!r}] has {len(record[key])} entries but there are {n} tokens.")
    if values is not None and len(values) != n:
        raise ValueError(f"`values` has {len(values)} entries but the record has {n} tokens.")
    return n


def branch_ranks(record: Mapping[str, Any]) -> dict[int, list[tuple[int, dict[str, Any]]]]:
    """Branch points of a record by token position: ``{position: [(rank, branch), ...]}``.

    Rank 1 is the highest score. Branches with position −1 (no eligible token: resampled from the prompt) are
    left out, since they mark no token. A position chosen twice (a root with fewer candidates than B) lists
    both branches.
    """
    valid = [b for b in record["branches"] if int(b.get("position", -1)) >= 0]
    ordered = sorted(valid, key=lambda b: -float(b.get("score", 0.0)))
    out: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for rank, b in enumerate(ordered, start=1):
        out.setdefault(int(b["position"]), []).append((rank, b))
    return out


def tool_spans(model_mask: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open ``[start, end)`` runs of tokens with model_mask 0 (tool output, template glue)."""
    spans, start = [], None
    for i, m in enumerate(model_mask):
        if not m and start is None:
            start = i
        elif m and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(model_mask)))
    return spans


# --------------------------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------------------------

# Fallback diverging ramp (blue → white → red, as matplotlib's "RdBu_r") when matplotlib is not installed.
_RAMP = [(33, 102, 172), (103, 169, 207), (209, 229, 240), (247, 247, 247), (253, 219, 199), (239, 138, 98),
         (178, 24, 43)]


def _colormap(name: str):
    """fraction in [0, 1] -> (r, g, b) in 0..255."""
    try:
        import matplotlib

        cmap = matplotlib.colormaps[name]
        return lambda x: tuple(int(round(255 * c)) for c in cmap(float(x))[:3])
    except ImportError:
        def ramp(x: float) -> tuple[int, int, int]:
            pos = min(max(x, 0.0), 1.0) * (len(_RAMP) - 1)
            i = min(int(pos), len(_RAMP) - 2)
            f = pos - i
            return tuple(int(round(a + (b - a) * f)) for a, b in zip(_RAMP[i], _RAMP[i + 1], strict=True))

        return ramp


def _symmetric_limit(values: Sequence[float], mask: Sequence[int], vmax: float | None) -> float:
    if vmax is not None:
        return float(vmax)
    finite = [abs(float(v)) for v, m in zip(values, mask, strict=True) if m and math.isfinite(float(v))]
    return max(finite, default=0.0) or 1.0


def _text_colour(rgb: tuple[int, int, int]) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "#000" if luminance > 140 else "#fff"


def _token_texts(record: Mapping[str, Any]) -> list[str]:
    """Per-token display text: the decoded text, or the raw BPE token where decoding one token alone gives a
    replacement character (a multi-byte character split across tokens)."""
    raw = [str(t) for t in record["tokens"]]
    decoded = record.get("token_text") or raw
    return [r if "\ufffd" in str(d) else str(d) for d, r in zip(decoded, raw, strict=True)]


def _display(text: str) -> str:
    """Token text made visible: newlines as ↵ (plus the line break), tabs as →, other control characters as ·."""
    text = text.replace("\t", "→").replace("\r", "").replace("\n", "↵\n")
    return "".join("·" if (ord(ch) < 32 and ch != "\n") or 0x7F <= ord(ch) < 0xA0 else ch for ch in text)


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------

_CSS = """
.appo-traj { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.9; }
.appo-traj .appo-head { font-family: sans-serif; margin-bottom: 6px; }
.appo-traj .appo-tokens { white-space: pre-wrap; word-break: break-all; }
.appo-traj .tok { border-radius: 2px; padding: 0 1px; }
.appo-traj .tok.tool { color: #9a9a9a; background: #efefef; font-style: italic; }
.appo-traj .tok.branch { outline: 2px solid #111; outline-offset: 0; font-weight: bold; }
.appo-traj .tok.branch sup { font-size: 9px; color: #111; background: #ffe066; padding: 0 2px;
  border-radius: 2px; margin-left: 1px; font-weight: normal; }
.appo-traj .appo-legend { font-family: sans-serif; font-size: 11px; margin-top: 8px; }
.appo-traj .appo-bar { display: inline-block; width: 160px; height: 10px; vertical-align: middle; }
.appo-traj table { border-collapse: collapse; font-family: sans-serif; font-size: 12px; margin-top: 8px; }
.appo-traj td, .appo-traj th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
"""


def render_trajectory_html(
    record: Mapping[str, Any],
    *,
    values: Sequence[float] | None = None,
    value_label: str = "BS",
    cmap: str = "RdBu_r",
    vmax: float | None = None,
    title: str | None = None,
    max_branch_text: int = 300,
    full_document: bool = False,
) -> str:
    """Render one root rollout as HTML, token by token.

    Every token is a ``<span class="tok">`` whose background encodes ``values`` (default: the record's Branching
    Score ``bs``) on a diverging colormap symmetric around 0 (``vmax`` defaults to the largest |value| over model
    tokens). Tool-output tokens (``model_mask`` 0) get class ``tool`` and are greyed instead. Each branch point gets
    class ``branch``, a border, a superscript ``rank:score`` (rank 1 = highest score; several when a point was
    chosen twice) and a tooltip with the branch reward, strict/fallback tier and continuation text. Every token's
    own tooltip shows its index, value, z(H) and z(Ω).

    Args:
        record: a branch-tree record (see the module docstring).
        values: optional per-token values to colour by instead of ``bs`` (e.g. the advantage each token received).
        value_label: name of the coloured quantity in tooltips and the legend.
        cmap: a matplotlib diverging colormap name (a built-in blue-white-red ramp is used without matplotlib).
        vmax: colour scale limit; values are clipped to [-vmax, vmax].
        title: heading; defaults to step, group, reward and the degenerate-Ω flag.
        max_branch_text: characters of each branch's continuation shown in the table and tooltips.
        full_document: wrap in ``<!DOCTYPE html><html>…`` (for writing a standalone file).

    Returns:
        An HTML string (a ``<div class="appo-traj">`` with its own ``<style>``) — display it in a notebook with
        ``IPython.display.HTML`` or write it to a file.
    """
    n = _check_record(record, values)
    vals = [float(v) for v in (values if values is not None else record["bs"])]
    mask = [int(m) for m in record["model_mask"]]
    texts = _token_texts(record)
    lim = _symmetric_limit(vals, mask, vmax)
    colour = _colormap(cmap)
    ranks = branch_ranks(record)
    z_h, z_o = record.get("entropy_z"), record.get("omega_z")

    spans = []
    for i in range(n):
        text = html.escape(_display(str(texts[i])))
        tip = [f"t={i}"]
        if mask[i]:
            v = vals[i]
            frac = 0.5 + 0.5 * max(-1.0, min(1.0, v / lim)) if math.isfinite(v) else 0.5
            rgb = colour(frac)
            style = f' style="background:rgb{rgb};color:{_text_colour(rgb)}"'
            tip.append(f"{value_label}={v:+.3f}")
            if z_h is not None:
                tip.append(f"z(H)={float(z_h[i]):+.2f}")
            if z_o is not None:
                tip.append(f"z(Ω)={float(z_o[i]):+.2f}")
            cls = "tok"
        else:
            style, cls = "", "tok tool"
            tip.append("tool output (not trained on, never branched at)")
        sup = ""
        if i in ranks:
            cls += " branch"
            marks, lines = [], []
            for rank, b in ranks[i]:
                marks.append(f"{rank}:{float(b.get('score', 0.0)):.2f}")
                tier = "strict" if b.get("strict") else f"fallback {b.get('fallback', '?')}"
                cont = str(b.get("text", ""))[:max_branch_text]
                lines.append(f"branch #{rank}: score {float(b.get('score', 0.0)):+.3f} ({tier}), "
                             f"reward {float(b.get('reward', float('nan'))):+.3f}; continues: {cont}")
            tip.extend(lines)
            sup = f"<sup>{html.escape(' '.join(marks))}</sup>"
        spans.append(
            f'<span class="{cls}" data-t="{i}"{style} title="{html.escape(chr(10).join(tip), quote=True)}">'
            f"{text}{sup}</span>"
        )

    if title is None:
        parts = []
        if "step" in record:
            parts.append(f"step {record['step']}")
        if "group" in record:
            parts.append(f"prompt group {record['group']}")
        if "reward" in record:
            parts.append(f"root reward {float(record['reward']):+.3f}")
        parts.append(f"{n} tokens, {sum(mask)} generated by the policy")
        parts.append(f"{sum(len(v) for v in ranks.values())} branch points")
        if record.get("degenerate"):
            parts.append("Ω degenerate → ranked by entropy alone")
        title = " · ".join(parts)

    stops = ", ".join(f"rgb{colour(x / 10)}" for x in range(11))
    legend = (
        f'<div class="appo-legend">{html.escape(value_label)} '
        f"<b>{-lim:+.2f}</b> <span class=\"appo-bar\" style=\"background:linear-gradient(to right, {stops})\"></span> "
        f"<b>{lim:+.2f}</b> &nbsp; <span class=\"tok tool\">tool output</span> &nbsp; "
        f'<span class="tok branch">branch point<sup>rank:score</sup></span></div>'
    )
    rows = []
    for pos in sorted(ranks):
        for rank, b in ranks[pos]:
            rows.append(
                f"<tr><td>{rank}</td><td>{pos}</td><td>{html.escape(_display(str(texts[pos])))}</td>"
                f"<td>{float(b.get('score', 0.0)):+.3f}</td>"
                f"<td>{'strict' if b.get('strict') else 'fallback ' + str(b.get('fallback', '?'))}</td>"
                f"<td>{float(b.get('reward', float('nan'))):+.3f}</td>"
                f"<td>{html.escape(str(b.get('text', ''))[:max_branch_text])}</td></tr>"
            )
    unplaced = [b for b in record["branches"] if int(b.get("position", -1)) < 0]
    for b in unplaced:
        rows.append(
            f"<tr><td>–</td><td>prompt</td><td>(no eligible token)</td><td>–</td><td>resampled</td>"
            f"<td>{float(b.get('reward', float('nan'))):+.3f}</td>"
            f"<td>{html.escape(str(b.get('text', ''))[:max_branch_text])}</td></tr>"
        )
    table = (
        "<table><tr><th>rank</th><th>t</th><th>token</th><th>score</th><th>tier</th><th>branch reward</th>"
        f"<th>branch continuation</th></tr>{''.join(rows)}</table>" if rows else ""
    )
    body = (
        f'<div class="appo-traj"><style>{_CSS}</style><div class="appo-head">{html.escape(title)}</div>'
        f'<div class="appo-tokens">{"".join(spans)}</div>{legend}{table}</div>'
    )
    if full_document:
        return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>APPO trajectory</title></head>' \
               f"<body>{body}</body></html>\n"
    return body


# --------------------------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------------------------


def _new_figure(figsize):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("The PNG pictures and learning curves need matplotlib: pip install 'trl-appo[plot]'.") from e
    return Figure(figsize=figsize, layout="constrained")


def render_trajectory_png(
    record: Mapping[str, Any],
    path: str | os.PathLike | None = None,
    *,
    values: Sequence[float] | None = None,
    value_label: str = "BS",
    cmap: str = "RdBu_r",
    vmax: float | None = None,
    chars_per_line: int = 120,
    max_tokens: int | None = 800,
    dpi: int = 110,
    title: str | None = None,
):
    """Draw one root rollout with matplotlib and optionally save it (PNG, or any format matplotlib infers).

    Layout (three axes, top to bottom): the tokens as wrapped text boxes coloured by ``values`` (default BS;
    tool tokens grey, branch points with a thick black edge and their rank above), the colour bar, and a
    panel plotting z(H), z(Ω) and BS against the token index with branch points as vertical dashed lines and
    tool spans shaded grey.

    Args:
        record: a branch-tree record (see the module docstring).
        path: where to save; None only returns the figure.
        values, value_label, cmap, vmax: as in :func:`render_trajectory_html`.
        chars_per_line: wrap width of the token panel, in characters.
        max_tokens: draw at most this many tokens in the token panel (the signal panel always shows all).
        dpi: resolution of the saved file.
        title: figure title; defaults to step, group and reward.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    n = _check_record(record, values)
    vals = [float(v) for v in (values if values is not None else record["bs"])]
    mask = [int(m) for m in record["model_mask"]]
    texts = _token_texts(record)
    lim = _symmetric_limit(vals, mask, vmax)
    cm = matplotlib.colormaps[cmap]
    norm = Normalize(-lim, lim)
    ranks = branch_ranks(record)

    # Lay tokens out on a character grid: each token is a box as wide as its visible text.
    shown = n if max_tokens is None else min(n, max_tokens)
    boxes, x, line = [], 0, 0
    for i in range(shown):
        label = _display(texts[i]).replace("\n", "") or "∅"
        width = max(1, len(label))
        if x + width > chars_per_line and x > 0:
            x, line = 0, line + 1
        boxes.append((i, x, line, width, label))
        x += width
        if "\n" in texts[i]:
            x, line = 0, line + 1
    lines = (boxes[-1][2] + 1) if boxes else 1

    token_height = 0.28 * lines + 0.6
    fig_width = max(8.0, chars_per_line * 0.07)
    # Monospace glyphs are ~0.6 em wide; size the font so one character fills one grid cell of the axes (~88%).
    fontsize = min(8.0, 0.88 * fig_width * 72 / (chars_per_line + 2) / 0.62)
    fig = _new_figure((fig_width, token_height + 3.2))
    grid = fig.add_gridspec(3, 1, height_ratios=[token_height, 0.12, 2.6])
    ax_tok = fig.add_subplot(grid[0])
    ax_bar = fig.add_subplot(grid[1])
    ax_sig = fig.add_subplot(grid[2])

    for i, bx, by, width, label in boxes:
        y = lines - 1 - by
        if mask[i]:
            face, text_colour = cm(norm(vals[i])), "black"
            if sum(face[:3]) < 1.2:
                text_colour = "white"
        else:
            face, text_colour = (0.88, 0.88, 0.88, 1.0), "0.45"
        branch = i in ranks
        ax_tok.add_patch(Rectangle((bx, y + 0.08), width, 0.84, facecolor=face,
                                   edgecolor="black" if branch else "none", linewidth=1.8 if branch else 0))
        ax_tok.text(bx + width / 2, y + 0.5, label, ha="center", va="center", fontsize=fontsize, family="monospace",
                    color=text_colour, style="normal" if mask[i] else "italic")
        if branch:
            ax_tok.text(bx + width, y + 0.95, ",".join(str(r) for r, _ in ranks[i]), ha="left", va="bottom",
                        fontsize=6, color="black", bbox=dict(boxstyle="square,pad=0.1", fc="#ffe066", lw=0))
    ax_tok.set_xlim(0, chars_per_line + 2)
    ax_tok.set_ylim(0, lines + 0.2)
    ax_tok.axis("off")
    if title is None:
        parts = [f"step {record['step']}" if "step" in record else None,
                 f"group {record['group']}" if "group" in record else None,
                 f"root reward {float(record['reward']):+.3f}" if "reward" in record else None,
                 "Ω degenerate (entropy ranking)" if record.get("degenerate") else None]
        title = " · ".join(p for p in parts if p)
        if shown < n:
            title += f" · first {shown} of {n} tokens"
    ax_tok.set_title(title or "trajectory", fontsize=9, loc="left")

    from matplotlib.colorbar import ColorbarBase

    ColorbarBase(ax_bar, cmap=cm, norm=norm, orientation="horizontal")
    ax_bar.set_xlabel(f"{value_label} (tool tokens grey, branch points boxed, label = rank)", fontsize=8)
    ax_bar.tick_params(labelsize=7)

    t = list(range(n))

    def on_model(seq):
        return [float(v) if m else float("nan") for v, m in zip(seq, mask, strict=True)]

    for start, end in tool_spans(mask):
        ax_sig.axvspan(start - 0.5, end - 0.5, color="0.85", zorder=0, lw=0)
    if "entropy_z" in record:
        ax_sig.plot(t, on_model(record["entropy_z"]), label="z(H) entropy", color="tab:orange", lw=1)
    if "omega_z" in record:
        ax_sig.plot(t, on_model(record["omega_z"]), label="z(Ω) future likelihood gain", color="tab:green", lw=1)
    ax_sig.plot(t, on_model(record["bs"]), label="BS = z(H)·z(Ω)", color="tab:purple", lw=1.4)
    if values is not None:
        ax_sig.plot(t, on_model(vals), label=value_label, color="tab:blue", lw=1, ls=":")
    for pos in sorted(ranks):
        ax_sig.axvline(pos, color="black", ls="--", lw=0.9, zorder=3)
        ax_sig.annotate(",".join(f"#{r}" for r, _ in ranks[pos]), (pos, 1.0), xycoords=("data", "axes fraction"),
                        fontsize=7, ha="center", va="bottom")
    ax_sig.axhline(0, color="0.5", lw=0.5)
    ax_sig.set_xlim(-0.5, max(n - 0.5, 0.5))
    ax_sig.set_xlabel("completion token t (grey = tool output)")
    ax_sig.set_ylabel("z-score")
    ax_sig.legend(fontsize=7, loc="upper right", ncols=2)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


# --------------------------------------------------------------------------------------------------------------
# Learning curves
# --------------------------------------------------------------------------------------------------------------

RunSource = str | os.PathLike | Sequence[Mapping[str, Any]]


def load_log_history(source: RunSource) -> list[dict[str, Any]]:
    """A run's log entries (dicts with ``step`` and metrics) from any of:

    * a list of dicts (``trainer.state.log_history``),
    * a ``trainer_state.json`` file, or a folder holding one (an ``output_dir``; its latest ``checkpoint-*`` is used
      when the folder itself has none),
    * a ``.jsonl`` file with one metrics dict per line.
    """
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return [dict(e) for e in source]
    path = Path(source)
    if path.is_dir():
        candidates = [path / "trainer_state.json"]
        checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"),
                             key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit()
                             else -1)
        candidates += checkpoints[::-1]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileNotFoundError(f"No trainer_state.json in {path} or its checkpoint-* folders.")
        path = found
    if path.suffix == ".jsonl":
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "log_history" in data:
        return list(data["log_history"])
    if isinstance(data, list):
        return data
    raise ValueError(f"{path}: expected a trainer_state.json (with log_history) or a list of log dicts.")


def _is_single_run(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return True
    if isinstance(source, Sequence) and source and isinstance(source[0], Mapping):
        return True  # a log_history list
    return isinstance(source, Sequence) and not source


def _expand(source: Any) -> list[RunSource]:
    """A label's runs: one source, a list of sources (seeds), or a glob pattern string."""
    if isinstance(source, str) and any(ch in source for ch in "*?["):
        matches = sorted(glob.glob(source))
        if not matches:
            raise FileNotFoundError(f"The pattern {source!r} matched no run.")
        return matches
    if _is_single_run(source):
        return [source]
    return list(source)


def _metric_key(history: Iterable[Mapping[str, Any]], metric: str) -> str | None:
    keys = {k for e in history for k in e}
    if metric in keys:
        return metric
    suffix = [k for k in keys if k.endswith("/" + metric)]
    return suffix[0] if len(suffix) == 1 else None


def _series(history: list[Mapping[str, Any]], metric: str, x: str) -> tuple[list[float], list[float]]:
    key = _metric_key(history, metric)
    if key is None:
        return [], []
    pts = {}
    for e in history:
        v = e.get(key)
        if v is None or x not in e or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        pts[float(e[x])] = float(v)  # a later entry for the same step wins
    xs = sorted(pts)
    return xs, [pts[k] for k in xs]


def _smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1:
        return ys
    out, acc = [], []
    for y in ys:
        acc.append(y)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_learning_curves(
    runs: Mapping[str, Any],
    metric: str = "reward",
    path: str | os.PathLike | None = None,
    *,
    x: str = "step",
    spread: str = "std",
    smooth: int = 1,
    ax=None,
    title: str | None = None,
    dpi: int = 110,
):
    """Plot ``metric`` against ``x`` for labelled runs: APPO against its baselines, mean ± spread over seeds.

    Args:
        runs: ``{label: source}``; a source is one run (a ``log_history`` list, a ``trainer_state.json`` path or an
            ``output_dir``, a metrics ``.jsonl`` path), a list of runs (seeds of that label), or a glob pattern
            matching several run paths.
        metric: log key to plot, e.g. ``"reward"``, ``"appo/branch_reward"``; a key ending in ``/<metric>`` is used
            when exactly one matches.
        path: where to save the figure (None: only return it).
        x: the log key on the horizontal axis (``"step"``, or ``"epoch"``).
        spread: band around the mean when a label has several runs: ``"std"`` (± one standard deviation),
            ``"sem"`` (± standard error) or ``"minmax"``; ``"none"`` draws only the mean.
        smooth: trailing moving-average window applied to each run before averaging (1 = none).
        ax: draw into this matplotlib Axes instead of a new figure.
        title: axes title; default names the metric and the seed counts.
        dpi: resolution of the saved file.

    Seeds are aligned on the union of their ``x`` values by linear interpolation, restricted to the range every
    seed covers (so the mean never mixes in extrapolated values).

    Returns:
        The ``matplotlib.figure.Figure`` (one line per label; one shaded band per label with several runs).

    Raises:
        ValueError: a label has no run that logged ``metric``; the message lists the keys that were logged.
    """
    import numpy as np

    if spread not in ("std", "sem", "minmax", "none"):
        raise ValueError(f"spread={spread!r}; choose 'std', 'sem', 'minmax' or 'none'.")
    if ax is None:
        fig = _new_figure((7.0, 4.2))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    counts = []
    for label, source in runs.items():
        histories = [load_log_history(s) for s in _expand(source)]
        series = [_series(h, metric, x) for h in histories]
        series = [(xs, _smooth(ys, smooth)) for xs, ys in series if xs]
        if not series:
            logged = sorted({k for h in histories for e in h for k in e})
            raise ValueError(f"No run of {label!r} logged {metric!r} against {x!r}. Logged keys: {logged}")
        counts.append(len(series))
        if len(series) == 1:
            (line,) = ax.plot(series[0][0], series[0][1], label=label, lw=1.6)
            continue
        lo = max(xs[0] for xs, _ in series)
        hi = min(xs[-1] for xs, _ in series)
        grid = np.array(sorted({v for xs, _ in series for v in xs if lo <= v <= hi}))
        if grid.size == 0:
            raise ValueError(f"The runs of {label!r} cover disjoint {x} ranges; nothing to average.")
        stack = np.stack([np.interp(grid, xs, ys) for xs, ys in series])
        mean = stack.mean(axis=0)
        (line,) = ax.plot(grid, mean, label=f"{label} (n={len(series)})", lw=1.6)
        if spread != "none":
            if spread == "minmax":
                low, high = stack.min(axis=0), stack.max(axis=0)
            else:
                dev = stack.std(axis=0, ddof=1)
                if spread == "sem":
                    dev = dev / math.sqrt(len(series))
                low, high = mean - dev, mean + dev
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    band = {"std": "mean ± std", "sem": "mean ± s.e.m.", "minmax": "mean, min–max", "none": "mean"}[spread]
    ax.set_title(title or (f"{metric}" + (f" ({band} over seeds)" if max(counts, default=1) > 1 else "")),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
