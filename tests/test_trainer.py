"""APPOTrainer on CPU with the tiny offline model: branching, credit, loss rows, tools, LoRA, resume."""

import copy

import pytest
import torch
from datasets import Dataset

from trl_appo import core
from trl_appo.config import APPOConfig
from trl_appo.rollout import model_runs
from trl_appo.testing import conversational_prompts, encode

QUESTIONS = ["What is 12 + 30?", "Name a river.", "What is 7 * 6?", "Say hi."]


def length_reward(completions, **kwargs):
    """Deterministic, varied reward: depends on the decoded length of the completion."""
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        text = text if isinstance(text, str) else str(text)
        out.append(float(len(text) % 5) / 4.0)
    return out


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-3,
        per_device_train_batch_size=8,
        num_generations=8,
        num_branches=1,  # N = 4 roots, 4 branches
        max_completion_length=24,
        min_branch_tokens=4,
        max_steps=1,
        branch_schedule="per_generation",
        seed=0,
        temperature=1.0,
    )
    base.update(kw)
    return APPOConfig(**base)


def make_trainer(model, tokenizer, args, reward=length_reward, **kw):
    from trl_appo.trainer import APPOTrainer

    ds = Dataset.from_dict({"prompt": conversational_prompts(QUESTIONS * 4)})
    return APPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer, **kw)


class Recorder:
    """Wraps a method and records its inputs/outputs."""

    def __init__(self, obj, name):
        self.calls = []
        self._orig = getattr(obj, name)
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        out = self._orig(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


def test_branches_share_the_root_prefix_and_only_roots_are_trained(tiny_model, tiny_tokenizer, tmp_path):
    # the paper's branch_loss="none": branches only give credit (the suffix loss is tested in test_branching.py)
    trainer = make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path, branch_loss="none"))
    runs = Recorder(trainer._appo_engine, "run")
    batches = Recorder(trainer, "_generate_and_score_completions")
    forwards = Recorder(trainer, "_get_per_token_logps_and_entropies")
    trainer.train()

    (root_call, branch_call) = runs.calls[0], runs.calls[1]
    roots = root_call[2]
    branch_kwargs, branches = branch_call[1], branch_call[2]
    assert len(roots) == 4  # one prompt per generation batch (8 slots = M), N=4 roots
    for prefix, branch in zip(branch_kwargs["prefixes"], branches, strict=True):
        if prefix is None:
            continue
        k = len(prefix.completion_ids)
        assert branch.completion_ids[:k] == prefix.completion_ids
        assert branch.model_mask[:k] == prefix.model_mask
        # the prefix really is a root's prefix
        assert any(r.completion_ids[:k] == prefix.completion_ids for r in roots)

    out = batches.calls[0][2]
    n_roots = len(roots)
    assert out["completion_ids"].shape[0] == n_roots  # branch rows never reach the loss
    assert out["advantages"].shape == out["completion_ids"].shape  # per-token credit
    # every forward pass (scoring, loss) sees root rows only
    assert all(call[0][1].shape[0] <= n_roots for call in forwards.calls)
    logs = {k for entry in trainer.state.log_history for k in entry}
    for key in ("appo/branch_points_per_root", "appo/omega_degenerate_frac", "appo/branch_reward",
                "appo/branch_duplicate_frac", "appo/branch_no_candidate_frac",
                "appo/future_kl_weight_mean", "appo/seconds_generate_branches", "appo/branch_decoded_tokens"):
        assert key in logs, key


def test_advantages_equal_core_functions_on_same_rewards(tiny_model, tiny_tokenizer, tmp_path):
    trainer = make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path, procedure_scale=False, branch_loss="none",
                                                                        dual_groups=True))
    credit = Recorder(core, "branch_credit")
    dual = Recorder(core, "dual_group_advantages")
    try:
        batches = Recorder(trainer, "_generate_and_score_completions")
        trainer.train()
    finally:
        core.branch_credit, core.dual_group_advantages = credit._orig, dual._orig
    out = batches.calls[0][2]
    (root_rw, branch_rw, weights, n, p), dual_kw, (root_adv, branch_adv) = dual.calls[0]
    # The root half of the dual groups is exactly TRL's GRPO normalisation of the N roots.
    torch.testing.assert_close(root_adv, out["appo_root_advantages"])
    # Per-token advantage = Â_i + mean of Â_b over branches that share token t (procedure scaling off).
    args, kw, expected = credit.calls[0]
    order = torch.argsort(out["appo_group"], stable=True)
    torch.testing.assert_close(out["advantages"][order], expected)
    roots, points = args[2], args[3]
    for b in range(len(roots)):
        r, s = int(roots[b]), int(points[b])
        if s > 0:
            mask = args[5][r]
            t = int(mask.nonzero()[0])
            if t <= s:
                assert abs(float(expected[r, t]) - float(args[0][r] + torch.stack(
                    [args[1][j] for j in range(len(roots)) if int(roots[j]) == r and int(points[j]) >= t]
                ).mean())) < 1e-5


