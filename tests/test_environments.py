"""What TRL's GRPOTrainer tests cover (tools, malformed calls, truncated completions, environments, every loss type,
num_iterations, PEFT), run on APPO's branching path (B >= 1), plus forking environments by replay."""

import logging

import pytest
import torch
from datasets import Dataset

from trl_appo.config import APPOConfig
from trl_appo.testing import conversational_prompts, encode

from test_trainer import Recorder

QUESTIONS = ["What is 3 times 4?", "Count to two.", "Say hi.", "Add 1 and 2."]
HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>"


def multiply_tool(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


async def async_multiply_tool(a: int, b: int) -> int:
    return multiply_tool(a, b)


async_multiply_tool.__doc__ = multiply_tool.__doc__  # the schema TRL builds reads the docstring


def call(name: str, **arguments) -> str:
    import json

    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>{END}'


def length_reward(completions, **kwargs):
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(float(len(str(text)) % 5) / 4.0)
    return out


def scripted(tokenizer, scripts):
    """Fake `_generate_single_turn` for the chat protocol: rollout i follows scripts[i % len(scripts)], one string per
    assistant turn; a context that already holds part of a turn (a branch's prefix) gets the rest of that turn."""

    def generate(contexts, images, multimodal_fields, num_generations, has_tool_images=False):
        outs = []
        for i, ctx in enumerate(contexts):
            turns = tokenizer.decode(ctx).split(HEADER)[1:]
            first, partial = turns[0], turns[-1]
            script = next((s for s in scripts if s[0].startswith(first) or first.startswith(s[0])), None)
            if script is None or (first == "" and len(turns) == 1):
                script = scripts[i % len(scripts)]
            t = len(turns) - 1
            rest = script[t][len(partial):] if t < len(script) and script[t].startswith(partial) else END
            outs.append(encode(tokenizer, rest))
        return outs, None

    return generate


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        learning_rate=0.1, per_device_train_batch_size=4, num_generations=4, num_branches=1,  # N = 2, B = 1
        steps_per_generation=1, max_completion_length=96, min_branch_tokens=1, max_steps=1,
        branch_criterion="random", branch_schedule="per_generation", seed=0, max_tool_calls=4,
    )
    base.update(kw)
    return APPOConfig(**base)


def make_trainer(model, tokenizer, args, reward=length_reward, dataset=None, **kw):
    from trl_appo.trainer import APPOTrainer

    ds = dataset if dataset is not None else Dataset.from_dict({"prompt": conversational_prompts(QUESTIONS)})
    return APPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tokenizer, **kw)


def train_and_check_params(trainer):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    runs = Recorder(trainer._appo_engine, "run")
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert changed, "no trainable parameter changed"
    branch_runs = [c for c in runs.calls if c[1].get("prefixes") is not None]
    assert branch_runs, "APPO did not branch"
    return runs, branch_runs


def first_log(trainer, key):
    return next(entry[key] for entry in trainer.state.log_history if key in entry)


# ---------------------------------------------------------------------------------------------- tools (TRL parity)
@pytest.mark.parametrize("tool", [multiply_tool, async_multiply_tool], ids=["sync", "async"])
def test_tools_sync_and_async_with_branching(tiny_model, tiny_tokenizer, tmp_path, tool):
    name = tool.__name__
    scripts = [
        [call(name, a=3, b=4), f"It is 12.{END}"],
        [call(name, a=3, c=4), f"Sorry.{END}"],  # wrong argument name: a failed call
        [f"I don't know any tool, it is probably twelve{END}"],
    ]
    trainer = make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path, per_device_train_batch_size=6,
                                                                 num_generations=6, num_branches=2), tools=[tool])
    trainer._generate_single_turn = scripted(tiny_tokenizer, scripts)
    runs, branch_runs = train_and_check_params(trainer)
    roots = runs.calls[0][2]
    assert [r.tool_stats.calls for r in roots] == [1, 1]  # rollouts 0 and 1 of the two root slots
    assert [r.tool_stats.failures for r in roots] == [0, 1]
    assert any(m.get("role") == "tool" and m.get("content") == "12" for m in roots[0].messages)
    assert first_log(trainer, "tools/call_frequency") == pytest.approx(1.0)
    assert first_log(trainer, "tools/failure_frequency") == pytest.approx(0.5)
    assert "appo/branch/tools/call_frequency" in trainer.state.log_history[0]


