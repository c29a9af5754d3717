"""Write the tutorial notebooks from the cells below, without outputs (so git diffs stay reviewable).

    python notebooks/build_notebooks.py            # rewrite notebooks/*.ipynb
    python notebooks/build_notebooks.py --check    # exit 1 if a committed notebook differs from this file

Edit the cells here, never the .ipynb files. Both notebooks run offline on CPU in about a minute each
(tests/test_notebooks.py executes them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Shared by both notebooks: offline, quiet, and the repository importable when run from notebooks/.
SETUP = """\
import os, sys, warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)
sys.path.insert(0, os.path.abspath(".."))  # run from notebooks/ without installing the package
import torch
from trl_appo.runtime import set_cpu_threads
torch.manual_seed(0)
print(set_cpu_threads()[1])  # all cores when idle, fewer on a busy machine; OMP_NUM_THREADS wins
"""

TOY_REWARD = '''\
from trl_appo.rewards import completion_to_text

def digit_recall_reward(completions, ground_truth, **kwargs):
    """Toy reward for an untrained model: the fraction of the gold answer's digits that the completion writes.

    A random 30k-parameter model never produces a well-formed <answer>\\\\boxed{}</answer>, so the paper's reward
    (trl_appo.rewards.format_f1_reward) would be -1 for every rollout and every advantage 0. This one varies
    between rollouts, which is all a demonstration of credit assignment needs."""
    out = []
    for completion, gold in zip(completions, ground_truth):
        text = completion_to_text(completion)
        digits = [d for d in str(gold) if d.isdigit()]
        out.append(sum(d in text for d in set(digits)) / max(len(set(digits)), 1))
    return out
'''


def quickstart() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# APPO quickstart: train a tiny tool-using agent on CPU and look at its branch points\n\n"
            "APPO (Agentic Procedural Policy Optimization) samples **N root rollouts** per prompt, scores every token "
            "the policy generated with the **Branching Score** BS = z(H)·z(Ω) (entropy × future likelihood gain), "
            "branches **B new rollouts** from the top tokens of each root, and sends the branches' outcomes back as "
            "credit to the prefix they share with the root.\n\n"
            "This notebook runs the whole loop in about a minute on a laptop CPU, offline:\n\n"
            "1. data from the offline task generator (`trl_appo.tasks`),\n"
            "2. a ~30k-parameter model and tokenizer built in code (`trl_appo.testing`),\n"
            "3. a few `APPOTrainer` steps with a sandboxed Python tool and `log_branch_trees=True`,\n"
            "4. one trajectory with its branch points (`trl_appo.viz.render_trajectory_html`) and the advantage each "
            "of its tokens received.\n\n"
            "The model is random, so it learns nothing useful here; the point is to see every moving part. "
            "`recipes/` has the real runs (Qwen2.5-7B, Qwen3-8B, Llama-3.1-8B)."
        ),
        new_code_cell(SETUP),
        new_markdown_cell(
            "## 1. Data\n\n`make_tiny_tasks` writes `What is a * b?` questions with a one-line system prompt for the "
            "paper's tag protocol: the model may write `<python>code</python>`, the environment appends "
            "`<result>…</result>`, and the answer goes in `<answer>\\boxed{…}</answer>`. Every loader in `trl_appo` "
            "returns the same columns: `prompt`, `ground_truth`, `data_source`, `ability`."
        ),
        new_code_cell(
            "from trl_appo.tasks import make_tiny_tasks\n\n"
            "data = make_tiny_tasks(n_train=32, n_heldout=8, seed=0)\n"
            "train_dataset = data[\"train\"]\n"
            "train_dataset[0]"
        ),
        new_markdown_cell(
            "## 2. Model, tokenizer, reward, tool\n\n"
            "`build_tiny_tokenizer` trains a ~400-token byte-level BPE with Qwen2's pre-tokeniser and TRL's Qwen2.5 chat "
            "template; the tag-protocol tags are single tokens. `build_tiny_model` is a 2-layer Qwen2 with random weights."
        ),
        new_code_cell(
            "from trl_appo.testing import build_tiny_model, build_tiny_tokenizer\n\n"
            "tokenizer = build_tiny_tokenizer()\n"
            "model = build_tiny_model(tokenizer, seed=0)\n"
            "print(f\"vocabulary {len(tokenizer)} tokens, {sum(p.numel() for p in model.parameters()):,} parameters\")"
        ),
        new_code_cell(TOY_REWARD),
        new_code_cell(
            "from trl_appo.tools.python import PythonTool\n\n"
            "python_tool = PythonTool(timeout=5.0)\n"
            "python_tool.python(\"print(347 * 29)\")  # what the agent gets back when it writes <python>print(347 * 29)</python>"
        ),
        new_markdown_cell(
            "## 3. Train a few APPO steps\n\n"
            "The budget is the paper's: **M = 16** rollouts per prompt = **N = 4** roots × (1 + **B = 3** branches). "
            "`per_device_train_batch_size` counts rollout slots (roots and branches), so 16 slots = one prompt per "
            "optimizer step, and `steps_per_generation=3` gives 3 optimizer steps per generation batch. With "
            "`branch_schedule=\"per_update\"` (the paper's) the roots of each step are branched just before that step "
            "with the *current* weights, so from the second step of a batch on, Ω measures how the updates so far "
            "moved each suffix's likelihood; on the first step Ω is constant (*degenerate*) and BS falls back to "
            "entropy.\n\n"
            "With `log_branch_trees=True` every branching call writes one record per root: its tokens, scores, branch "
            "points, and `credit`, the per-token advantage that root is trained with."
        ),
        new_code_cell(
            "import tempfile\n"
            "from trl_appo import APPOConfig, APPOTrainer\n\n"
            "output_dir = tempfile.mkdtemp(prefix=\"appo-quickstart-\")\n"
            "args = APPOConfig(\n"
            "    output_dir=output_dir, bf16=False, use_cpu=True, report_to=\"none\", save_strategy=\"no\",\n"
            "    logging_steps=1, seed=0, max_steps=3, learning_rate=1e-3, gradient_checkpointing=False,\n"
            "    per_device_train_batch_size=16, gradient_accumulation_steps=1, steps_per_generation=3,\n"
            "    num_generations=16, num_roots=4, num_branches=3,      # M = N·(1+B)\n"
            "    branch_criterion=\"bs\", branch_schedule=\"per_update\",\n"
            "    max_completion_length=40, min_branch_tokens=8, temperature=1.0,\n"
            "    tool_protocol=\"tags\", max_tool_calls=2,\n"
            "    log_branch_trees=True,\n"
            ")\n\n"
            "trainer = APPOTrainer(model=model, reward_funcs=digit_recall_reward, args=args,\n"
            "                      train_dataset=train_dataset, processing_class=tokenizer, tools=[python_tool])\n"
            "trainer.train()"
        ),
        new_markdown_cell(
            "The trainer logs APPO's own metrics next to GRPO's: how many branch points each root got, where they sit "
            "(relative position, near a tool call), how often Ω was degenerate, root and branch rewards, and the "
            "future-aware loss weight (`1 + b·f`, about 2 with the paper's b = 1)."
        ),
        new_code_cell(
            "import pandas as pd\n\n"
            "keys = [\"reward\", \"appo/root_reward\", \"appo/branch_reward\", \"appo/branch_points_per_root\",\n"
            "        \"appo/branch_position_rel\", \"appo/omega_degenerate_frac\", \"appo/credit_abs_mean\",\n"
            "        \"appo/future_kl_weight_mean\", \"loss\"]\n"
            "logs = pd.DataFrame([e for e in trainer.state.log_history if \"loss\" in e]).set_index(\"step\")\n"
            "logs[[k for k in keys if k in logs]].round(3)"
        ),
        new_markdown_cell(
            "## 4. One trajectory and its branch points\n\n"
            "`load_branch_trees` reads `<output_dir>/branch_trees/step_*.jsonl`: one record per root with its tokens, "
            "model-token mask, z(H), z(Ω), BS and its branches (position, score, reward, continuation). We pick a root "
            "from the last branching call whose Ω was not degenerate if there is one.\n\n"
            "In the rendering, the background is BS (red: high, blue: low), grey italic tokens are tool output "
            "(never trained on, never branched at), and boxed tokens are branch points with a `rank:score` "
            "superscript. Hover a token for its values, a branch point for the branch's reward and continuation."
        ),
        new_code_cell(
            "from IPython.display import HTML, Image, display\n"
            "from trl_appo.viz import load_branch_trees, render_trajectory_html, render_trajectory_png\n\n"
            "records = load_branch_trees(output_dir)\n"
            "files = sorted({r[\"file\"] for r in records})\n"
            "print(f\"{len(records)} root records in {len(files)} files; degenerate Ω per file:\",\n"
            "      {f: sum(r[\"degenerate\"] for r in records if r[\"file\"] == f) for f in files})\n"
            "last = [r for r in records if r[\"file\"] == files[-1]]\n"
            "# the non-degenerate root whose tokens received the most credit\n"
            "row = max(range(len(last)), key=lambda k: (not last[k][\"degenerate\"], sum(map(abs, last[k][\"credit\"]))))\n"
            "record = last[row]\n"
            "display(HTML(render_trajectory_html(record)))"
        ),
        new_markdown_cell(
            "### The advantage each token received\n\n"
            "docs/algorithm.md §3: A_{i,t} = (Â_i + mean_{b sharing t} Â_b) · S_{i,t}. Tokens a branch shares with its root "
            "(those before the point; the point itself too when `branch_point_token=\"keep\"`) share the "
            "outcome of the branches that continue after them; tokens after the last branch point get the root's "
            "advantage Â_i alone. (At loss time the future-aware weight `1 + b·f` multiplies this once more.) "
            "Same picture, coloured by advantage:"
        ),
        new_code_cell(
            "advantage = record[\"credit\"]\n"
            "display(HTML(render_trajectory_html(record, values=advantage, value_label=\"advantage\")))\n"
            "points = sorted(b[\"position\"] for b in record[\"branches\"] if b[\"position\"] >= 0)\n"
            "print(\"root reward\", round(record[\"reward\"], 3), \"| branch rewards\",\n"
            "      [round(b[\"reward\"], 3) for b in record[\"branches\"]], \"| branch points\", points)\n"
            "mask = record[\"model_mask\"]\n"
            "shared = 1 if record[\"point_token\"] == \"keep\" else 0  # does a branch share its point token?\n"
            "segments = [0] + [p + shared for p in points] + [len(mask)]\n"
            "for lo, hi in zip(segments, segments[1:]):\n"
            "    vals = [a for a, m in zip(advantage[lo:hi], mask[lo:hi]) if m]\n"
            "    if vals:\n"
            "        print(f\"tokens {lo:>2}-{hi - 1:>2}: mean advantage {sum(vals) / len(vals):+.3f}\")"
        ),
        new_markdown_cell(
            "The same trajectory as a static picture (`render_trajectory_png`): tokens coloured by BS, and the "
            "three signals along the sequence with branch points as dashed lines and tool output shaded."
        ),
        new_code_cell(
            "png = os.path.join(output_dir, \"trajectory.png\")\n"
            "render_trajectory_png(record, png)\n"
            "Image(png)"
        ),
        new_markdown_cell(
            "## Next\n\n"
            "* `02_branching_score.ipynb` takes the Branching Score apart on one rollout.\n"
            "* `python recipes/train_appo.py --config recipes/cpu/demo.yaml` is this run as a script; the other "
            "recipes train 7-8B models (see `docs/recipes.md`).\n"
            "* `trl_appo.viz.plot_learning_curves({\"APPO\": [...], \"GRPO\": [...]}, metric=\"reward\")` compares runs."
        ),
    ]
    return _notebook(cells)


def branching_score() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# The Branching Score on a real rollout\n\n"
            "APPO branches where a rollout's path really forked. For every token t the policy generated it combines two "
            "signals (docs/algorithm.md §1):\n\n"
            "* **entropy** H_t of the policy's full next-token distribution — the policy was *unsure* here;\n"
            "* **future likelihood gain** Ω_t = clip(exp(Σ_{k≥t} γ^{k−t} m_k (log π_θ(a_k) − log π_old(a_k))), "
            "1−ε_Ω, 1+ε_Ω) — how much the updates since sampling made *the rest of this trajectory* more likely;\n\n"
            "each z-normalised over the rollout's model tokens, and **BS_t = z(H)_t · z(Ω)_t**. A *strict* candidate "
            "has both z(H) > 0 and z(Ω) > 0: an uncertain token whose continuation the learning is pushing up.\n\n"
            "Here we sample rollouts from a tiny model (the behaviour policy π_old), let `APPOTrainer` update the model "
            "for a couple of steps (π_θ), and compute H, Ω and BS with the pure functions of `trl_appo.core` — the same "
            "ones the trainer calls."
        ),
        new_code_cell(SETUP),
        new_markdown_cell("## 1. A behaviour policy and its rollouts"),
        new_code_cell(
            "import copy\n"
            "from trl_appo.testing import build_tiny_model, build_tiny_tokenizer\n"
            "from trl_appo.tasks import make_tiny_tasks\n"
            "from trl_appo.tools.python import PythonTool\n"
            "from trl_appo.rollout import RolloutEngine, TagProtocol\n"
            "from trl_appo.evaluation import make_hf_generate_fn\n\n"
            "tokenizer = build_tiny_tokenizer()\n"
            "model = build_tiny_model(tokenizer, seed=1)\n"
            "behaviour = copy.deepcopy(model).eval()  # π_old: frozen copy of the weights that sample the rollouts\n"
            "train_dataset = make_tiny_tasks(n_train=32, n_heldout=4, seed=0)[\"train\"]\n\n"
            "MAX_LEN = 64\n"
            "engine = RolloutEngine(make_hf_generate_fn(behaviour, tokenizer, temperature=1.0), tokenizer,\n"
            "                       TagProtocol(tokenizer), [PythonTool(timeout=5.0)], max_completion_length=MAX_LEN,\n"
            "                       max_tool_calls=2)\n"
            "prompts = [train_dataset[i][\"prompt\"] for i in range(2)]\n"
            "prompt_ids = engine.tokenize_prompts(prompts)\n"
            "torch.manual_seed(0)\n"
            "rollouts = engine.run([p for p in prompt_ids for _ in range(4)], group_size=4)  # 4 roots per prompt\n"
            "for r in rollouts[:4]:\n"
            "    print(f\"{len(r.completion_ids):>3} tokens, {sum(r.model_mask):>3} from the model, \"\n"
            "          f\"finish={r.finish_reason:<6} | {r.text[:70]!r}\")"
        ),
        new_markdown_cell(
            "## 2. A couple of updates\n\n"
            "`APPOTrainer` trains `model` in place for two optimizer steps (toy reward: the share of the answer's digits "
            "the completion writes, since a random model never answers in the right format). The frozen `behaviour` "
            "copy keeps the weights that sampled the rollouts above, so π_θ ≠ π_old from now on."
        ),
        new_code_cell(TOY_REWARD),
        new_code_cell(
            "import tempfile\n"
            "from trl_appo import APPOConfig, APPOTrainer\n\n"
            "args = APPOConfig(\n"
            "    output_dir=tempfile.mkdtemp(prefix=\"appo-bs-\"), bf16=False, use_cpu=True, report_to=\"none\",\n"
            "    save_strategy=\"no\", logging_steps=1, seed=0, max_steps=2, learning_rate=1e-3,\n"
            "    gradient_checkpointing=False, per_device_train_batch_size=8, steps_per_generation=2,\n"
            "    num_generations=8, num_roots=4, num_branches=1, branch_schedule=\"per_generation\",\n"
            "    max_completion_length=32, min_branch_tokens=4, tool_protocol=\"tags\", max_tool_calls=1,\n"
            ")\n"
            "trainer = APPOTrainer(model=model, reward_funcs=digit_recall_reward, args=args,\n"
            "                      train_dataset=train_dataset, processing_class=tokenizer, tools=[PythonTool(timeout=5.0)])\n"
            "trainer.train()\n"
            "model = trainer.model.eval()\n"
            "moved = sum((p - q).abs().sum().item() for p, q in zip(model.parameters(), behaviour.parameters()))\n"
            "print(f\"total |Δθ| after {trainer.state.global_step} steps: {moved:.3f}\")"
        ),
        new_markdown_cell(
            "## 3. Entropy, log-probabilities and the score\n\n"
            "One forward pass of each policy over prompt + completion gives, for every completion token, the full "
            "next-token distribution (at the sampling temperature). Entropy comes from π_θ; Ω compares the log-prob of "
            "the sampled token under π_θ and π_old. Tool output (model_mask 0) is never scored."
        ),
        new_code_cell(
            "import torch.nn.functional as F\n"
            "from trl_appo import core\n\n"
            "def token_stats(policy, rollout, temperature=1.0):\n"
            "    \"\"\"(entropy (T,), log-prob of the sampled tokens (T,)) over the completion, one forward pass.\"\"\"\n"
            "    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])\n"
            "    with torch.no_grad():\n"
            "        logits = policy(input_ids=ids).logits[0].float() / temperature\n"
            "    P, T = len(rollout.prompt_ids), len(rollout.completion_ids)\n"
            "    logp_all = F.log_softmax(logits[P - 1 : P - 1 + T], dim=-1)  # position j predicts token j+1\n"
            "    entropy = -(logp_all.exp() * logp_all).sum(-1)\n"
            "    logp = logp_all.gather(1, torch.tensor(rollout.completion_ids)[:, None])[:, 0]\n"
            "    return entropy, logp\n\n"
            "T = max(len(r.completion_ids) for r in rollouts)\n"
            "def padded(rows, fill=0.0):\n"
            "    return torch.stack([torch.cat([x, x.new_full((T - len(x),), fill)]) for x in rows])\n\n"
            "stats_now = [token_stats(model, r) for r in rollouts]\n"
            "stats_old = [token_stats(behaviour, r) for r in rollouts]\n"
            "entropy = padded([h for h, _ in stats_now])\n"
            "logp_current = padded([lp for _, lp in stats_now])\n"
            "logp_old = padded([lp for _, lp in stats_old])\n"
            "mask = padded([torch.tensor(r.model_mask, dtype=torch.float32) for r in rollouts])\n\n"
            "bs = core.branching_score(entropy, logp_current, logp_old, mask, gamma=1.0, omega_clip=0.2)\n"
            "print(\"degenerate rows:\", bs.degenerate.tolist())\n"
            "print(\"Ω range over model tokens:\", round(bs.omega[mask.bool()].min().item(), 4), \"…\",\n"
            "      round(bs.omega[mask.bool()].max().item(), 4))"
        ),
        new_markdown_cell(
            "**Degenerate Ω.** If π_θ = π_old — the first update after sampling, before any weight moved — every "
            "log-ratio is 0, Ω ≡ 1, z(Ω) = 0 and BS would carry no information. `branching_score` detects the constant "
            "Ω, flags the row `degenerate`, and ranks by z(H) alone (ARPO-like entropy branching). That is why the "
            "paper branches *per update*: several optimizer steps per generation batch give Ω something to measure."
        ),
        new_code_cell(
            "same = core.branching_score(entropy, logp_current, logp_current, mask)\n"
            "print(\"π_θ vs itself → degenerate:\", same.degenerate.tolist())\n"
            "print(\"BS == z(H) there:\", torch.allclose(same.scores, same.z_entropy))"
        ),
        new_markdown_cell(
            "## 4. Picking branch points\n\n"
            "`branch_candidates` keeps model tokens that are not whitespace, not the last token, and leave at least "
            "`min_branch_tokens` of budget; `select_branch_points` takes the top-B strict candidates (z(H) > 0 and "
            "z(Ω) > 0) by BS, then fills by BS, then by entropy. The entropy-only ablation ranks by H alone: compare."
        ),
        new_code_cell(
            "lengths = torch.tensor([len(r.completion_ids) for r in rollouts])\n"
            "candidates = core.branch_candidates(mask.bool(), lengths, MAX_LEN, min_branch_tokens=8)\n"
            "B = 3\n"
            "by_bs = core.select_branch_points(bs, candidates, B, criterion=\"bs\")\n"
            "by_entropy = core.select_branch_points(bs, candidates, B, criterion=\"entropy\")\n"
            "i = int(torch.argmax((~bs.degenerate).float() * lengths))  # the longest non-degenerate rollout\n"
            "pick = lambda pts: [(int(s), round(float(v), 2)) for r, s, v in zip(pts.root, pts.position, pts.score) if r == i]\n"
            "print(f\"rollout {i}: {int(candidates[i].sum())} candidates of {int(mask[i].sum())} model tokens\")\n"
            "print(\"BS points (t, score):     \", pick(by_bs), \" strict:\", by_bs.strict[by_bs.root == i].tolist())\n"
            "print(\"entropy points (t, score):\", pick(by_entropy))"
        ),
        new_markdown_cell(
            "## 5. Entropy vs Ω vs BS\n\n"
            "Left: the three signals along rollout *i* (z-scores), chosen points as dashed lines. Right: every model "
            "token of every rollout in the (z(H), z(Ω)) plane, coloured by BS; the shaded quadrant holds the strict "
            "candidates. High entropy alone (right half) is not enough: APPO prefers the uncertain tokens whose future "
            "the updates are making more likely (top right) over those whose future is being suppressed (bottom right)."
        ),
        new_code_cell(
            "import matplotlib\n"
            "matplotlib.use(\"Agg\")\n"
            "from matplotlib.figure import Figure\n"
            "from IPython.display import Image, HTML, display\n\n"
            "n = int(lengths[i])\n"
            "on = mask[i, :n].bool()\n"
            "nan = float(\"nan\")\n"
            "line = lambda x: [float(v) if m else nan for v, m in zip(x[:n], on)]\n"
            "fig = Figure(figsize=(12, 4), layout=\"constrained\")\n"
            "ax1, ax2 = fig.subplots(1, 2, gridspec_kw={\"width_ratios\": [2, 1]})\n"
            "ax1.plot(line(bs.z_entropy[i]), label=\"z(H) entropy\", color=\"tab:orange\")\n"
            "ax1.plot(line(bs.z_omega[i]), label=\"z(Ω) future likelihood gain\", color=\"tab:green\")\n"
            "ax1.plot(line(bs.scores[i]), label=\"BS = z(H)·z(Ω)\", color=\"tab:purple\", lw=2)\n"
            "for s in by_bs.position[by_bs.root == i].tolist():\n"
            "    ax1.axvline(s, color=\"black\", ls=\"--\", lw=1)\n"
            "ax1.axhline(0, color=\"0.6\", lw=0.5)\n"
            "ax1.set_xlabel(\"completion token t\"); ax1.set_ylabel(\"z-score\"); ax1.legend(fontsize=8)\n"
            "ax1.set_title(f\"rollout {i}: dashed = BS branch points\", fontsize=10)\n"
            "sel = mask.bool()\n"
            "lim = float(bs.scores[sel].abs().max())\n"
            "ax2.axvspan(0, 10, ymin=0.5, ymax=1, color=\"0.92\", zorder=0)\n"
            "sc = ax2.scatter(bs.z_entropy[sel], bs.z_omega[sel], c=bs.scores[sel], cmap=\"RdBu_r\", vmin=-lim, vmax=lim, s=12)\n"
            "zh, zo = bs.z_entropy[sel], bs.z_omega[sel]\n"
            "ax2.set_xlim(float(zh.min()) - 0.3, float(zh.max()) + 0.3); ax2.set_ylim(-max(abs(float(zo.min())), abs(float(zo.max()))) - 0.3, max(abs(float(zo.min())), abs(float(zo.max()))) + 0.3)\n"
            "ax2.axhline(0, color=\"0.5\", lw=0.5); ax2.axvline(0, color=\"0.5\", lw=0.5)\n"
            "ax2.set_xlabel(\"z(H)\"); ax2.set_ylabel(\"z(Ω)\"); ax2.set_title(\"all model tokens (shaded: strict)\", fontsize=10)\n"
            "fig.colorbar(sc, ax=ax2, label=\"BS\")\n"
            "png = os.path.join(args.output_dir, \"branching_score.png\")\n"
            "fig.savefig(png, dpi=100)\n"
            "Image(png)"
        ),
        new_markdown_cell(
            "## 6. The same rollout through `trl_appo.viz`\n\n"
            "The trainer writes exactly this kind of record with `log_branch_trees=True`; here we build it by hand from "
            "the tensors above and render it."
        ),
        new_code_cell(
            "from trl_appo.viz import render_trajectory_html\n\n"
            "r = rollouts[i]\n"
            "record = {\n"
            "    \"tokens\": tokenizer.convert_ids_to_tokens(r.completion_ids),\n"
            "    \"token_text\": [tokenizer.decode([t]) for t in r.completion_ids],\n"
            "    \"model_mask\": r.model_mask,\n"
            "    \"entropy_z\": bs.z_entropy[i, :n].tolist(), \"omega_z\": bs.z_omega[i, :n].tolist(),\n"
            "    \"bs\": bs.scores[i, :n].tolist(), \"degenerate\": bool(bs.degenerate[i]),\n"
            "    \"branches\": [{\"position\": int(s), \"strict\": bool(st), \"fallback\": int(fb), \"score\": float(v),\n"
            "                  \"reward\": float(\"nan\"), \"text\": \"(not generated in this notebook)\"}\n"
            "                 for rt, s, st, fb, v in zip(by_bs.root, by_bs.position, by_bs.strict, by_bs.fallback, by_bs.score)\n"
            "                 if rt == i],\n"
            "}\n"
            "display(HTML(render_trajectory_html(record, title=f\"rollout {i}: background = BS, boxes = chosen points\")))"
        ),
        new_markdown_cell(
            "## Takeaways\n\n"
            "* BS needs both signals: entropy says *where the policy hesitated*, Ω says *whether learning is moving "
            "towards what followed*. Their product is large and positive only where both are above average.\n"
            "* Ω is informative only once π_θ has moved away from the sampling policy: branch per update "
            "(`branch_schedule=\"per_update\"`, several optimizer steps per generation batch) as the paper does; "
            "`appo/omega_degenerate_frac` in the logs says how often it fell back to entropy.\n"
            "* Everything here is `trl_appo.core`: `branching_score`, `branch_candidates`, `select_branch_points` are "
            "pure tensor functions you can call on any rollout."
        ),
    ]
    return _notebook(cells)


def _notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for k, cell in enumerate(nb.cells):  # stable ids keep diffs small
        cell["id"] = f"cell-{k:02d}"
    return nb


NOTEBOOKS = {"01_quickstart.ipynb": quickstart, "02_branching_score.ipynb": branching_score}


def main(argv: list[str]) -> int:
    stale = []
    for name, build in NOTEBOOKS.items():
        text = nbformat.writes(build()) + "\n"
        path = HERE / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build_notebooks.py): {stale}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
