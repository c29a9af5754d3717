"""Pass@k estimator, aggregation, evaluation through the rollout engine (scripted generator), HF generate_fn."""

from __future__ import annotations

import ast
import itertools
import json
import math
import operator
import re
from fractions import Fraction

import pytest

from trl_appo.evaluation import (
    EvaluationResult,
    aggregate,
    evaluate,
    make_hf_generate_fn,
    mean_pass_at_k,
    pass_at_k,
)
from trl_appo.rewards import format_f1_reward
from trl_appo.tasks import TINY_SYSTEM_PROMPT

# ---------------------------------------------------------------------------------------------- estimator


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2)) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct sample


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = Fraction(sum(any(s) for s in subsets), len(subsets))
                assert pass_at_k(n, c, k) == pytest.approx(float(brute), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    exact = 1 - Fraction(math.comb(1000 - 7, 300), math.comb(1000, 300))
    assert pass_at_k(1000, 7, 300) == pytest.approx(float(exact), rel=1e-12)
    assert 0.0 <= pass_at_k(2000, 1, 1999) <= 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_aggregate_skips_unscored_prompts_but_counts_their_tools():
    def sample(p, score, correct, calls=1, fails=0, finish="stop"):
        return {"prompt_index": p, "score": score, "correct": correct, "tool_calls": calls, "tool_failures": fails, "finish_reason": finish}

    samples = [sample(0, 1.0, True), sample(0, 0.0, False, fails=1), sample(1, 0.0, False, calls=3, finish="length"),
               sample(1, 0.0, False), sample(2, None, None, calls=0), sample(2, None, None, calls=0)]
    result = aggregate(samples, ks=[1, 2], n=2)
    assert (result.num_prompts, result.num_unscored, result.num_rollouts) == (2, 1, 6)
    assert result.pass_at == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    assert result.mean_score == pytest.approx(0.25)
    assert result.tool_calls_per_rollout == pytest.approx(6 / 6) and result.tool_failures_per_rollout == pytest.approx(1 / 6)
    assert result.finish_reasons == {"stop": 5, "length": 1}
    assert math.isnan(mean_pass_at_k([], 1))


# ---------------------------------------------------------------------------------------------- engine


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(node):
    if isinstance(node, ast.Constant):
        return node.value
    return _OPS[type(node.op)](_arith(node.left), _arith(node.right))


def fake_python(code: str) -> str:
    """Stand-in for the sandbox (fast): evaluates `print(<arithmetic>)`; raises like Python would."""
    call = ast.parse(code.strip(), mode="eval").body
    return str(_arith(call.args[0]))


class ScriptedPolicy:
    """A generate_fn following the engine contract: per prompt `What is A * B?`, sample j < correct[(A, B)]
    calls python with the right product, others with a wrong one (or a failing `1/0` when `fail`), then every
    sample copies the tool result into its answer."""

    def __init__(self, tokenizer, correct: dict[str, int], fail: set[str] = frozenset()):
        self.tokenizer, self.correct, self.fail = tokenizer, correct, fail
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, contexts, num_generations, max_new_tokens):
        self.calls.append((len(contexts), num_generations, max_new_tokens))
        out = []
        for i, ids in enumerate(contexts):
            text = self.tokenizer.decode(ids)
            question = re.findall(r"What is (\d+) \* (\d+)\?", text)[-1]
            completion = text.rsplit("<|im_start|>assistant", 1)[-1]
            if "<result>" not in completion:
                key = f"{question[0]}*{question[1]}"
                if key in self.fail:
                    call = "1/0"
                elif i % num_generations < self.correct.get(key, 0):
                    call = f"{question[0]}*{question[1]}"
                else:
                    call = f"{question[0]}*{question[1]}+1"
                reply = f"<python>print({call})</python>"
            else:
                result = re.findall(r"<result>\n(.*?)\n</result>", completion, re.DOTALL)[-1]
                value = result if re.fullmatch(r"-?\d+", result) else "unknown"
                reply = f"<answer>\\boxed{{{value}}}</answer><|im_end|>"
            out.append(self.tokenizer(reply, add_special_tokens=False)["input_ids"])
        return out, None


def _row(a: int, b: int, source: str, gold: str | None = None) -> dict:
    return {
        "prompt": [{"role": "system", "content": TINY_SYSTEM_PROMPT}, {"role": "user", "content": f"What is {a} * {b}?"}],
        "ground_truth": str(a * b) if gold is None else gold,
        "data_source": source,
        "ability": "math",
    }


def _engine(tokenizer, policy, **kwargs):
    from trl_appo.rollout.engine import RolloutEngine
    from trl_appo.rollout.protocols import TagProtocol
    from trl_appo.tools.base import Tool

    return RolloutEngine(policy, tokenizer, TagProtocol(tokenizer), [Tool(fake_python, name="python")], max_completion_length=64, **kwargs)