def test_malformed_tool_calls_with_branching(tiny_model, tiny_tokenizer, tmp_path):
    scripts = [
        [f'<tool_call>\n{{"arguments": {{"a": 3, "b": 4}}}}\n</tool_call>{END}', f"Then it is 12.{END}"],  # no name
        [f'<tool_call>\n{{"arguments": {{a: 3, b: 4}}}}\n</tool_call>{END}', f"Hm.{END}"],  # not JSON
        [f"<toolcall>\n12\n</toolcall>{END}"],  # not a call at all: the episode ends
    ]
    trainer = make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path, per_device_train_batch_size=6,
                                                                 num_generations=6, num_branches=2),
                           tools=[multiply_tool])
    trainer._generate_single_turn = scripted(tiny_tokenizer, scripts)
    runs, branch_runs = train_and_check_params(trainer)
    roots = runs.calls[0][2]
    # As GRPOTrainer (on_malformed_tool_call="end", the default): an unreadable call leaves the turn as text and
    # ends the episode; nothing runs, nothing is generated after it.
    assert [r.tool_stats.calls for r in roots] == [r.tool_stats.failures for r in roots] == [0, 0]
    assert [r.finish_reason for r in roots] == ["stop", "stop"]
    assert not any(m.get("role") == "tool" for r in roots for m in r.messages)
    assert all(b.finish_reason in ("stop", "length") for c in branch_runs for b in c[2])


def test_malformed_tool_calls_told_to_the_model_on_request(tiny_model, tiny_tokenizer, tmp_path):
    scripts = [
        [f'<tool_call>\n{{"arguments": {{"a": 3, "b": 4}}}}\n</tool_call>{END}', f"Then it is 12.{END}"],  # no name
        [f'<tool_call>\n{{"arguments": {{a: 3, b: 4}}}}\n</tool_call>{END}', f"Hm.{END}"],  # not JSON
    ]
    args = make_args(tmp_path, per_device_train_batch_size=4, num_generations=4, num_branches=1,
                     on_malformed_tool_call="message")
    trainer = make_trainer(tiny_model, tiny_tokenizer, args, tools=[multiply_tool])
    trainer._generate_single_turn = scripted(tiny_tokenizer, scripts)
    runs, _ = train_and_check_params(trainer)
    roots = runs.calls[0][2]
    # "message": malformed calls never reach the tool, count as failures, and the model gets another turn.
    assert [r.tool_stats.failures for r in roots] == [r.tool_stats.calls for r in roots] == [1, 1]
    assert all(any("malformed" in m.get("content", "") for m in r.messages if m.get("role") == "tool") for r in roots)


def test_mask_truncated_completions_with_branching(tiny_model, tiny_tokenizer, tmp_path):
    long = "word " * 40
    scripts = [[f"short{END}"], [long + END], [f"also short{END}"], [long + END]]
    args = make_args(tmp_path, max_completion_length=16, mask_truncated_completions=True,
                     per_device_train_batch_size=8, num_generations=8, num_branches=1)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    trainer._generate_single_turn = scripted(tiny_tokenizer, scripts)
    seen = []
    original = trainer._compute_loss

    def spy(model, inputs):
        seen.append((inputs["completion_ids"].clone(), inputs["completion_mask"].clone()))
        return original(model, inputs)

    trainer._compute_loss = spy
    runs, branch_runs = train_and_check_params(trainer)
    eos = tiny_tokenizer.eos_token_id
    n_rows = 0
    for ids, mask in seen:
        for row_ids, row_mask in zip(ids, mask, strict=True):
            kept = row_ids[row_mask.bool()]
            n_rows += 1
            if row_mask.any():  # every row left in the loss ended with EOS; truncated rows have an all-zero mask
                assert eos in kept.tolist()
    assert n_rows == 8  # roots and branches
    assert any(not m.any() for _, mask in seen for m in mask)  # some rows were truncated and masked


# ---------------------------------------------------------------------------------------------- loss types etc.
LOSS_TYPES = ["grpo", "dapo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains_with_branching(tiny_model, tiny_tokenizer, tmp_path, loss_type):
    import warnings

    kw = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = make_args(tmp_path, loss_type=loss_type, max_completion_length=24, **kw)
        trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    trainer._generate_single_turn = scripted(tiny_tokenizer, [[f"one two three{END}"], [f"four{END}"]])
    train_and_check_params(trainer)


def test_loss_type_list_is_trls():
    import re

    from trl import GRPOConfig

    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    supported = help_text.split("Supported values are ")[1].split(". ")[0]
    assert set(re.findall(r"'([a-z_]+)'", supported)) == set(LOSS_TYPES)


def test_num_iterations_with_branching(tiny_model, tiny_tokenizer, tmp_path):
    args = make_args(tmp_path, num_iterations=2, max_steps=2, max_completion_length=24)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args)
    trainer._generate_single_turn = scripted(tiny_tokenizer, [[f"one two three{END}"], [f"four{END}"]])
    runs, branch_runs = train_and_check_params(trainer)
    assert len([c for c in runs.calls if c[1].get("prefixes") is None]) == 1  # one generation for two iterations


