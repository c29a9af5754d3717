"""trl_appo.branching: the step through a fake port, branch rows for the loss (branch_loss="suffix"), batch rows,
and the step in the trainer."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from trl_appo import batch_rows, branching, core
from trl_appo.branching import StepSettings
from trl_appo.config import APPOConfig
from trl_appo.rollout.engine import Rollout
from trl_appo.tools.base import ToolStats

from test_trainer import Recorder, make_args, make_trainer

PAD = 0


def _rollout(ids, mask, prefix_length, logprobs=None):
    return Rollout(prompt_ids=[7, 8], completion_ids=ids, model_mask=mask, logprobs=logprobs, messages=[], text="",
                   tool_stats=ToolStats(), finish_reason="stop", prefix_length=prefix_length)


def _fake_port(logp_value=-1.5, eos=(9,)):
    def policy_logps(input_ids, attention_mask, C, compute_entropy=False):
        return torch.full((input_ids.shape[0], C), logp_value), None

    return SimpleNamespace(
        device=torch.device("cpu"),
        pad_token_id=PAD,
        eos_token_ids=list(eos),
        policy_logps=policy_logps,
        reference_logps=lambda input_ids, attention_mask, C: torch.full((input_ids.shape[0], C), -3.0),
    )


def _settings(tmp_path, **kw):
    return StepSettings.from_config(make_args(tmp_path, **kw))


def _root_batch(with_old=True, with_ref=False):
    # Two roots of one prompt: left-padded prompts, right-padded completions.
    batch = {
        "prompt_ids": torch.tensor([[PAD, 7, 8], [PAD, 7, 8]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [0, 1, 1]]),
        "completion_ids": torch.tensor([[11, 12, 13, 9], [21, 22, PAD, PAD]]),
        "completion_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "tool_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]),
        "advantages": torch.tensor([0.5, -0.5]),
        "num_items_in_batch": torch.tensor(5.0),
        "appo_group": torch.tensor([0, 0]),
        "appo_root_rewards": torch.tensor([[1.0], [0.0]]),
        "appo_inputs": [{"prompt": "q"}, {"prompt": "q"}],
    }
    if with_old:
        batch["old_per_token_logps"] = torch.full((2, 4), -1.0)
    if with_ref:
        batch["ref_per_token_logps"] = torch.full((2, 4), -2.0)
    return batch


def test_branch_row_loss_mask_is_zero_on_the_prefix_and_the_model_mask_after(tmp_path):
    batch = _root_batch(with_old=True, with_ref=True)
    view = branching.RootView.of(batch)
    # Root 0 branched after its first two tokens (a tool token inside the prefix), root 1 after one token.
    branches = [
        _rollout([11, 12, 31, 32, 33, 9], [1, 0, 1, 0, 1, 1], prefix_length=2),
        _rollout([21, 41, 9], [1, 1, 1], prefix_length=1),
    ]
    pts = core.BranchPoints(root=torch.tensor([0, 1]), position=torch.tensor([1, 0]), strict=torch.tensor([1, 1]).bool(),
                            fallback=torch.tensor([0, 0]), score=torch.tensor([0.3, 0.2]))
    rows = branching.build_branch_rows(_fake_port(), _settings(tmp_path), view, pts, branches,
                                       torch.tensor([0.7, -0.2]))

    assert rows["tool_mask"].tolist() == [[0, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert rows["completion_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert rows["completion_ids"].tolist() == [[11, 12, 31, 32, 33, 9], [21, 41, 9, PAD, PAD, PAD]]
    assert torch.equal(rows["prompt_ids"], batch["prompt_ids"])  # the root's prompt, padded as the roots'
    assert rows["advantages"][0].unique().tolist() == pytest.approx([0.7])
    assert rows["advantages"][1].unique().tolist() == pytest.approx([-0.2])
    # off-policy batch: the branch rows carry behaviour log-probs (the current weights sampled them) ...
    assert torch.all(rows["old_per_token_logps"] == -1.5)
    # ... and reference log-probs because the roots have them (beta > 0)
    assert torch.all(rows["ref_per_token_logps"] == -3.0)


def test_branch_rows_without_old_logps_when_the_batch_is_on_policy_and_truncated_rows_masked(tmp_path):
    view = branching.RootView.of(_root_batch(with_old=False))
    branches = [_rollout([11, 12, 31], [1, 0, 1], 2), _rollout([21, 41, 9], [1, 1, 1], 1)]  # the first is cut off
    pts = core.BranchPoints(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([1, 1]).bool(),
                            torch.tensor([0, 0]), torch.tensor([0.0, 0.0]))
    rows = branching.build_branch_rows(_fake_port(), _settings(tmp_path, mask_truncated_completions=True), view, pts,
                                       branches, torch.zeros(2))
    assert "old_per_token_logps" not in rows and "ref_per_token_logps" not in rows
    assert rows["tool_mask"].tolist() == [[0, 0, 0], [0, 1, 1]]  # mask_truncated_completions honoured
    assert rows["completion_mask"][0].sum() == 0


def test_append_rows_repads_and_refuses_a_missing_loss_column():
    batch = _root_batch()
    extra = {
        "prompt_ids": torch.tensor([[7, 8]]), "prompt_mask": torch.tensor([[1, 1]]),
        "completion_ids": torch.tensor([[5, 6, 7, 8, 9, 9]]), "completion_mask": torch.ones(1, 6, dtype=torch.long),
        "tool_mask": torch.tensor([[0, 0, 1, 1, 1, 1]]), "advantages": torch.full((1, 6), 2.0),
        "old_per_token_logps": torch.zeros(1, 6),
    }
    batch["advantages"] = batch["advantages"][:, None].expand(2, 4)
    out = batch_rows.append_rows(batch, extra, PAD)
    assert out["completion_ids"].shape == (3, 6) and out["prompt_ids"].shape == (3, 3)
    assert out["prompt_ids"][2].tolist() == [PAD, 7, 8] and out["prompt_mask"][2].tolist() == [0, 1, 1]
    assert out["completion_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert out["tool_mask"][2].tolist() == [0, 0, 1, 1, 1, 1]
    assert "appo_group" not in out and out["num_items_in_batch"] == 5.0
    assert batch_rows.loss_tokens(out) == 3 + 2 + 4  # root 0: 3 (one tool token), root 1: 2, branch: 4
    del extra["old_per_token_logps"]
    with pytest.raises(KeyError, match="old_per_token_logps"):
        batch_rows.append_rows(batch, extra, PAD)


def test_shared_end_keep_and_resample():
    pos = torch.tensor([5, 0, -1])
    assert branching.shared_end(pos, keep_token=True).tolist() == [5, 0, -1]
    assert branching.shared_end(pos, keep_token=False).tolist() == [4, -1, -1]


# ------------------------------------------------------------------ the step through a fake port (no trainer, no model)


class FakePort:
    """A `StepPort` of plain tensors: scripted entropies, a scripted engine and scripted branch rewards.

    Records every call the step makes out through it (`calls`), so the test also pins what the step needs.
    """

    def __init__(self, entropy, branch_rewards, continuations):
        self.device = torch.device("cpu")
        self.rank = 0
        self.pad_token_id = PAD
        self.eos_token_ids = [9]
        self.reward_weights = torch.ones(1)
        self.generator = torch.Generator().manual_seed(0)
        self.global_step = 7
        self.tokenizer = SimpleNamespace(decode=lambda ids, **kw: " ".join(map(str, ids)),
                                         convert_ids_to_tokens=lambda ids: [str(i) for i in ids])
        self._entropy, self._rewards, self._continuations = entropy, branch_rewards, continuations
        self.calls = []
        self.prefixes = None
        self.forked = False

    def gather(self, tensor):
        self.calls.append("gather")
        return tensor

    def policy_logps(self, input_ids, attention_mask, logits_to_keep, compute_entropy=False):
        self.calls.append("policy_logps")
        logps = torch.full((input_ids.shape[0], logits_to_keep), -1.0)
        return logps, (self._entropy if compute_entropy else None)

    def reference_logps(self, input_ids, attention_mask, logits_to_keep):
        self.calls.append("reference_logps")
        return torch.full((input_ids.shape[0], logits_to_keep), -2.0)

    def omega_reference_logps(self, rows, input_ids, attention_mask, logits_to_keep, logp_current):
        self.calls.append("omega_reference_logps")
        return logp_current

    def whitespace_table(self):
        self.calls.append("whitespace_table")
        return torch.zeros(64, dtype=torch.bool)

    @contextlib.contextmanager
    def fork_environments(self, inputs):
        self.calls.append("fork_environments")
        self.forked = True
        try:
            yield [("session", i) for i in range(len(inputs))], [row["prompt"] for row in inputs]
        finally:
            self.forked = False

    def rollout(self, prompt_ids, prefixes, sessions=None):
        self.calls.append("rollout")
        assert self.forked and sessions == [("session", i) for i in range(len(prompt_ids))]
        self.prefixes = prefixes
        out = []
        for p, prefix, extra in zip(prompt_ids, prefixes, self._continuations, strict=True):
            ids = prefix.completion_ids + extra
            out.append(_rollout(ids, prefix.model_mask + [1] * len(extra), len(prefix.completion_ids)))
            out[-1].prompt_ids = p
        return out

    def branch_rewards(self, inputs, prompts, completions, completion_ids):
        self.calls.append("branch_rewards")
        assert self.forked  # rewarded on the forked environments
        assert prompts == ["q", "q"] and [c for c in completions] == ["", ""]
        return self._rewards


def _step_batch():
    # One prompt, N = 2 roots. Root 0: tokens 10 11 [12 = tool output] 13; root 1: 20 21 22 and padding.
    return {
        "prompt_ids": torch.tensor([[5, 6], [5, 6]]), "prompt_mask": torch.ones(2, 2, dtype=torch.long),
        "completion_ids": torch.tensor([[10, 11, 12, 13], [20, 21, 22, PAD]]),
        "completion_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "tool_mask": torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]),
        "advantages": torch.zeros(2), "num_items_in_batch": torch.tensor(7.0),
        "appo_group": torch.tensor([0, 0]), "appo_root_rewards": torch.tensor([[1.0], [0.0]]),
        "appo_inputs": [{"prompt": "q"}, {"prompt": "q"}],
    }


def _step_port():
    # Entropy picks token 1 of root 0 (token 2 is a tool token, 3 its last) and token 0 of root 1 (2 is its last).
    entropy = torch.tensor([[0.1, 0.9, 5.0, 0.2], [0.8, 0.3, 0.4, 0.0]])
    return FakePort(entropy, branch_rewards=torch.tensor([[0.0], [1.0]]), continuations=[[30, 9], [40, 41, 9]])


@pytest.mark.parametrize("branch_advantage", ["dual_group", "local"])
def test_branch_and_credit_through_a_fake_port_gives_hand_computed_advantages_and_rows(tmp_path, branch_advantage):
    settings = _settings(tmp_path, num_generations=4, num_branches=1, branch_criterion="entropy",
                         procedure_scale=False, dual_groups=True, branch_loss="suffix",
                         branch_advantage=branch_advantage,
                         max_completion_length=8, min_branch_tokens=1, branch_point_token="keep")
    assert (settings.num_roots, settings.num_branches) == (2, 1)
    port, batch = _step_port(), _step_batch()
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = branching.branch_and_credit(batch, port, settings, for_loss=True, want_records=True)

    # The prefixes the engine continued: root 0 through token 1 (kept), root 1 through token 0.
    assert [p.completion_ids for p in port.prefixes] == [[10, 11], [20]]
    # Â over each group of two (TRL's Bessel std + 1e-4): roots (1, 0) -> (a, -a); branches (0, 1) -> (-a, a).
    a = 0.5 / (0.5**0.5 + 1e-4)
    # A_{i,t} = Â_i + mean Â_b over branches sharing t, 0 off the model mask (the tool token, the padding).
    expected = torch.tensor([[a - a, a - a, 0.0, a], [-a + a, -a, -a, 0.0]])
    torch.testing.assert_close(out.advantages, expected, atol=1e-6, rtol=0)
    rows = out.branch_rows
    assert rows["completion_ids"].tolist() == [[10, 11, 30, 9], [20, 40, 41, 9]]
    assert rows["tool_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]  # the copied prefix is not trained
    if branch_advantage == "dual_group":
        branch_adv = [-a, a]
    else:  # R_b − V(fork): V = mean of the root and its branches through the fork; / std of the prompt's 4 rewards
        std = (1 / 3) ** 0.5
        branch_adv = [(0 - 0.5) / (std + 1e-4), (1 - 0.5) / (std + 1e-4)]
    torch.testing.assert_close(rows["advantages"][:, 0], torch.tensor(branch_adv), atol=1e-5, rtol=0)
    assert "old_per_token_logps" not in rows  # on-policy roots: none for the branches either

    # The step returned what it produced and left the batch alone.
    for k, v in before.items():
        assert (torch.equal(batch[k], v) if isinstance(v, torch.Tensor) else batch[k] == v), k
    report = out.report
    assert report.metrics["appo/branch_points_per_root"] == 1.0
    # Root 0's point is next to its tool token; root 1's only "neighbour" is right padding, which is no tool call.
    assert report.metrics["appo/branch_near_tool_frac"] == 0.5
    assert [len(r["branches"]) for r in report.records] == [1, 1] and report.records[0]["step"] == 7
    assert report.records[0]["credit"] == pytest.approx(expected[0].tolist(), abs=1e-6)
    # What the step asked of the port: one scoring forward, the engine once, the rewards once, no Ω reference
    # (the entropy criterion declares it does not read Ω), and gathers (rewards, [fork points], metrics).
    assert port.calls.count("policy_logps") == 1 and port.calls.count("rollout") == 1
    assert port.calls.count("branch_rewards") == 1 and "omega_reference_logps" not in port.calls
    assert port.calls.count("fork_environments") == 1 and port.calls.index("fork_environments") < port.calls.index(
        "rollout")  # the branches' environments are forked before the engine runs them
    assert port.calls.count("gather") == (4 if branch_advantage == "local" else 3)


def test_near_tool_is_one_rule_that_ignores_right_padding():
    from trl_appo import records

    # Three model tokens and no tool output: padding after the completion is not a tool call.
    assert not records.near_tool([1, 1, 1], 1)
    assert records.near_tool([1, 1, 1, 1, 0], 1)  # a tool token 3 tokens away
    assert not records.near_tool([1, 1, 1, 1, 1, 0], 1)  # 4 away
    assert not records.near_tool([0, 1], -1)  # no shared prefix: no point


def test_a_context_criterion_gets_the_roots_log_probs_rows_and_tokenizer_and_picks_through_hint_ranking(tmp_path):
    seen = {}

    @core.register_branch_criterion("test_context_hint", needs_context=True)
    def by_hint(scores, entropy_key, candidates, generator, *, context):
        seen["context"] = context
        return core.hint_ranking([1, 0], candidates, generator)

    try:
        settings = _settings(tmp_path, num_generations=4, num_branches=1, branch_criterion="test_context_hint",
                             branch_loss="suffix", max_completion_length=8, min_branch_tokens=1,
                             branch_point_token="keep")
        port = _step_port()
        out = branching.branch_and_credit(_step_batch(), port, settings, for_loss=True)
    finally:
        del core.BRANCH_CRITERIA["test_context_hint"]
    ctx = seen["context"]
    assert ctx.completion_ids == [[10, 11, 12, 13], [20, 21, 22]] and ctx.inputs == [{"prompt": "q"}] * 2
    assert ctx.model_mask == [[1, 1, 0, 1], [1, 1, 1]] and ctx.tokenizer is port.tokenizer and ctx.keep_token
    # The fake policy gives every token log p = -1; tool output and padding read 0.
    assert ctx.logp.tolist() == [[-1.0, -1.0, 0.0, -1.0], [-1.0, -1.0, -1.0, 0.0]]
    assert [p.completion_ids for p in port.prefixes] == [[10, 11], [20]]  # the hinted tokens, kept
    assert "omega_reference_logps" not in port.calls
    assert out.report.metrics["appo/branch_hint_frac"] == 1.0  # both points were placed by the hints


# ------------------------------------------------------------------ in the trainer


@pytest.fixture
def first_token_criterion():
    """A registered criterion that always picks the first candidate token (to build empty-prefix branches)."""

    @core.register_branch_criterion("first_token")
    def first(scores, entropy, candidates, generator):
        T = candidates.shape[1]
        zeros = torch.zeros(candidates.shape)
        return zeros.long(), -torch.arange(T, dtype=torch.float32).expand(candidates.shape[0], T), zeros

    yield "first_token"
    del core.BRANCH_CRITERIA["first_token"]


def _no_whitespace(trainer):
    vocab = trainer.model.config.vocab_size
    trainer._appo_whitespace = torch.zeros(max(vocab, len(trainer._tokenizer)), dtype=torch.bool)


def test_suffix_with_empty_prefixes_in_one_group_is_grpo_on_all_m_rollouts(
    tiny_model, tiny_tokenizer, tmp_path, first_token_criterion
):
    # Resampling the first token leaves no shared prefix; with one group over roots and branches and no
    # future-KL, every one of the M rollouts is trained with GRPO's advantage over the M rewards of its prompt.
    args = make_args(tmp_path, branch_criterion=first_token_criterion, branch_point_token="resample",
                     branch_loss="suffix", dual_groups=False, future_kl=False, procedure_scale=False,
                     min_branch_tokens=1)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    _no_whitespace(trainer)
    dual = Recorder(core, "dual_group_advantages")
    try:
        losses = Recorder(trainer, "_compute_loss")
        runs = Recorder(trainer._appo_engine, "run")
        trainer.train()
    finally:
        core.dual_group_advantages = dual._orig
    branch_kwargs, branches = runs.calls[1][1], runs.calls[1][2]
    assert all(p is None for p in branch_kwargs["prefixes"])  # nothing shared
    (root_rw, branch_rw, weights, n, p), _, _ = dual.calls[0]
    joint = torch.cat([root_rw, branch_rw])  # one prompt: its N roots and N·B branches
    expected = core._grpo_advantages(joint, weights, len(joint), "group", "sum_then_normalize")

    inputs = losses.calls[0][0][1]
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    assert inputs["completion_ids"].shape[0] == args.num_generations  # all M rollouts reach the loss
    assert bool(mask.any(dim=1).all())  # every row has model tokens in the loss
    got = torch.stack([inputs["advantages"][i][mask[i].bool()][0] for i in range(mask.shape[0])])
    torch.testing.assert_close(got.sort().values, expected.sort().values)
    # each branch's every model token is in the loss (empty prefix)
    assert int(mask.sum()) == sum(sum(r.model_mask) for r in runs.calls[0][2]) + sum(sum(b.model_mask) for b in branches)


def test_suffix_per_update_with_accumulation_iterations_kl_and_dapo(tiny_tokenizer, tmp_path):
    from trl_appo.testing import build_tiny_model, save_tiny_pair

    model_dir = save_tiny_pair(build_tiny_model(tiny_tokenizer), tiny_tokenizer, str(tmp_path / "model"))
    args = make_args(tmp_path / "out", branch_schedule="per_update", branch_loss="suffix", branch_advantage="local",
                     gradient_accumulation_steps=2, steps_per_generation=4, per_device_train_batch_size=4,
                     num_generations=4, num_branches=1, num_iterations=2, beta=0.05, loss_type="dapo",
                     max_steps=2)
    trainer = make_trainer(model_dir, tiny_tokenizer, args)
    losses = Recorder(trainer, "_compute_loss")
    trainer.train()
    assert len(losses.calls) == 4  # 2 optimizer steps x GA 2
    first_window = losses.calls[:2]
    tokens = sum(int((c[0][1]["completion_mask"] * c[0][1]["tool_mask"]).sum()) for c in first_window)
    for (_, inputs), _, _ in losses.calls:
        assert inputs["completion_ids"].shape[0] == args.per_device_train_batch_size  # roots + branches, no more
        for key in ("old_per_token_logps", "ref_per_token_logps", "advantages", "tool_mask"):
            assert inputs[key].shape == inputs["completion_ids"].shape, key
    # DAPO's normaliser counts this window's tokens, roots and branches (scaled as TRL scales it)
    window_items = first_window[0][0][1]["num_items_in_batch"]
    assert float(window_items) == pytest.approx(tokens * args.steps_per_generation / args.gradient_accumulation_steps)
    logs = {k for e in trainer.state.log_history for k in e}
    assert "appo/branch_loss_tokens" in logs and "kl" in logs


def test_suffix_loss_and_gradients_equal_a_plain_loop(tiny_model, tiny_tokenizer, tmp_path):
    """A hand-built batch of one root and one branch row: TRL's loss over our rows = a token-by-token loop."""
    args = make_args(tmp_path, branch_loss="suffix", future_kl=False, loss_type="dapo")
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    model = trainer.model
    prompt = [5, 6, 7]
    root = [11, 12, 13, 14, 15]
    branch = [11, 12, 20, 21]  # shares 11, 12 with the root
    inputs = {
        "prompt_ids": torch.tensor([prompt, prompt]), "prompt_mask": torch.ones(2, 3, dtype=torch.long),
        "completion_ids": torch.tensor([root, branch + [0]]),
        "completion_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        "tool_mask": torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 1]]),  # a tool token in the root; the branch prefix
        "advantages": torch.tensor([[0.5, 0.5, 0.5, 1.5, 1.5], [-1.0, -1.0, -1.0, -1.0, -1.0]]),
        "old_per_token_logps": None,
        "num_items_in_batch": torch.tensor(6.0 * args.steps_per_generation),
    }
    inputs = {k: v for k, v in inputs.items() if v is not None}
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; this calls the loss directly
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    total = 0.0
    for ids, mask, adv in ((root, [1, 1, 0, 1, 1], inputs["advantages"][0]), (branch, [0, 0, 1, 1], inputs["advantages"][1])):
        seq = torch.tensor([prompt + ids])
        logits = model(seq).logits[0, len(prompt) - 1 : -1] / args.temperature
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(ids)[:, None])[:, 0]
        for t, m in enumerate(mask):
            if m:  # ratio exp(logp - logp.detach()) = 1 in value; its gradient is ∇logp
                total = total - torch.exp(logp[t] - logp[t].detach()) * adv[t]
    ref_loss = total / 6.0  # six loss tokens in the window
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


