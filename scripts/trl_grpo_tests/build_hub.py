# Part of scripts/trl_grpo_tests (see run.sh): offline stand-ins, not a test of this repository.
"""Offline stand-ins for the hub ids TRL's tests/test_grpo_trainer.py loads (run once; writes ./hub/).

Tokenizer: byte-level BPE whose ids agree with Qwen2.5's on every id the test module hard-codes (bytes at GPT-2's
byte order, the multi-byte tokens the tests use at their Qwen ids, the Qwen special tokens at 151643+), so the
tests' scripted completions decode to the text their comments give. Models: tiny random Qwen2/Qwen3/Qwen3Moe/Llama.
"""
import json, os, sys
from pathlib import Path

HUB = Path(sys.argv[1] if len(sys.argv) > 1 else "hub")
QWEN_VOCAB = 151936
COMPACT = True  # remap the tests' Qwen ids into a ~320-token vocabulary (remap.json; run.sh rewrites the test ids)
MULTI = {
    198: "\n", 220: " ", 293: " b", 314: " {", 330: ' "', 397: ">\n", 411: "out", 450: "dec", 497: '",', 522: "</",
    606: "name", 788: '":', 894: " any", 927: "sh", 944: "'t", 1318: "text", 1414: " know", 1513: " don",
    2765: " won", 4913: '{"', 5212: ' {"', 5392: " tool", 6023: "hi", 6659: "call", 7692: "async", 9520: "step",
    11248: "}}\n", 13477: "rement", 14172: "tool", 16252: " increment", 16370: "arguments", 17453: "Done",
    22785: "_tool", 35744: "increment", 64648: "multiply", 93054: "_multiply", 95642: '"}}\n',
}
SPECIAL = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151657: "<tool_call>",
           151658: "</tool_call>", 151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>",
           151668: "</think>"}


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))


def remap():
    m = {i: i for i in range(256)}
    for k, i in enumerate(sorted(MULTI)):
        m[i] = 256 + k
    for k, i in enumerate(sorted(SPECIAL)):
        m[i] = 256 + len(MULTI) + k
    return m


def build_tokenizer(template_name):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    import trl
    b2u = bytes_to_unicode()
    m = remap() if COMPACT else {i: i for i in list(MULTI) + list(SPECIAL) + list(range(256))}
    byte_tokens = list(b2u.values())  # GPT-2 order: id i = i-th byte char (Qwen2 agrees)
    vocab = {t: i for i, t in enumerate(byte_tokens)}
    for i, s in MULTI.items():
        vocab["".join(b2u[b] for b in s.encode())] = m[i]
    used = set(vocab.values()) | {m[i] for i in SPECIAL}
    filler = 0
    for i in range(min(m[i] for i in SPECIAL)):  # fill the gaps so ids are contiguous up to the specials
        if i not in used:
            vocab[f"<|unused_{filler}|>"] = i; filler += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    for i0 in sorted(SPECIAL):
        i = m[i0]
        assert tok.get_vocab_size(with_added_tokens=True) <= i
        while tok.get_vocab_size(with_added_tokens=True) < i:
            tok.add_tokens([AddedToken(f"<|pad_{tok.get_vocab_size(with_added_tokens=True)}|>", special=True)])
        tok.add_special_tokens([AddedToken(SPECIAL[i0], special=SPECIAL[i0] not in ("<tool_call>", "</tool_call>",
                                                                                 "<think>", "</think>",
                                                                                 "<tool_response>",
                                                                                 "</tool_response>"))])
        assert tok.token_to_id(SPECIAL[i0]) == i, (SPECIAL[i0], tok.token_to_id(SPECIAL[i0]))
    template = (Path(trl.__file__).parent / "chat_templates" / f"{template_name}.jinja").read_text()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                padding_side="left", chat_template=template)
    return t


