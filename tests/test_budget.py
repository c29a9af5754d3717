"""rollout_budget='tokens' (docs/algorithm.md §9, budget-matched trees): the split N·(1 + B·c) ≈ M, micro-batches
of more than per_device_train_batch_size rows trained in sub-batches whose gradients sum to the whole batch's for
every TRL loss_type, and a step that trains more rows than M per prompt in forwards that never exceed the limit."""

import warnings

import pytest
import torch

from trl_appo.batch_rows import ITEM_COUNT_LOSSES, ROW_MEAN_LOSSES, TOKEN_MEAN_LOSSES, loss_sub_batches
from trl_appo.config import APPOConfig, token_budget_split

from test_trainer import make_args, make_trainer

BASE = dict(output_dir="/tmp/appo-budget-test", use_cpu=True, report_to="none")


def config(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return APPOConfig(**BASE, **kw)


# ----------------------------------------------------------------------------------------------- config
def test_rollouts_budget_is_the_default_and_keeps_m_equal_n_times_one_plus_b():
    a = config()
    assert a.rollout_budget == "rollouts"
    assert a.num_roots * (1 + a.num_branches) == a.num_generations


@pytest.mark.parametrize("M,bs,expected", [(8, 8, (4, 2)), (16, 16, (8, 2)), (6, 6, (3, 2)), (12, 12, (6, 2)),
                                            (3, 3, (2, 1)), (8, 1, (8, 0)), (2, 2, (2, 0))])
def test_token_budget_split_costs_about_m_rollouts_and_trains_more_leaves(M, bs, expected):
    N, B = token_budget_split(M, bs, 0.5)
    assert (N, B) == expected
    if B:
        assert abs(N * (1 + 0.5 * B) - M) <= 0.1 * M  # planned decoded tokens ≈ M rollouts' worth
        assert N * (1 + B) > M  # more leaves than GRPO's M
        assert (bs * N) % M == 0  # whole roots per micro-batch
    a = config(rollout_budget="tokens", num_generations=M, per_device_train_batch_size=bs,
               steps_per_generation=M // bs)
    assert (a.num_roots, a.num_branches) == expected


def test_token_budget_fits_the_split_the_user_half_gives():
    a = config(rollout_budget="tokens", num_roots=2, per_device_train_batch_size=8)  # 2·(1 + 6·0.5) = 8
    assert a.num_branches == 6
    a = config(rollout_budget="tokens", num_generations=12, num_branches=4, per_device_train_batch_size=12)
    assert a.num_roots == 4  # 4·(1 + 4·0.5) = 12
    a = config(rollout_budget="tokens", num_generations=16, per_device_train_batch_size=16, expected_branch_cost=1.0)
    assert (a.num_roots, a.num_branches) == (8, 1)  # c = 1: a branch costs a root, N·(1+B) = M


@pytest.mark.parametrize("kw,fix", [
    (dict(rollout_budget="token"), "choose one of ['rollouts', 'tokens']"),
    (dict(rollout_budget="tokens", branch_loss="none"), "set branch_loss='suffix'"),
    (dict(rollout_budget="tokens", expected_branch_cost=0.0), "must be in (0, 1]"),
    (dict(rollout_budget="tokens", num_roots=7), "set num_roots <= 5"),
])
def test_token_budget_errors_name_the_fix(kw, fix):
    with pytest.raises(ValueError) as e:
        config(**kw)
    assert fix in str(e.value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- sub-batches
def loss_batch(trainer, rows=12, prompt=3, completion=6, seed=0):
    """A synthetic loss micro-batch: varied lengths, a tool-output gap, per-token advantages, off-policy old
    log-probs (so ratios and clipping are live)."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(5, vocab, (rows, prompt), generator=g)
    completion_ids = torch.randint(5, vocab, (rows, completion), generator=g)
    lengths = torch.randint(1, completion + 1, (rows,), generator=g)
    completion_mask = (torch.arange(completion).unsqueeze(0) < lengths.unsqueeze(1)).long()
    tool_mask = torch.ones_like(completion_mask)
    tool_mask[::3, 1:3] = 0
    batch = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids, "completion_mask": completion_mask, "tool_mask": tool_mask,
        "advantages": torch.randn(rows, completion, generator=g),
        "num_items_in_batch": (completion_mask * tool_mask).sum() * 3,
    }
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([batch["prompt_mask"], completion_mask], dim=1)
    logps, _ = trainer._policy_logps(input_ids, attention, completion)
    batch["old_per_token_logps"] = logps + 0.3 * torch.randn(rows, completion, generator=g)
    return batch


LOSS_TYPES = (*ROW_MEAN_LOSSES, *TOKEN_MEAN_LOSSES, *ITEM_COUNT_LOSSES)


def test_every_trl_loss_type_has_a_normaliser():
    from trl import GRPOConfig

    choices = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    for name in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
        assert f"'{name}'" in choices or f"`{name}`" in choices or name in choices
        assert name in LOSS_TYPES


def test_sub_batch_gradients_sum_to_the_micro_batch_gradient_for_every_loss_type(tiny_model, tiny_tokenizer,
                                                                                 tmp_path):
    args = make_args(tmp_path, rollout_budget="tokens", num_branches=None)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = loss_batch(trainer)
    batch["ref_per_token_logps"] = batch["old_per_token_logps"] - 0.1
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(parts):
        model.zero_grad()
        total = sum(trainer._compute_loss(model, part) for part in parts)
        total.backward()
        return total.detach(), [p.grad.clone() for p in params]

    for beta in (0.0, 0.05):  # with beta > 0 the KL term is in every token's loss
        trainer.beta = beta
        for loss_type in LOSS_TYPES:
            trainer.loss_type = loss_type
            parts = loss_sub_batches(batch, 8, loss_type)
            assert [p["completion_ids"].shape[0] for p in parts] == [6, 6]  # ≤ 8 rows per forward
            whole_loss, whole = grads([batch])
            split_loss, split = grads(parts)
            torch.testing.assert_close(split_loss, whole_loss, rtol=1e-5, atol=1e-7, msg=loss_type)
            for a, b in zip(split, whole, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=loss_type)
            if loss_type not in ITEM_COUNT_LOSSES:  # the scale is what makes them equal
                unscaled = [{k: v for k, v in p.items() if k != "appo_loss_scale"} for p in parts]
                assert not torch.allclose(grads(unscaled)[0], whole_loss)


def test_a_batch_within_the_limit_is_not_split():
    batch = {"completion_ids": torch.zeros(8, 3), "completion_mask": torch.ones(8, 3)}
    assert loss_sub_batches(batch, 8, "grpo") == [batch]


# ----------------------------------------------------------------------------------------------- trainer
@pytest.mark.parametrize("schedule,steps_per_generation,steps", [("per_generation", 1, 1), ("per_update", 2, 2)])
def test_token_budget_step_trains_more_rows_than_m_in_forwards_within_the_limit(tiny_model, tiny_tokenizer, tmp_path,
                                                                                schedule, steps_per_generation,
                                                                                steps):
    args = make_args(tmp_path, rollout_budget="tokens", num_branches=None, branch_schedule=schedule,
                     steps_per_generation=steps_per_generation, max_steps=steps)
    assert (args.num_generations, args.num_roots, args.num_branches) == (8, 4, 2)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    trained = []  # rows of every forward that builds a graph (the loss's)

    def spy(module, a, kw):
        ids = kw.get("input_ids", a[0] if a else None)
        if torch.is_grad_enabled():
            trained.append(ids.shape[0])

    trainer.model.register_forward_pre_hook(spy, with_kwargs=True)
    trainer.train()
    assert trainer.state.global_step == steps
    limit = args.per_device_train_batch_size
    assert trained and max(trained) <= limit
    prompts_per_step = limit // args.num_generations  # GRPO's at M: one prompt per step here
    assert sum(trained) == steps * prompts_per_step * 12  # N·(1+B) = 12 leaves per prompt, more than M = 8
    logs = [e for e in trainer.state.log_history if "appo/leaves_per_prompt" in e]
    assert logs and all(e["appo/leaves_per_prompt"] == 12 for e in logs)
    assert all(0 < e["appo/branch_cost_fraction"] <= 1.5 for e in logs)
    assert all(e["appo/rollout_budget_spent"] > 0 for e in logs)