def test_criterion_none_reproduces_grpo_advantages(tiny_tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from trl_appo.testing import build_tiny_model

    common = dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", save_strategy="no",
                  per_device_train_batch_size=8, num_generations=8, max_completion_length=16, max_steps=1, seed=3,
                  learning_rate=1e-3)
    ds = Dataset.from_dict({"prompt": conversational_prompts(QUESTIONS * 4)})
    results = []
    for cls, cfg in ((GRPOTrainer, GRPOConfig(**common)), (None, APPOConfig(branch_criterion="none", **common))):
        if cls is None:
            from trl_appo.trainer import APPOTrainer as cls
        trainer = cls(model=build_tiny_model(tiny_tokenizer), reward_funcs=length_reward, args=cfg,
                      train_dataset=ds, processing_class=tiny_tokenizer)
        rec = Recorder(trainer, "_generate_and_score_completions")
        trainer.train()
        results.append((rec.calls[0][2], {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}))
    (grpo, grpo_weights), (appo, appo_weights) = results
    torch.testing.assert_close(appo["completion_ids"], grpo["completion_ids"])
    torch.testing.assert_close(appo["advantages"], grpo["advantages"], rtol=0, atol=0)
    for name, w in grpo_weights.items():  # future-KL is off with "none": the same update, not a doubled one
        torch.testing.assert_close(appo_weights[name], w, rtol=0, atol=0, msg=name)


def add_numbers(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def test_swapped_grpo_script_logs_trl_metrics_on_the_same_steps(tiny_tokenizer, tmp_path):
    # A plain GRPO script (tools included), then the same script with the two classes swapped: TRL's own metrics
    # (reward, completions/*, tools/*, num_tokens, ...) appear on the same optimizer steps, and on-policy the
    # future-KL weight keeps GRPO's advantage scale (exactly 1).
    from trl import GRPOConfig, GRPOTrainer

    from trl_appo.testing import build_tiny_model
    from trl_appo.trainer import APPOTrainer

    common = dict(bf16=False, use_cpu=True, report_to="none", save_strategy="no", per_device_train_batch_size=8,
                  num_generations=4, max_completion_length=24, max_steps=3, logging_steps=1, seed=0,
                  learning_rate=5e-4, max_tool_calling_iterations=2)
    ds = Dataset.from_dict({"prompt": conversational_prompts(QUESTIONS * 4)})
    logged = []
    for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (APPOTrainer, APPOConfig)):
        args = config_cls(output_dir=str(tmp_path / config_cls.__name__), **common)
        trainer = trainer_cls(model=build_tiny_model(tiny_tokenizer), reward_funcs=length_reward, args=args,
                              train_dataset=ds, processing_class=tiny_tokenizer, tools=[add_numbers])
        trainer.train()
        logged.append({e["step"]: e for e in trainer.state.log_history if "loss" in e})
    grpo, appo = logged
    assert sorted(grpo) == sorted(appo) == [1, 2, 3]
    for step in grpo:
        trl_keys = {k for k in appo[step] if not k.startswith("appo/")}
        assert trl_keys == set(grpo[step]), (step, trl_keys ^ set(grpo[step]))
        assert "reward" in appo[step] and "num_tokens" in appo[step]
        assert appo[step]["appo/future_kl_weight_mean"] == 1.0  # on-policy: GRPO's scale, not doubled
    assert appo[1]["appo/branch_points_per_root"] > 0  # and it really branched


