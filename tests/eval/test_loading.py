"""Model loading from `ModelSpec`: path resolution, errors naming `model.path`, fresh copies."""

from __future__ import annotations

import pytest
import torch

from qapframe.errors import QapframeError
from qapframe.eval.loading import ModelSource, resolve_model_path
from qapframe.spec import ModelSpec


def test_missing_path_names_the_field_and_the_valid_values(tmp_path):
    with pytest.raises(QapframeError, match=r"model\.path: .*does not exist; valid: a named model \(smol-llava, smollm2-135m, toy\)"):
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


# A model and its processor by hub id, from a local cache laid out as the hub's, with the hub switched off:
# run in a fresh interpreter, since huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when first imported.
_HUB_PROBE = r"""
import sys
from qapframe.errors import QapframeError
from qapframe.eval.loading import load_model, load_processor
from qapframe.spec import ModelSpec

model = load_model(ModelSpec(path="tiny-org/tiny-llava", revision=sys.argv[1]), device="cpu")
processor = load_processor(ModelSpec(path="tiny-org/tiny-llava"))
print(type(model).__name__, type(processor).__name__, model.config.image_token_index)
try:
    load_model(ModelSpec(path="tiny-org/not-cached"))
except QapframeError as error:
    print(error)
"""


def test_a_hub_id_loads_from_the_local_cache_and_a_missing_one_is_one_clear_line(tiny_llava_dir, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llava"
    shutil.copytree(tiny_llava_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for revision in ("main", commit):
        out = subprocess.run([sys.executable, "-c", _HUB_PROBE, revision], capture_output=True, text=True, env=env,
                             check=True).stdout.strip().splitlines()
        assert out[0].startswith("LlavaForConditionalGeneration LlavaProcessor ")
        assert out[1].startswith(f"model.path 'tiny-org/not-cached': not in the Hugging Face cache ({tmp_path / 'hub'}) "
                                 "and HF_HUB_OFFLINE=1 is set")
        assert len(out) == 2  # the error is one line


def test_a_revision_needs_a_hub_id(tiny_llava_dir):
    with pytest.raises(QapframeError, match=r"model\.revision 'v1' applies to a hub id"):
        resolve_model_path(ModelSpec(path=str(tiny_llava_dir), revision="v1"))