def test_peft_lora_with_branching(tiny_model, tiny_tokenizer, tmp_path):
    from peft import LoraConfig

    args = make_args(tmp_path, max_completion_length=24)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args,
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer._generate_single_turn = scripted(tiny_tokenizer, [[f"one two three{END}"], [f"four{END}"]])
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    train_and_check_params(trainer)
    for n, p in trainer.model.named_parameters():
        if "lora" not in n:
            assert torch.equal(base[n], p), n


# ---------------------------------------------------------------------------------------------- environments
class Counter:
    """A deterministic environment: its state is the list of steps it was incremented by."""

    rewarded: list = []  # instances get_reward was called on (class-level, reset by each test)

    def reset(self, **kwargs):
        self.history = []

    def increment(self, step: int) -> int:
        """
        Increment the counter.

        Args:
            step: Value to add.

        Returns:
            The counter value.
        """
        self.history.append(step)
        return sum(self.history)

    def get_reward(self) -> float:
        Counter.rewarded.append(self)
        return float(sum(self.history))


class Dice(Counter):
    replayable = False  # e.g. its tools roll real dice


COUNTER_SCRIPTS = [
    [call("increment", step=1), call("increment", step=2), f"The counter is three, {'so I stop here ' * 3}{END}"],
    [call("increment", step=5), f"Five, and that is all I do {'today ' * 4}{END}"],
]


def executed_calls_in(prefix_mask) -> int:
    """Tool results inside a prefix = model runs followed by a tool run."""
    runs, prev = 0, 1
    for m in prefix_mask:
        if prev == 1 and m == 0:
            runs += 1
        prev = m
    return runs


def test_environment_branches_replay_the_prefix_calls_into_a_fresh_instance(tiny_model, tiny_tokenizer, tmp_path):
    from trl_appo.rollout.engine import RolloutEngine
    from trl_appo.rollout.environments import EnvironmentSession

    Counter.rewarded = []
    args = make_args(tmp_path, per_device_train_batch_size=8, num_generations=8, num_branches=3, max_steps=2,
                     max_completion_length=160)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args, reward=None, environment_factory=Counter)
    assert Counter.__name__ in trainer.reward_func_names  # TRL's environment-owned reward column
    assert [t.__name__ for t in trainer.tools] == ["increment"]  # TRL's view of the environment's tools
    trainer._generate_single_turn = scripted(tiny_tokenizer, COUNTER_SCRIPTS)
    started = []  # (root prompt ids, prefix mask, environment history right after the fork)
    original_start = RolloutEngine._start_row

    def start_row(engine, prompt_ids, prefix, session=None):
        row = original_start(engine, prompt_ids, prefix, session)
        if prefix is not None:
            assert isinstance(session, EnvironmentSession)
            started.append((prefix, list(session.environment.history), session.environment))
        return row

    trainer._appo_engine._start_row = start_row.__get__(trainer._appo_engine)
    runs, branch_runs = train_and_check_params(trainer)
    assert started
    replayed = 0
    for prefix, history, env in started:
        k = executed_calls_in(prefix.model_mask)
        text = tiny_tokenizer.decode(prefix.completion_ids)
        roots = [s for s in COUNTER_SCRIPTS if s[0].startswith(text[: len(s[0])])]  # roots this prefix can be from
        steps = [[int(t.split('"step": ')[1].split("}")[0]) for t in s if "increment" in t] for s in roots]
        assert any(history == st[:k] for st in steps)  # the root's state at the branch point: its first k calls
        replayed += k > 0
    assert replayed, "no branch point fell after a tool result; the replay was not exercised"
    # Branch rewards came from the forked instances, root rewards from TRL's root instances.
    forked = {id(env) for _, _, env in started}
    assert forked & {id(e) for e in Counter.rewarded}
    assert {id(e) for e in trainer.environments}.isdisjoint(forked)  # the roots' list is restored after branching
    assert all(sum(e.history) in (3, 5) for e in trainer.environments)