def test_evaluate_through_the_engine_per_source(tiny_tokenizer, tmp_path):
    pytest.importorskip("trl_appo.rollout.engine")
    rows = [_row(347, 29, "tiny_arith"), _row(12, 34, "tiny_arith"), _row(5, 6, "other"), _row(7, 8, "other"),
            _row(9, 9, "other", gold="")]
    policy = ScriptedPolicy(tiny_tokenizer, correct={"347*29": 2, "12*34": 0, "5*6": 5, "7*8": 1}, fail={"9*9"})
    result = evaluate(rows, _engine(tiny_tokenizer, policy), n=5, ks=(2, 5), batch_size=2, temperature=0.7,
                      top_p=0.95, max_new_tokens=64, model_name="scripted")

    assert policy.calls[0] == (10, 5, 64)  # first turn: batch_size * n rows in blocks of n identical contexts
    tiny, other = result.per_source["tiny_arith"], result.per_source["other"]
    assert tiny.pass_at[1] == pytest.approx((0.4 + 0.0) / 2)
    assert tiny.pass_at[2] == pytest.approx((0.7 + 0.0) / 2)
    assert tiny.pass_at[5] == pytest.approx(0.5)
    assert other.pass_at[1] == pytest.approx((1.0 + 0.2) / 2)
    assert other.pass_at[2] == pytest.approx((1.0 + 0.4) / 2)
    assert other.num_unscored == 1 and other.num_prompts == 2 and other.num_rollouts == 15
    assert result.overall.pass_at[1] == pytest.approx((0.4 + 0.0 + 1.0 + 0.2) / 4)
    assert tiny.tool_calls_per_rollout == 1.0 and tiny.tool_failures_per_rollout == 0.0
    assert other.tool_failures_per_rollout == pytest.approx(5 / 15)  # the 1/0 prompt fails every sample
    assert result.overall.finish_reasons == {"stop": 25}
    correct_texts = [s["text"] for s in result.samples if s["correct"]]
    assert correct_texts[0] == "<python>print(347*29)</python> <result>\n10063\n</result><answer>\\boxed{10063}</answer>"

    assert result.settings["temperature"] == 0.7 and result.settings["top_p"] == 0.95
    assert result.settings["max_new_tokens"] == 64 and result.settings["model_name"] == "scripted"
    assert result.settings["n"] == 5 and result.settings["k"] == [1, 2, 5]
    table = str(result)
    assert "pass@5" in table and "tiny_arith" in table and "overall" in table and "temperature=0.7" in table
    saved = json.loads(result.save_json(tmp_path / "eval" / "result.json").read_text())
    assert saved["per_source"]["tiny_arith"]["pass_at"]["pass@2"] == pytest.approx(0.35)
    assert saved["settings"]["model_name"] == "scripted" and len(saved["samples"]) == 25


def test_evaluate_builds_an_engine_and_accepts_other_scores(tiny_tokenizer):
    pytest.importorskip("trl_appo.rollout.engine")
    from trl_appo.tools.base import Tool

    async def async_format_f1(**kwargs):  # TRL allows async reward functions
        return format_f1_reward(**kwargs)

    rows = [_row(347, 29, "tiny_arith"), _row(11, 11, "tiny_arith")]
    policy = ScriptedPolicy(tiny_tokenizer, correct={"347*29": 1, "11*11": 0})
    result = evaluate(rows, generate_fn=policy, tokenizer=tiny_tokenizer, tools=[Tool(fake_python, name="python")],
                      n=2, score_fn=format_f1_reward, correct_fn=lambda score: score > 0.5, keep_text=False)
    async_result = evaluate(rows, generate_fn=policy, tokenizer=tiny_tokenizer, tools=[Tool(fake_python, name="python")],
                            n=2, score_fn=async_format_f1)
    assert async_result.pass_at(1) == pytest.approx(0.25)
    assert result.pass_at(1) == pytest.approx(0.25)
    assert result.pass_at(1, "tiny_arith") == pytest.approx(0.25)
    assert result.settings["score_fn"] == "format_f1_reward" and result.settings["threshold"] is None
    assert "text" not in result.samples[0]
    assert isinstance(result, EvaluationResult)


def test_evaluate_argument_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="pass@3"):
        evaluate([_row(1, 2, "x")], generate_fn=lambda *a: ([], None), tokenizer=tiny_tokenizer, n=2, ks=(3,))
    with pytest.raises(ValueError, match="engine or a generate_fn"):
        evaluate([_row(1, 2, "x")], n=1)


# ---------------------------------------------------------------------------------------------- HF backend


class _FakeModel:
    """Records generate() inputs and returns scripted continuations (pad after eos, as transformers does)."""

    def __init__(self, continuations, eos, pad):
        import torch

        self.torch, self.continuations, self.training = torch, continuations, True
        self.generation_config = type("GC", (), {"eos_token_id": eos})()
        self.device = torch.device("cpu")
        self.pad, self.seen = pad, {}

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.seen = {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "max_new_tokens": max_new_tokens,
                     "training": self.training, **kwargs}
        width = max(len(c) for c in self.continuations)
        tails = [c + [self.pad] * (width - len(c)) for c in self.continuations][: input_ids.shape[0]]
        return self.torch.cat([input_ids, self.torch.tensor(tails)], dim=1)