def check(t):
    m = remap() if COMPACT else None
    ids = [151657, 198, 4913, 606, 788, 330, 64648, 22785, 497, 330, 16370, 788, 5212, 64, 788, 220, 18, 11, 330,
           65, 788, 220, 19, 11248, 151658, 151645]
    ids = [m[i] for i in ids] if m else ids
    text = t.decode(ids)
    assert text == '<tool_call>\n{"name": "multiply_tool", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>', text
    assert t.decode([m[i] if m else i for i in [40, 1513, 944, 1414, 894, 5392]]) == "I don't know any tool"


def main():
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Qwen2Config,
                              Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen3Config, Qwen3ForCausalLM,
                              Qwen3ForSequenceClassification, Qwen3MoeConfig, Qwen3MoeForCausalLM, GenerationConfig)
    tok25 = build_tokenizer("qwen2_5"); check(tok25)
    tok3 = build_tokenizer("qwen3"); check(tok3)
    HUB.mkdir(parents=True, exist_ok=True)
    m = remap() if COMPACT else {i: i for i in SPECIAL}
    json.dump({str(k): v for k, v in m.items()}, open(HUB / "remap.json", "w")) if COMPACT else None
    small = dict(vocab_size=len(tok25), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                 eos_token_id=m[151645], pad_token_id=m[151643], bos_token_id=None)
    specs = {
        "tiny-Qwen2ForCausalLM-2.5": (Qwen2Config, Qwen2ForCausalLM, tok25, {}),
        "tiny-Qwen2ForSequenceClassification-2.5": (Qwen2Config, Qwen2ForSequenceClassification, tok25,
                                                    {"num_labels": 1}),
        "tiny-Qwen3ForCausalLM": (Qwen3Config, Qwen3ForCausalLM, tok3, {"head_dim": 4}),
        "tiny-Qwen3ForSequenceClassification": (Qwen3Config, Qwen3ForSequenceClassification, tok3,
                                                {"head_dim": 4, "num_labels": 1}),
        "tiny-Qwen3MoeForCausalLM": (Qwen3MoeConfig, Qwen3MoeForCausalLM, tok3,
                                     {"head_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
                                      "moe_intermediate_size": 16}),
        "tiny-LlamaForCausalLM-3.2": (LlamaConfig, LlamaForCausalLM, tok25, {}),
        "tiny-LlamaForSequenceClassification-3.2": (LlamaConfig, LlamaForSequenceClassification, tok25,
                                                    {"num_labels": 1}),
    }
    HUB.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, (cfg_cls, model_cls, tok, extra) in specs.items():
        cfg = cfg_cls(**small, **extra)
        model = model_cls(cfg)
        if hasattr(model, "generation_config") and model.generation_config is not None and "Causal" in name:
            model.generation_config = GenerationConfig(eos_token_id=m[151645], pad_token_id=m[151643],
                                                       bos_token_id=None)
        out = HUB / "trl-internal-testing" / name
        model.save_pretrained(out); tok.save_pretrained(out)
    # zen datasets
    from datasets import Dataset
    words = ["The sky is", "Water boils at", "A cat likes", "Two plus two", "Roses are", "Explain gravity",
             "Name a color", "Say hello", "The sun rises", "Count to three", "Trees grow", "Snow is", "Birds can",
             "Fish swim", "Music is", "Books have", "Time flies"]
    zen = HUB / "trl-internal-testing" / "zen"
    std = {"prompt": [w for w in words]}
    conv = {"prompt": [[{"role": "user", "content": w}] for w in words]}
    configs = []
    for cfg_name, data in (("standard_prompt_only", std), ("conversational_prompt_only", conv)):
        for split, rows in (("train", slice(0, 17)), ("test", slice(0, 2))):
            d = Dataset.from_dict({k: v[rows] for k, v in data.items()})
            (zen / cfg_name).mkdir(parents=True, exist_ok=True)
            d.to_json(zen / cfg_name / f"{split}.jsonl")
        configs.append(f"- config_name: {cfg_name}\n  data_files:\n  - split: train\n    path: {cfg_name}/train.jsonl\n"
                       f"  - split: test\n    path: {cfg_name}/test.jsonl")
    (zen / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    print("ok", HUB)


if __name__ == "__main__":
    main()
