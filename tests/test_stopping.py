"""The transformers generate path stops each model turn at the protocol's stops, with the same rollouts as before."""

import itertools

import pytest
import torch

from trl_appo.testing import conversational_prompts, encode

QUESTIONS = ["What is 12 + 30?", "Name a river.", "What is 7 * 6?", "Say hi."]


def _tool_happy(model, tokenizer, boost: float = 3.0):
    """The tiny random model with a logit bias towards `<python>` and `</python>`, so its turns call the tool."""
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        for t in ("<python>", "</python>"):
            biased.bias[tokenizer.convert_tokens_to_ids(t)] = boost
    model.lm_head = biased
    return model


class _Forwards:
    """Counts decoding forwards (one per generated position of a batch) with a forward hook."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


def _reseeded(fn, seed: int = 1234):
    """Seeds torch before every generate call: an early stop draws fewer random numbers, so without this the next
    call would sample from another point of the random stream (same distribution, different ids)."""
    counter = itertools.count()

    def wrapped(*args, **kwargs):
        torch.manual_seed(seed + next(counter))
        return fn(*args, **kwargs)

    return wrapped


def _summary(rollouts):
    return [(r.completion_ids, r.model_mask, r.tool_stats.calls, r.finish_reason, r.text) for r in rollouts]


def test_stopping_criteria_fire_at_the_token_that_completes_a_stop_string(tiny_tokenizer):
    from trl_appo.rollout.stopping import stopping_criteria

    crit = stopping_criteria(tiny_tokenizer, ("</calculator>",), ())
    ids = encode(tiny_tokenizer, "x = 2 * 3</calculator>")
    assert len(encode(tiny_tokenizer, "</calculator>")) > 1  # a multi-token closing tag
    fired = [bool(crit(torch.tensor([ids[:k]]), None)[0]) for k in range(1, len(ids) + 1)]
    assert fired == [False] * (len(ids) - 1) + [True]
    # a last token that runs past the tag (`>` + newline) completes it too, as the engine's cut counts it
    ids = encode(tiny_tokenizer, "x</calculator") + [tiny_tokenizer.convert_tokens_to_ids(">Ċ")]
    assert tiny_tokenizer.decode(ids) == "x</calculator>\n"
    assert bool(crit(torch.tensor([ids]), None)[0]) and not bool(crit(torch.tensor([ids[:-1]]), None)[0])
    assert stopping_criteria(tiny_tokenizer, (), ()) is None


def test_hf_generate_fn_stops_at_the_closing_tag_with_the_same_rollouts(tiny_tokenizer, tiny_model):
    from trl_appo.evaluation import make_hf_generate_fn
    from trl_appo.rollout import build_engine
    from trl_appo.tools import PythonTool

    model = _tool_happy(tiny_model, tiny_tokenizer)
    forwards = _Forwards(model)
    results = {}
    for stop in (False, True):
        engine = build_engine(None, tiny_tokenizer, [PythonTool(timeout=10)], protocol="tags",
                              max_completion_length=96, max_tool_calls=3, eos_token_ids=[tiny_tokenizer.eos_token_id])
        stops = dict(stop_strings=engine.protocol.stop_strings, stop_token_ids=engine.protocol.stop_token_ids)
        engine.generate_fn = _reseeded(make_hf_generate_fn(model, tiny_tokenizer, temperature=1.0,
                                                           **(stops if stop else {})))
        before = forwards.calls
        rollouts = engine.run(engine.tokenize_prompts(conversational_prompts(QUESTIONS)), group_size=2)
        results[stop] = (_summary(rollouts), forwards.calls - before)
    assert results[True][0] == results[False][0]
    assert sum(s[2] for s in results[True][0]) >= 4  # the turns did call the tool
    assert results[True][1] < 0.8 * results[False][1]  # fewer decoded positions


@pytest.mark.parametrize("protocol", ["tags", "chat"])
def test_trainer_generate_stops_at_protocol_stops_with_the_same_rollouts(protocol, tiny_tokenizer, tiny_model,
                                                                         tmp_path):
    from trl_appo.tools import PythonTool, tool
    from trl_appo.trainer import APPOTrainer
    from tests.test_trainer import make_args, make_trainer

    @tool
    def python(code: str) -> str:
        """Run Python code.

        Args:
            code: the program.
        """
        return "42"

    model = _tool_happy(tiny_model, tiny_tokenizer)
    forwards = _Forwards(model)
    args = make_args(tmp_path, tool_protocol=protocol, max_completion_length=96, max_tool_calls=3)
    tools = [PythonTool(timeout=10) if protocol == "tags" else python]
    trainer = make_trainer(model, tiny_tokenizer, args, tools=tools)
    generate = trainer._generate_single_turn
    prompt_ids = trainer._appo_engine.tokenize_prompts(conversational_prompts(QUESTIONS))
    results = {}
    for stop in (False, True):
        trainer._appo_early_stop = stop
        trainer._generate_single_turn = _reseeded(generate)
        before = forwards.calls
        rollouts = trainer._appo_engine.run(prompt_ids, group_size=2)
        results[stop] = (_summary(rollouts), forwards.calls - before)
    assert results[True][0] == results[False][0]
    assert APPOTrainer._appo_early_stop  # on by default
    if protocol == "tags":
        assert sum(s[2] for s in results[True][0]) >= 4
        assert results[True][1] < 0.8 * results[False][1]
    else:  # the chat protocol's turns end at eos already: nothing to add
        assert results[True][1] == results[False][1]
    assert "generate" not in vars(trainer.accelerator.unwrap_model(trainer.model_wrapped))  # the patch is undone


def test_stop_strings_sample_what_closing_tags_as_eos_ids_sampled(tiny_tokenizer, tiny_model):
    """`</python>` is one token here: stopping at it as a stop string or as an extra eos id (the workaround
    benchmarks/learning.py used) ends the same rows at the same steps, so even one unseeded random stream agrees."""
    from trl_appo.evaluation import make_hf_generate_fn
    from trl_appo.rollout import build_engine
    from trl_appo.tools import PythonTool

    model = _tool_happy(tiny_model, tiny_tokenizer)
    results = []
    for as_eos in (True, False):
        old = model.generation_config.eos_token_id
        if as_eos:
            model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id] + tiny_tokenizer.convert_tokens_to_ids(
                ["</python>", "</search>"])
        try:
            fn = make_hf_generate_fn(model, tiny_tokenizer, temperature=1.0,
                                     stop_strings=() if as_eos else ("</python>", "</search>"))
        finally:
            model.generation_config.eos_token_id = old
        engine = build_engine(fn, tiny_tokenizer, [PythonTool(timeout=10)], protocol="tags", max_completion_length=96,
                              max_tool_calls=3, eos_token_ids=[tiny_tokenizer.eos_token_id])
        torch.manual_seed(7)
        results.append(_summary(engine.run(engine.tokenize_prompts(conversational_prompts(QUESTIONS)), group_size=2)))
    assert results[0] == results[1]
    assert sum(s[2] for s in results[0]) >= 4
