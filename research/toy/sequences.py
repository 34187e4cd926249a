"""The layout of a training row: prompt tokens, projected vision tokens where ``<image>`` is, then the rest.

Training builds ``inputs_embeds`` itself (to drop vision tokens, or to put ideal scene tokens in place of
real ones), with exactly the layout the LLaVA processor gives; evaluation goes through qapframe's own path
(`qapframe.eval.evaluation.answer_records`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from qapframe.data.base import VQARecord
from qapframe.data.prompts import build_prompt


def processor_inputs(processor, records: Sequence[VQARecord]):
    """The batch a user feeds the model: the records' prompts and images, left-padded."""
    return processor(images=[r.image for r in records], text=[build_prompt(r) for r in records], return_tensors="pt",
                     padding=True)


def split_at_image(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` before and after its single image placeholder (``<s>`` included before)."""
    ids = tokenizer(prompt)["input_ids"]
    cut = ids.index(tokenizer.convert_tokens_to_ids("<image>"))
    return ids[:cut], ids[cut + 1 :]


def prompt_ids(tokenizer, record: VQARecord) -> tuple[list[int], list[int]]:
    """`split_at_image` of the record's prompt."""
    return split_at_image(tokenizer, build_prompt(record))


def sequence_embeds(model, rows: list[tuple[list[int], torch.Tensor, list[int]]], pad_left: bool):
    """Pack ``(ids_before, vision [K, D], ids_after)`` rows into ``(inputs_embeds [B, L, D], attention_mask [B, L])``."""
    embed = model.get_input_embeddings()
    pieces = []
    for before, vision, after in rows:
        ids_b = torch.tensor(before, device=vision.device)
        ids_a = torch.tensor(after, device=vision.device)
        pieces.append(torch.cat([embed(ids_b), vision.to(embed.weight.dtype), embed(ids_a)]))  # [L_i, D]
    width = max(p.shape[0] for p in pieces)
    dim = pieces[0].shape[1]
    embeds = pieces[0].new_zeros(len(pieces), width, dim)
    mask = torch.zeros(len(pieces), width, dtype=torch.long, device=embeds.device)
    for i, p in enumerate(pieces):
        sl = slice(width - p.shape[0], width) if pad_left else slice(0, p.shape[0])
        embeds[i, sl] = p
        mask[i, sl] = 1
    return embeds, mask


def vision_tokens(model, processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Projected vision tokens ``[B, N, D]`` exactly as LLaVA feeds them to the LLM."""
    pixels = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    pixels = pixels.to(model.device, model.dtype)
    cfg = model.config
    feats = model.model.get_image_features(
        pixel_values=pixels,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    ).pooler_output
    return torch.stack(list(feats))


__all__ = ["processor_inputs", "prompt_ids", "sequence_embeds", "split_at_image", "vision_tokens"]