def test_environment_calls_of_one_turn_run_in_order(tiny_model, tiny_tokenizer, tmp_path):
    import time as _time

    class Slow(Counter):
        def increment(self, step: int) -> int:
            """
            Increment slowly (the first call sleeps longest).

            Args:
                step: Value to add.
            """
            _time.sleep(0.05 / step)
            return super().increment(step)

    two = call("increment", step=1)[: -len(END)] + call("increment", step=2)
    trainer = make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path), reward=None, environment_factory=Slow)
    trainer._generate_single_turn = scripted(tiny_tokenizer, [[two, f"done{END}"]])
    runs = Recorder(trainer._appo_engine, "run")
    trainer.train()
    assert runs.calls[0][2][0].tool_stats.calls == 2
    assert [e.history for e in trainer.environments] == [[1, 2], [1, 2]]


def test_non_replayable_environment_trains_as_grpo_with_one_warning(tiny_model, tiny_tokenizer, tmp_path, caplog):
    args = make_args(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trl_appo"):
        trainer = make_trainer(tiny_model, tiny_tokenizer, args, reward=None, environment_factory=Dice)
    fork_lines = [r for r in caplog.records if "cannot fork" in r.getMessage()]
    assert len(fork_lines) == 1 and "\n" not in fork_lines[0].getMessage() and "Dice" in fork_lines[0].getMessage()
    assert not trainer.args.branching and trainer.args.num_roots == 4
    # The fallback is GRPO, as branch_criterion='none' is: the future-aware weight is off too.
    assert args.future_kl is False and not trainer.appo_settings.future_kl
    trainer._generate_single_turn = scripted(tiny_tokenizer, COUNTER_SCRIPTS)
    runs = Recorder(trainer._appo_engine, "run")
    trainer.train()
    assert all(c[1].get("prefixes") is None for c in runs.calls)  # roots only
    assert len(runs.calls[0][2]) == 4  # all M rollouts are roots, as in GRPO
    assert sorted(sum(e.history) for e in trainer.environments) == [3, 3, 5, 5]
    assert "appo/future_kl_weight_mean" not in trainer._metrics["train"]


def test_multiple_environments_route_rows_and_tools(tiny_model, tiny_tokenizer, tmp_path):
    class Echo:
        def reset(self, **kwargs):
            self.said = []
            return " (echo)"

        def shout(self, text: str) -> str:
            """
            Shout a text.

            Args:
                text: What to shout.
            """
            self.said.append(text)
            return text.upper()

    ds = Dataset.from_dict({"environment": ["counter", "echo"] * 4})
    scripts = [[call("increment", step=1), f"ok then, one{END}"], [call("shout", text="hi"), f"HI it said{END}"]]
    args = make_args(tmp_path, per_device_train_batch_size=8, num_generations=4, max_completion_length=128,
                     shuffle_dataset=False)  # one batch = a counter prompt and an echo prompt
    trainer = make_trainer(tiny_model, tiny_tokenizer, args, dataset=ds, reward=length_reward,
                           environment_factory={"counter": Counter, "echo": Echo})
    assert [t.__name__ for t in trainer._env_tools["echo"]] == ["shout"]
    trainer._generate_single_turn = scripted(tiny_tokenizer, scripts)
    runs, branch_runs = train_and_check_params(trainer)
    roots = runs.calls[0][2]
    prompts = [tiny_tokenizer.decode(ids) for ids in runs.calls[0][0][0]]  # 2 counter roots, then 2 echo roots
    assert all("increment" in p and "shout" not in p for p in prompts[:2])
    assert all("shout" in p and "increment" not in p and "(echo)" in p for p in prompts[2:])
    # each row sees and runs only its own environment's tool: a counter row calling shout fails
    assert all(r.tool_stats.calls == 1 for r in roots)
    assert any(r.tool_stats.failures == 0 for r in roots) and any(r.tool_stats.failures == 1 for r in roots)


def test_environment_owned_data_without_dataset(tiny_model, tiny_tokenizer, tmp_path):
    from trl_appo.trainer import APPOTrainer

    class Quiz(Counter):
        def reset(self, **kwargs):
            super().reset()
            return "Increment the counter."  # the environment owns the prompt

    trainer = APPOTrainer(model=tiny_model, reward_funcs=None, args=make_args(tmp_path), train_dataset=None,
                          processing_class=tiny_tokenizer, environment_factory=Quiz)
    trainer._generate_single_turn = scripted(tiny_tokenizer, COUNTER_SCRIPTS)
    runs, branch_runs = train_and_check_params(trainer)
    assert "Increment the counter." in tiny_tokenizer.decode(runs.calls[0][0][0][0])  # the roots' prompt ids
    assert "Increment the counter." in tiny_tokenizer.decode(branch_runs[0][0][0][0])


def test_trl_argument_errors_come_first(tiny_model, tiny_tokenizer, tmp_path):
    class NoReset:
        def step(self, x: int) -> int:
            """
            Step.

            Args:
                x: v.
            """
            return x

    with pytest.raises(ValueError, match="must define a callable `reset`"):
        make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path), environment_factory=NoReset)
    with pytest.raises(ValueError, match="No reward source provided"):
        make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path), reward=None,
                     environment_factory=lambda: type("E", (), {"reset": lambda self, **k: None})())
    with pytest.raises(ValueError, match="tool_protocol='chat'"):
        make_trainer(tiny_model, tiny_tokenizer, make_args(tmp_path, tool_protocol="tags"), environment_factory=Counter)