def test_config_validates_the_new_branch_fields(tmp_path):
    for field, bad in (("branch_loss", "all"), ("branch_point_token", "drop"), ("branch_advantage", "global")):
        with pytest.raises(ValueError, match=field):
            APPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", num_generations=8,
                       per_device_train_batch_size=8, num_branches=1, **{field: bad})
    with pytest.raises(ValueError, match="branch_criterion"):
        APPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", num_generations=8,
                   per_device_train_batch_size=8, branch_criterion="nope")


def test_completions_table_lists_branches_and_the_roots_trained_credit(tiny_model, tiny_tokenizer, tmp_path):
    import pandas as pd

    args = make_args(tmp_path, branch_loss="suffix", log_completions=True, log_branch_trees=True)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    trainer.train()
    table = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "completions").glob("*.parquet")))
    kinds = table["appo_row"].value_counts().to_dict()
    assert kinds == {"root": args.num_roots, "branch": args.num_roots * args.num_branches}
    assert (table.loc[table["appo_row"] == "root", "appo_point"] == -1).all()
    assert (table.loc[table["appo_row"] == "branch", "appo_point"] >= -1).all()
    # the roots' advantage column is the mean per-token credit they were trained with (the branch-tree record's)
    from trl_appo.viz import load_branch_trees

    records = load_branch_trees(tmp_path)
    expected = sorted(
        sum(c for c, m in zip(r["credit"], r["model_mask"]) if m) / max(1, sum(r["model_mask"])) for r in records
    )
    got = sorted(table.loc[table["appo_row"] == "root", "advantage"].tolist())
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("allocation", ["uniform", "need"])
def test_groups_all_equal_before_and_after_branching_and_need_through_the_port(tmp_path, allocation):
    settings = _settings(tmp_path, num_generations=4, num_branches=1, branch_criterion="entropy",
                         procedure_scale=False, dual_groups=True, branch_loss="suffix", branch_allocation=allocation,
                         max_completion_length=8, min_branch_tokens=1, branch_point_token="keep")
    port, batch = _step_port(), _step_batch()
    batch["appo_root_rewards"] = torch.tensor([[1.0], [1.0]])  # the roots agree: GRPO learns nothing here
    out = branching.branch_and_credit(batch, port, settings)
    metrics = out.report.metrics
    assert metrics["appo/groups_all_equal_before"] == 1.0
    assert metrics["appo/groups_all_equal_after"] == 0.0  # the branches' rewards (0, 1) split the group
    # One prompt of two agreeing roots: "need" gives each root one branch, as uniform does, with the same credit.
    assert [p.completion_ids for p in port.prefixes] == [[10, 11], [20]]
    a = 0.5 / (0.5**0.5 + 1e-4)
    torch.testing.assert_close(out.branch_rows["advantages"][:, 0], torch.tensor([-a, a]), atol=1e-5, rtol=0)
    # "need" gathers each branch's prompt (its counts vary per prompt); uniform's are implied.
    assert port.calls.count("gather") == (4 if allocation == "need" else 3)