def test_hf_generate_fn_pads_left_and_cuts_at_eos():
    tokenizer = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 9})()
    model = _FakeModel([[5, 6, 9], [7, 8, 3, 4]], eos=[9, 2], pad=0)
    generate_fn = make_hf_generate_fn(model, tokenizer, temperature=0.8, top_p=0.9, max_new_tokens=4)
    ids, logprobs = generate_fn([[1, 2, 3], [4]], 1, 100)
    assert ids == [[5, 6, 9], [7, 8, 3, 4]] and logprobs is None
    assert model.seen["input_ids"] == [[1, 2, 3], [0, 0, 4]]
    assert model.seen["attention_mask"] == [[1, 1, 1], [0, 0, 1]]
    assert model.seen["max_new_tokens"] == 4  # min(cap, engine budget)
    assert model.seen["do_sample"] and model.seen["temperature"] == 0.8 and model.seen["top_p"] == 0.9
    assert model.seen["training"] is False and model.training is True  # eval during generate, mode restored
    assert generate_fn([], 1, 10) == ([], None)
    generate_fn([[1]], 1, 2)
    assert model.seen["max_new_tokens"] == 2


def test_hf_generate_fn_greedy_is_batch_invariant(tiny_tokenizer, tiny_model):
    generate_fn = make_hf_generate_fn(tiny_model, tiny_tokenizer, temperature=0.0)
    short = tiny_tokenizer("What is 3 * 4?", add_special_tokens=False)["input_ids"]
    long = tiny_tokenizer("<python>print(347 * 29)</python> and then more", add_special_tokens=False)["input_ids"]
    alone, _ = generate_fn([short], 1, 6)
    batched, _ = generate_fn([long, short], 1, 6)
    assert batched[1] == alone[0]
    assert all(1 <= len(row) <= 6 for row in batched)


def test_evaluate_with_a_real_tiny_model(tiny_tokenizer, tiny_model):
    pytest.importorskip("trl_appo.rollout.engine")
    import torch

    from trl_appo.tools.base import Tool

    torch.manual_seed(0)
    generate_fn = make_hf_generate_fn(tiny_model, tiny_tokenizer, temperature=1.0, top_p=1.0, max_new_tokens=8)
    rows = [_row(347, 29, "tiny_arith"), _row(5, 6, "tiny_arith")]
    result = evaluate(rows, generate_fn=generate_fn, tokenizer=tiny_tokenizer, tools=[Tool(fake_python, name="python")],
                      n=2, ks=(2,), max_completion_length=8, model_name="tiny-random")
    assert result.overall.num_rollouts == 4 and result.overall.num_prompts == 2
    assert result.pass_at(2) == 0.0  # a random model does not answer in the protocol
    assert all(s["completion_tokens"] <= 8 for s in result.samples)
    assert result.settings["max_completion_length"] == 8


# ---------------------------------------------------------------------------------------------- training's engine


def test_evaluation_builds_the_engine_training_builds(tiny_model, tiny_tokenizer, tmp_path):
    """`evaluate` (and `trl-appo eval`) assemble their engine with `build_engine`, as the trainer does: the same
    protocol tags, stop ids and tool budget rules for the same tools."""
    from datasets import Dataset

    from trl_appo.config import APPOConfig
    from trl_appo.rollout import build_engine, eos_token_ids_of
    from trl_appo.tools.base import Tool
    from trl_appo.trainer import APPOTrainer

    tool = Tool(fake_python, name="python")
    args = APPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", num_generations=4,
                      per_device_train_batch_size=4, tool_protocol="tags", max_tool_calls=3, max_completion_length=32)
    trainer = APPOTrainer(model=tiny_model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["hi"] * 4}), processing_class=tiny_tokenizer,
                          tools=[tool])
    trained = trainer._appo_engine
    evaluated = build_engine(None, tiny_tokenizer, [tool], protocol="tags", max_completion_length=32, max_tool_calls=3,
                             eos_token_ids=eos_token_ids_of(tiny_model, tiny_tokenizer))
    for e in (trained, evaluated):
        assert (e.protocol.tags, e.protocol.stop_strings) == (trained.protocol.tags, trained.protocol.stop_strings)
        assert e.protocol.stop_token_ids == trained.protocol.stop_token_ids
        assert (e.max_tool_calls, e.on_tool_limit, e.max_completion_length) == (3, "message", 32)


def test_evaluate_without_tools_is_one_model_turn_as_in_training(tiny_tokenizer):
    # A call-shaped text ends the episode when no tool is registered (training's rule): no "tool not found" turn.
    calls = []

    def generate(contexts, num_generations, max_new_tokens):
        calls.append(len(contexts))
        ids = tiny_tokenizer.encode("<python>print(1)</python> done", add_special_tokens=False)
        return [ids + [tiny_tokenizer.eos_token_id] for _ in contexts], None

    result = evaluate([_row(1, 2, "x")], generate_fn=generate, tokenizer=tiny_tokenizer, n=2, score_fn=format_f1_reward)
    assert calls == [2]  # one generation call for the two samples, no second turn
    assert result.overall.tool_calls_per_rollout == 0.0
