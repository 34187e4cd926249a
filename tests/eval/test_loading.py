"""Model loading from `ModelSpec`: path resolution, errors naming `model.path`, fresh copies."""

from __future__ import annotations

import pytest
import torch

from qapframe.errors import QapframeError
from qapframe.eval.loading import ModelSource, resolve_model_path
from qapframe.spec import ModelSpec


def test_missing_path_names_the_field_and_the_valid_values(tmp_path):
    with pytest.raises(QapframeError, match=r"model\.path: .*does not exist; valid: a named model \(smollm2-135m, toy\)"):
        resolve_model_path(ModelSpec(path=str(tmp_path / "nope")))
    with pytest.raises(QapframeError, match="has no config.json"):
        resolve_model_path(ModelSpec(path=str(tmp_path)))


def test_toy_resolves_to_the_embedded_model():
    from qapframe.toy import TOY_PATH

    assert resolve_model_path(ModelSpec(path="toy")) == TOY_PATH


def test_fresh_copies_are_independent_and_equal_the_saved_weights(tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration

    source = ModelSource(ModelSpec(path=str(tiny_llava_dir)))
    first = source.fresh()
    reference = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    assert isinstance(first, LlavaForConditionalGeneration) and not first.training
    with torch.no_grad():
        next(first.parameters()).add_(1.0)  # what a quantizer's in-place rewrite would do
    second = source.fresh()
    for (name, p), q in zip(second.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_device_map_auto_loads_on_cpu(tiny_llava_dir):
    model = ModelSource(ModelSpec(path=str(tiny_llava_dir), device_map="auto")).fresh()
    assert model.device.type == "cpu" and model.dtype == torch.float32
