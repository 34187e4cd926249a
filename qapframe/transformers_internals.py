"""Every transformers internal qapframe relies on, in one module, so a transformers upgrade is fixed in one place.

These are helpers transformers does not export from its top level (modeling-module functions, mask and cache
utilities, output classes); they may move or change between releases. The tested range is pyproject.toml's
(`bash .ci/lowest-transformers` runs the adapter tests at its lower bound). Each is imported on first use, so
importing qapframe never imports transformers' model code.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch


def create_causal_mask(**kwargs: Any):
    """transformers.masking_utils.create_causal_mask (the 4-D mask or its sdpa/flex form for the decoder)."""
    from transformers.masking_utils import create_causal_mask as create

    return create(**kwargs)


def cache_class() -> type:
    """transformers' KV-cache base class (every ``past_key_values`` object is an instance)."""
    from transformers.cache_utils import Cache

    return Cache


def image_size_to_num_patches(image_size, grid_pinpoints, patch_size: int) -> int:
    """Crops LLaVA-NeXT's and LLaVA-OneVision's anyres packing makes of one image (base view included)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches as count

    return count(image_size, grid_pinpoints, patch_size)


def vision_window_index(grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int):
    """Qwen2.5-VL's window permutation of the merged vision tokens: ``(window_index, cu_window_seqlens)``."""
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid_thw, spatial_merge_size=spatial_merge_size, window_size=window_size,
                                   patch_size=patch_size)


def pooled_encoder_output(features: tuple[torch.Tensor, ...]):
    """A vision encoder's output carrying per-item ``features`` (Qwen-VL's ``mm_encoder_outputs`` entry)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=features)


def deepstack_encoder_output(features: tuple[torch.Tensor, ...], deepstack: list[tuple[torch.Tensor, ...]]):
    """Qwen3-VL's encoder output: per-item ``features`` plus per deepstack layer the per-item features."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    return BaseModelOutputWithDeepstackFeatures(pooler_output=features, deepstack_features=deepstack)


def between_layers(decoder: torch.nn.Module, decoder_kwargs: dict) -> Callable | None:
    """What ``decoder``'s forward adds to the hidden states after its layer ``i``, as ``f(i, hidden) -> hidden``,
    for the call that received ``decoder_kwargs``; None when it adds nothing between layers.

    Qwen3-VL's text model adds each deepstack layer's vision features at the vision positions after decoder
    layers 0..K-1 (``_deepstack_process``); block-by-block calibration replays that so later layers see the
    hidden states the model gives them.
    """
    embeds, mask = decoder_kwargs.get("deepstack_visual_embeds"), decoder_kwargs.get("visual_pos_masks")
    process = getattr(decoder, "_deepstack_process", None)
    if process is None or embeds is None or mask is None:
        return None

    def add(i: int, hidden: torch.Tensor) -> torch.Tensor:
        return process(hidden.clone(), mask, embeds[i]) if i < len(embeds) else hidden

    return add


def modeling_function(module: torch.nn.Module, name: str) -> Callable:
    """The function ``name`` of the modeling module that defines ``type(module)``, e.g. its
    ``apply_rotary_pos_emb``: rotary conventions (half rotation, interleaving) differ by architecture."""
    defining = sys.modules[type(module).__module__]
    function = getattr(defining, name, None)
    if function is None:
        raise RuntimeError(f"{defining.__name__} has no {name}; this transformers version moved it "
                           "(qapframe/transformers_internals.py is the one place to adapt)")
    return function


__all__ = ["between_layers", "cache_class", "create_causal_mask", "deepstack_encoder_output", "image_size_to_num_patches",
           "modeling_function", "pooled_encoder_output", "vision_window_index"]