def test_per_update_branches_each_optimizer_step_with_moving_policy(tiny_model, tiny_tokenizer, tmp_path):
    args = make_args(tmp_path, branch_schedule="per_update", steps_per_generation=4, gradient_accumulation_steps=1,
                     per_device_train_batch_size=8, max_steps=4, learning_rate=5e-3)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    branch = Recorder(trainer, "_appo_step")
    trainer.train()
    assert len(branch.calls) == 4  # once per optimizer step, not once per generation batch
    degenerate = [e["appo/omega_degenerate_frac"] for e in trainer.state.log_history
                  if "appo/omega_degenerate_frac" in e]
    assert degenerate[0] == 1.0  # first step after generation: π_θ = π_old
    assert min(degenerate[1:]) < 1.0  # later steps: Ω carries the updates


def test_lora_changes_only_adapter_weights(tiny_model, tiny_tokenizer, tmp_path):
    from peft import LoraConfig

    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    trainer = make_trainer(
        tiny_model, tiny_tokenizer, make_args(tmp_path, max_steps=2, learning_rate=5e-2),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    changed_lora = 0
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            changed_lora += 1
        else:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(p.detach(), base[key], msg=f"{name} changed")
    assert changed_lora > 0
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # adapters trained (B starts at zero)


def _scripted_tag_generation(tokenizer):
    """Fake backend for the tag protocol: call python once, then answer; branches may call it again."""

    def generate(contexts, images, multimodal_fields, num_generations, has_tool_images=False):
        outs = []
        for ctx in contexts:
            text = tokenizer.decode(ctx)
            completion = text.split("<|im_start|>assistant\n")[-1]
            if "<result>" not in completion:
                outs.append(encode(tokenizer, " think <python>print(6*7)</python>"))
            else:
                outs.append(encode(tokenizer, "<answer>\\boxed{42}</answer>") + [tokenizer.eos_token_id])
        return outs, None

    return generate


def test_tools_branch_inside_and_after_calls_and_branches_call_tools(tiny_model, tiny_tokenizer, tmp_path):
    from trl_appo.tools import PythonTool

    args = make_args(tmp_path, tool_protocol="tags", max_completion_length=64, min_branch_tokens=2,
                     branch_criterion="random", num_branches=3, max_tool_calls=4)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args, tools=[PythonTool(timeout=10)])
    trainer._generate_single_turn = _scripted_tag_generation(tiny_tokenizer)
    runs = Recorder(trainer._appo_engine, "run")
    trainer.train()
    roots, branches = runs.calls[0][2], runs.calls[1][2]
    assert all(r.tool_stats.calls == 1 for r in roots)
    assert all("42" in r.text for r in roots)
    spent = next(e for e in trainer.state.log_history if "loss" in e)  # budget accounting counts the calls
    assert spent["appo/budget/tool_calls_roots"] == len(roots)
    assert spent["appo/budget/tool_calls_branches"] == sum(b.tool_stats.calls for b in branches) > 0
    prefixes = runs.calls[1][1]["prefixes"]
    before_result = [b for b, p in zip(branches, prefixes, strict=True)
                     if p is not None and "<result>" not in tiny_tokenizer.decode(p.completion_ids)]
    after_result = [b for b, p in zip(branches, prefixes, strict=True)
                    if p is not None and "<result>" in tiny_tokenizer.decode(p.completion_ids)]
    assert before_result and after_result  # points fell before and after the tool call
    # a branch cut before its root's call still calls the tool itself (its budget counts only its completion)
    assert all(b.tool_stats.calls >= 1 and "<result>" in b.text for b in before_result)
    # tool output is masked in every branch
    for b in branches:
        text_ids = b.completion_ids
        res = encode(tiny_tokenizer, "<result>")[0]
        if res in text_ids:
            assert b.model_mask[text_ids.index(res)] == 0


def test_grad_accumulation_iterations_beta_and_eval(tiny_tokenizer, tmp_path):
    """GA, num_iterations > 1, beta > 0 (reference model from a saved path) and evaluation all run together."""
    from trl_appo.testing import build_tiny_model, save_tiny_pair

    model_dir = save_tiny_pair(build_tiny_model(tiny_tokenizer), tiny_tokenizer, str(tmp_path / "model"))
    args = make_args(
        tmp_path / "out", gradient_accumulation_steps=2, steps_per_generation=4, per_device_train_batch_size=4,
        num_generations=4, num_branches=1, num_iterations=2, beta=0.05, max_steps=2,
        branch_schedule="per_update", eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
        omega_reference="reference",
    )
    ds = Dataset.from_dict({"prompt": conversational_prompts(QUESTIONS)})
    from trl_appo.trainer import APPOTrainer

    trainer = APPOTrainer(model=model_dir, reward_funcs=length_reward, args=args, train_dataset=ds,
                          eval_dataset=ds, processing_class=tiny_tokenizer)
    branch = Recorder(trainer, "_appo_step")
    trainer.train()
    logs = trainer.state.log_history
    assert any("kl" in e for e in logs)  # beta > 0: KL to the reference is in the loss
    assert any("eval_reward" in e for e in logs)  # evaluation ran ...
    assert not any("eval_appo/branch_points_per_root" in e for e in logs)  # ... without branching
    # 2 optimizer steps, each branching once over its GA=2 micro-batches
    assert len(branch.calls) == 2