def test_tools_with_a_template_that_is_not_prefix_preserving(tiny_model, tmp_path):
    """Qwen3's template drops earlier turns' thinking, so multi-turn rollouts use TRL's training variant of it,
    as GRPOTrainer does (TRL's own tool and environment tests run on a Qwen3 model)."""
    from pathlib import Path

    import trl
    from trl.chat_template_utils import add_response_schema, is_chat_template_prefix_preserving

    from trl_appo.testing import build_tiny_model, build_tiny_tokenizer

    template = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    tokenizer = add_response_schema(build_tiny_tokenizer(chat_template=template))
    assert not is_chat_template_prefix_preserving(tokenizer)
    model = build_tiny_model(tokenizer)
    trainer = make_trainer(model, tokenizer, make_args(tmp_path), tools=[multiply_tool])
    trainer._generate_single_turn = scripted(tokenizer, [[call("multiply_tool", a=3, b=4), f"It is 12.{END}"],
                                                          [call("multiply_tool", a=2, b=2), f"Four.{END}"]])
    runs, branch_runs = train_and_check_params(trainer)
    assert all(r.tool_stats.calls == 1 and r.tool_stats.failures == 0 for r in runs.calls[0][2])


def test_environment_branches_per_update(tiny_model, tiny_tokenizer, tmp_path):
    """per_update branches a prompt's roots just before its optimizer step, after the roots' generation: the branch
    instances are forked then, and the roots' instances (TRL's `environments`) are left as they were."""
    Counter.rewarded = []
    args = make_args(tmp_path, branch_schedule="per_update", steps_per_generation=2, per_device_train_batch_size=4,
                     max_steps=2, max_completion_length=160)
    trainer = make_trainer(tiny_model, tiny_tokenizer, args, reward=None, environment_factory=Counter)
    trainer._generate_single_turn = scripted(tiny_tokenizer, COUNTER_SCRIPTS)
    runs, branch_runs = train_and_check_params(trainer)
    assert len(branch_runs) == 2  # one per optimizer step
    roots = list(trainer.environments)
    assert len(roots) == 4 and all(sum(e.history) in (3, 5) for e in roots)
    assert any(e not in roots for e in Counter.rewarded)  # branches were rewarded on their own instances


def test_build_engine_uses_the_training_template_so_evaluation_matches(tiny_model, tmp_path):
    """The template choice lives in `build_engine`, which evaluation (`evaluate`, `trl-appo eval`) also uses: an
    evaluation engine renders a tool conversation exactly as the trainer's engine does."""
    from pathlib import Path

    import trl
    from trl.chat_template_utils import add_response_schema, get_training_chat_template

    from trl_appo.rollout.build import build_engine
    from trl_appo.testing import build_tiny_model, build_tiny_tokenizer

    template = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    tokenizer = add_response_schema(build_tiny_tokenizer(chat_template=template))
    evaluated = build_engine(None, tokenizer, [multiply_tool], protocol="chat", max_completion_length=16)
    assert evaluated.protocol.chat_template_kwargs["chat_template"] == get_training_chat_template(tokenizer)
    trainer = make_trainer(build_tiny_model(tokenizer), tokenizer, make_args(tmp_path), tools=[multiply_tool])
    prompt = [{"role": "user", "content": "3 times 4?"}]
    assert evaluated.tokenize_prompts([prompt]) == trainer._appo_engine.tokenize_prompts([prompt])
    # Without tools there is one assistant turn: the tokenizer's own template, as GRPOTrainer uses.
    plain = build_engine(None, tokenizer, [], protocol="chat", max_completion_length=16)
    assert "chat_template" not in plain.protocol.chat_template_kwargs
