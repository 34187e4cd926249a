"""transformers internals live in one module: nothing else in qapframe reaches below transformers' top level, and
every wrapper resolves in the installed transformers (a release that moved one fails here, naming it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from qapframe import transformers_internals as internals

PACKAGE = Path(internals.__file__).resolve().parent


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers."):
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} from {node.module}")
        elif isinstance(node, ast.Import):
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} import {a.name}" for a in node.names
                      if a.name.startswith("transformers.")]
        elif isinstance(node, ast.Attribute) and node.attr == "modules" and getattr(node.value, "id", "") == "sys":
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} sys.modules")
    return found


def test_only_the_internals_module_imports_below_transformers_top_level():
    offenders = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name != "transformers_internals.py"
                 for hit in _private_imports(path)]
    assert offenders == [], "use qapframe/transformers_internals.py instead: " + "; ".join(offenders)


def test_every_wrapper_resolves_in_the_installed_transformers():
    assert isinstance(internals.cache_class(), type)
    # A 336-px image on LLaVA-NeXT's default pinpoints: the base view plus a 1x1 grid of crops.
    assert internals.image_size_to_num_patches((336, 336), [[336, 336], [336, 672]], 336) == 2
    grid = torch.tensor([[1, 8, 8]])
    window_index, cu = internals.vision_window_index(grid, spatial_merge_size=2, window_size=32, patch_size=4)
    assert sorted(window_index.tolist()) == list(range(16)) and int(cu[-1]) == 64  # merged tokens; patches
    features = (torch.zeros(2, 3),)
    assert internals.pooled_encoder_output(features).pooler_output is features
    assert internals.deepstack_encoder_output(features, [features]).deepstack_features == [features]


def test_modeling_function_names_the_module_when_it_is_missing():
    from transformers.models.llama import modeling_llama

    attention = modeling_llama.LlamaAttention.__new__(modeling_llama.LlamaAttention)
    assert internals.modeling_function(attention, "apply_rotary_pos_emb") is modeling_llama.apply_rotary_pos_emb
    with pytest.raises(RuntimeError, match="modeling_llama has no not_there.*transformers_internals.py"):
        internals.modeling_function(attention, "not_there")


def test_create_causal_mask_passes_through():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
                         vocab_size=10)
    config._attn_implementation = "eager"
    mask = internals.create_causal_mask(config=config, inputs_embeds=torch.zeros(1, 3, 8),
                                        attention_mask=torch.ones(1, 3, dtype=torch.long), cache=None,
                                        position_ids=None)
    assert mask.shape[-2:] == (3, 3) and bool(mask[0, 0, 0, 1] < 0) and bool(mask[0, 0, 1, 0] == 0)