def test_resumed_run_continues_like_the_uninterrupted_run(tiny_tokenizer, tmp_path):
    from transformers import TrainerCallback

    from trl_appo.testing import build_tiny_model

    class StopAt(TrainerCallback):  # an interruption: same schedule (max_steps=3), stopped after step 2
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(out, resume=None, callbacks=()):
        args = make_args(out, max_steps=3, save_strategy="steps", save_steps=2, branch_criterion="random",
                         per_device_train_batch_size=8, num_generations=8)
        trainer = make_trainer(build_tiny_model(tiny_tokenizer), tiny_tokenizer, args, callbacks=list(callbacks))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    run(tmp_path / "half", callbacks=[StopAt()])
    ckpt = tmp_path / "half" / "checkpoint-2"
    assert (ckpt / "appo_state.pt").exists()
    resumed = run(tmp_path / "half", resume=str(ckpt))
    card = (tmp_path / "half" / "README.md").read_text()
    assert "## APPO settings" in card and "criterion `random`" in card  # the model card names APPO's settings
    assert "Base model: a `qwen2` model passed as an object" in card  # ... and the base model, even as an object
    step3 = [e for e in full.state.log_history if e.get("step") == 3 and "loss" in e][0]
    step3_resumed = [e for e in resumed.state.log_history if e.get("step") == 3 and "loss" in e][0]
    for key in ("loss", "grad_norm", "reward", "appo/branch_reward", "appo/branch_position_rel", "appo/credit_abs_mean",
                "appo/budget/total_decoded_tokens"):  # the budget's totals continue across the checkpoint
        assert step3_resumed[key] == pytest.approx(step3[key], rel=1e-5, abs=1e-6), key


def test_reward_side_logs_of_branches_stay_out_of_the_completions_table(tiny_model, tiny_tokenizer, tmp_path):
    def logging_reward(completions, log_extra=None, log_metric=None, **kw):
        rewards = length_reward(completions)
        log_extra("my_column", [str(r) for r in rewards])
        log_metric("my_metric", sum(rewards) / len(rewards))
        return rewards

    args = make_args(tmp_path, max_steps=2, log_completions=True, branch_in_eval=True, eval_strategy="steps",
                     eval_steps=2, per_device_eval_batch_size=8)
    ds = Dataset.from_dict({"prompt": conversational_prompts(QUESTIONS)})
    trainer = make_trainer(tiny_model, tiny_tokenizer, args, reward=logging_reward, eval_dataset=ds)
    trainer.train()
    logs = {k for e in trainer.state.log_history for k in e}
    assert "my_metric" in logs and "appo/branch/my_metric" in logs
    assert "eval_appo/branch_points_per_root" in logs  # branch_in_eval branches during evaluation


def test_untested_trl_version_is_refused_with_the_fix(monkeypatch, tiny_model, tiny_tokenizer, tmp_path):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.18.0")
    monkeypatch.delenv("TRL_APPO_ALLOW_UNTESTED_TRL", raising=False)
    with pytest.raises(RuntimeError, match="trl>=1.16.0,<1.17.0"):
        make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path))


def test_unsupported_trainer_arguments_name_the_alternative(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="owns the rollout"):
        make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path), rollout_func=lambda p, t: {})
    with pytest.raises(ValueError, match="must define a callable `reset`"):  # TRL's own check of the environment
        make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path), environment_factory=object)
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="needs an APPOConfig"):
        make_trainer(tiny_model, tiny_tokenizer, GRPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True))


