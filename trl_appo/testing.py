"""Tiny offline tokenizers and causal LMs, built in code (no hub, no downloads).

Used by the test suite, the notebooks and the CPU demo. Two traps this module avoids (both found while building
the offline fixtures):

* The BPE is trained with exactly Qwen2's normaliser and pre-tokeniser (NFC + Qwen's split regex + ByteLevel
  without regex). A tokenizer trained with a plain ByteLevel pre-tokeniser tokenises *differently* after an
  `AutoTokenizer` reload of a `model_type: qwen2` directory, because `Qwen2Tokenizer` rebuilds the pipeline.
* The end-of-turn token `<|im_end|>` is the tokenizer's `eos_token` (as in Qwen's instruct tokenizers) and
  `<|endoftext|>` is the pad token; otherwise TRL's tool loop cuts rendered tool turns at the wrong place.

The chat template is TRL's bundled `qwen2_5.jinja`, read verbatim from the installed TRL, so TRL recognises it
(`add_response_schema`, `supports_tool_calling`, prefix preservation) and `parse_response` parses tool calls.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Iterable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added as ordinary (non-special) tokens, as Qwen does, so they survive `decode(skip_special_tokens=True)`.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
# The paper's tag protocol (docs/algorithm.md §6). Single tokens keep the tiny demo's sequences short.
TAG_TOKENS = ["<python>", "</python>", "<search>", "</search>", "<result>", "</result>", "<answer>", "</answer>"]

# Qwen2's pre-tokenisation regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
_QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen2_5_chat_template() -> str:
    """TRL's bundled Qwen2.5 chat template, byte-identical (so TRL's template detection recognises it)."""
    return (importlib.resources.files("trl") / "chat_templates" / "qwen2_5.jinja").read_text()


def _training_corpus() -> list[str]:
    """A small synthetic corpus: enough for BPE merges over digits, tool JSON, tags and common words."""
    words = (
        "what is the answer question think search python result tool call response system user assistant "
        "you are a helpful print def return for in range if else and or not of to compute sum product "
        "capital city river country element inventor year number first second name function arguments "
        "Tools available may use functions signatures within XML tags json object each"
    ).split()
    lines = []
    for i in range(200):
        a, b = (i * 37) % 997, (i * 53 + 11) % 991
        lines.append(f"What is {a} + {b}? The answer is {a + b}.")
        lines.append(f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>')
        lines.append(f"<python>print({a} * {b})</python> <result>\n{a * b}\n</result>")
        lines.append(f"<answer>\\boxed{{{a * b}}}</answer>")
        lines.append(" ".join(words[(i + k) % len(words)] for k in range(12)))
    lines.append('{"type": "function", "function": {"name": "add", "description": "Add two integers.", '
                 '"parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}')
    return lines


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int, extra_tokens: tuple[str, ...]) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    tok.add_tokens(list(extra_tokens))
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 400, tag_tokens: bool = True, chat_template: str | None = None):
    """Build a byte-level BPE tokenizer offline, in well under a second after the first call.

    Args:
        vocab_size: BPE vocabulary size before added tokens (the byte alphabet alone is 256).
        tag_tokens: also add the paper's tag-protocol tags (`<python>`, `</python>`, ...) as single tokens.
        chat_template: a Jinja chat template; defaults to TRL's `qwen2_5.jinja` (tool-call aware).

    Returns:
        A `PreTrainedTokenizerFast` with eos `<|im_end|>`, pad `<|endoftext|>`, left padding, a tool-aware chat
        template and a response template so `tokenizer.parse_response` extracts tool calls.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    extra = tuple(TOOL_TOKENS + (TAG_TOKENS if tag_tokens else []))
    backend = Tokenizer.from_str(_tokenizer_json(vocab_size, extra))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=chat_template or qwen2_5_chat_template(),
    )
    if chat_template is None:
        from trl.chat_template_utils import add_response_schema

        add_response_schema(tokenizer)
    return tokenizer


def build_tiny_model(
    tokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    architecture: str = "qwen2",
):
    """A randomly initialised tiny causal LM matching `tokenizer` (Qwen2 or Llama architecture), fp32.

    The generation config stops at the end-of-turn token and pads with the tokenizer's pad token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[
        architecture
    ]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def save_tiny_pair(model, tokenizer, path: str) -> str:
    """Save model and tokenizer to a directory (needed where TRL reloads by path, e.g. a reference model)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special-token insertion."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversational_prompts(questions: Iterable[str], system: str | None = None) -> list[list[dict]]:
    """Wrap questions as TRL conversational prompts."""
    out = []
    for q in questions:
        msgs = [{"role": "system", "content": system}] if system else []
        out.append(msgs + [{"role": "user", "content": q}])
    return out


def dumps(obj) -> str:  # small helper shared by tests that compare tool-call JSON
    return json.dumps(obj, separators=(", ", ": "))