def test_tag_protocol_stops_at_custom_tool_tags(tiny_model, tiny_tokenizer, tmp_path):
    from trl_appo.tools import tool

    @tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: e.g. "2 * (3 + 4)".
        """
        return str(eval(expression, {"__builtins__": {}}))

    trainer = make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path, tool_protocol="tags"), tools=[calculator])
    protocol = trainer._appo_engine.protocol
    assert protocol.tags == ("python", "search", "calculator")
    assert "</calculator>" in protocol.stop_strings
    assert set(trainer.eos_token_ids) <= set(protocol.stop_token_ids)


def test_qlora_trains_4bit_model_with_adapters(tiny_tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the [qlora] extra (bitsandbytes)")
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from trl_appo.testing import build_tiny_model, save_tiny_pair
    from trl_appo.trainer import APPOTrainer

    model_dir = save_tiny_pair(build_tiny_model(tiny_tokenizer, hidden_size=64, intermediate_size=128),
                               tiny_tokenizer, str(tmp_path / "model"))
    args = make_args(tmp_path / "out", max_steps=1,
                     model_init_kwargs={"quantization_config": BitsAndBytesConfig(
                         load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), "device_map": "cpu"})
    trainer = APPOTrainer(model=model_dir, reward_funcs=length_reward, args=args, processing_class=tiny_tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": conversational_prompts(QUESTIONS)}),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    names = {type(m).__name__ for m in trainer.model.modules()}
    assert "Linear4bit" in names  # the base weights really are 4-bit
    assert any("appo/branch_points_per_root" in e for e in trainer.state.log_history)


@pytest.mark.parametrize(
    "shape",
    [
        dict(),  # TRL's defaults: M=8, per_device_train_batch_size=8, GA=1, steps_per_generation unset
        dict(num_generations=2, per_device_train_batch_size=2),  # too small to branch: GRPO, with a warning
        dict(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=3),
        dict(num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=2, steps_per_generation=2),
        dict(num_generations=16, per_device_train_batch_size=8, gradient_accumulation_steps=2),
        dict(num_generations=16, per_device_train_batch_size=16, generation_batch_size=32),
        dict(num_generations=8, per_device_train_batch_size=4, gradient_accumulation_steps=4),
        dict(num_generations=8, per_device_train_batch_size=8, steps_per_generation=3),
        dict(num_generations=4, per_device_train_batch_size=6, steps_per_generation=2, max_completion_length=8),
        dict(num_generations=3, per_device_train_batch_size=3),  # M = 3: no split, GRPO's generation batch
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "trl-defaults",
)
def test_every_grpo_config_shape_trains_one_step(tiny_model, tiny_tokenizer, tmp_path, shape):
    import warnings as _w

    base = dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", save_strategy="no",
                max_steps=1, max_completion_length=24, min_branch_tokens=4, learning_rate=1e-3, logging_steps=1)
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        args = APPOConfig(**{**base, **shape})
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    trainer.train()
    assert trainer.state.global_step == 1


BUDGET_KEYS = [f"appo/budget/{k}" for k in (
    "decoded_tokens_roots", "decoded_tokens_branches", "tool_calls_roots", "tool_calls_branches",
    "seconds_generate", "seconds_score", "seconds_reward", "seconds_train",
    "total_decoded_tokens", "total_tool_calls", "total_seconds")]


@pytest.mark.parametrize("criterion", ["bs", "none"])
def test_every_optimizer_step_logs_what_it_spent(tiny_tokenizer, tmp_path, criterion):
    from trl_appo.testing import build_tiny_model

    args = make_args(tmp_path, max_steps=3, branch_criterion=criterion,
                     **({} if criterion == "bs" else {"num_branches": None}))
    trainer = make_trainer(build_tiny_model(tiny_tokenizer), tiny_tokenizer, args)
    batches = Recorder(trainer, "_generate_and_score_completions")
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and len(batches.calls) == 3  # one generation batch per optimizer step here
    totals = dict.fromkeys(("decoded_tokens_roots", "decoded_tokens_branches"), 0.0)
    for entry, (_, _, batch) in zip(logs, batches.calls, strict=True):
        assert all(k in entry for k in BUDGET_KEYS), [k for k in BUDGET_KEYS if k not in entry]
        # GRPO: the batch holds the M roots; APPO: the step counts its roots' model tokens
        root_model_tokens = ((batch["completion_mask"] * batch["tool_mask"]).sum().item() if criterion == "none"
                             else entry["appo/root_model_tokens"])
        assert entry["appo/budget/decoded_tokens_roots"] == root_model_tokens > 0
        if criterion == "none":
            assert entry["appo/budget/decoded_tokens_branches"] == 0 == entry["appo/budget/tool_calls_branches"]
        else:
            assert entry["appo/budget/decoded_tokens_branches"] == entry["appo/branch_decoded_tokens"] > 0
        for k in totals:
            totals[k] += entry[f"appo/budget/{k}"]
            assert entry[f"appo/budget/total_{k}"] == totals[k]
        assert entry["appo/budget/total_decoded_tokens"] == sum(totals.values())
        seconds = [entry[f"appo/budget/seconds_{k}"] for k in ("generate", "score", "reward", "train")]
        assert all(s >= 0 for s in seconds) and seconds[0] > 0


def test_need_allocation_trains_with_the_uniform_number_of_branch_rows(tiny_model, tiny_tokenizer, tmp_path):
    args = make_args(tmp_path, branch_allocation="need", num_branches=3, num_generations=8, max_steps=2,
                     branch_criterion="random")  # N = 2 roots, 6 branches per prompt on average
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    steps = Recorder(trainer, "_appo_step")
    trainer.train()
    for _, _, out in steps.calls:
        assert out.branch_rows["completion_ids"].shape[0] == 6  # one prompt per generation batch: R·B rows
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(0.0 <= e["appo/groups_all_equal_after"] <= e["appo/groups_all_equal_before"] <= 1.0 for e in logs)


def test_online_branches_fork_after_the_tool_result_in_the_roots_generate_calls(tiny_model, tiny_tokenizer, tmp_path,
                                                                               monkeypatch):
    from trl_appo import branching
    from trl_appo.tools import PythonTool

    args = make_args(tmp_path, tool_protocol="tags", max_completion_length=64, min_branch_tokens=2,
                     branch_schedule="online", branch_criterion="random", num_branches=1, max_tool_calls=1,
                     branch_loss="suffix")
    trainer = make_trainer(tiny_model, tiny_tokenizer, args, tools=[PythonTool(timeout=10)])
    scripted = _scripted_tag_generation(tiny_tokenizer)
    rows_per_call = []

    def generate(contexts, *a, **kw):
        rows_per_call.append(len(contexts))
        return scripted(contexts, *a, **kw)

    trainer._generate_single_turn = generate
    runs, trees = Recorder(trainer._appo_engine, "run"), Recorder(trainer._appo_engine, "run_tree")
    points = Recorder(branching, "online_points")
    monkeypatch.setattr(branching, "online_points", points)
    steps = Recorder(trainer, "_appo_step")
    trainer.train()
    assert not runs.calls and len(trees.calls) == 1  # no second series of generate calls for the branches
    assert rows_per_call == [4, 8]  # turn 1: the 4 roots; turn 2: the roots' answers and the 4 forks
    roots, forks = trees.calls[0][2]
    result_end = [end for start, end, is_model in model_runs(roots[0].model_mask) if not is_model][0]
    assert [f.shared for f in forks] == [result_end] * 4  # max_tool_calls=1: after the (only) first result
    assert all(f.rollout.completion_ids[:result_end] == roots[f.root].completion_ids[:result_end] for f in forks)
    pts, _ = points.calls[0][2]
    assert pts.fallback.tolist() == [core.FALLBACK_TOOL_RESULT] * 4
    assert pts.position.tolist() == [result_end] * 4  # resample: the first token after the result is re-decided
    out = steps.calls[0][2]
    assert out.branch_rows["completion_ids"].shape[0] == 4
    assert (out.branch_rows["tool_mask"][:, :result_end] == 0).all()  # the copied prefix is not trained
    spent = next(e for e in trainer.state.log_history if "loss" in e)
    assert spent["appo/budget/tool_calls_branches"] == 0  # the forks' prefix calls were the roots'
    assert spent["appo/branch_late_frac"] == 0.0  # every root made its first call: no fork waited for a root's end
    assert spent["appo/budget/decoded_tokens_branches"] == sum(
        sum(f.rollout.model_mask[f.shared:]) for f in forks) > 0


def test_online_schedule_needs_tools(tiny_model, tiny_tokenizer, tmp_path):
    args = make_args(tmp_path, branch_schedule="online", branch_criterion="random", max_tool_calls=2)
    with pytest.raises(ValueError, match="no tools: pass tools="):
        make_trainer(tiny_model, tiny_tokenizer, args)
