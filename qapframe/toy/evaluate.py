"""Answering VQA records with the toy, through the processor or with a chosen subset of vision tokens.

`answer` is the path every user takes (processor -> ``generate``). `answer_with_tokens` builds
``inputs_embeds`` itself so that training and the degeneracy check can drop vision tokens without a
pruning adapter; `sequence_embeds` is shared with training so both see exactly the same layout.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image

from qapframe.data.base import VQARecord
from qapframe.data.prompts import build_prompt, is_correct

# keep-index selector: projected vision tokens [B, N, D] -> kept indices [B, K], ascending
Selector = Callable[[torch.Tensor], torch.Tensor]


def processor_inputs(processor, records: Sequence[VQARecord], images: Sequence[Image.Image] | None = None):
    """The batch a user feeds the model: prompts and images (the records' unless ``images``), left-padded."""
    images = [r.image for r in records] if images is None else list(images)
    return processor(images=images, text=[build_prompt(r) for r in records], return_tensors="pt", padding=True)


@torch.no_grad()
def answer(model, processor, records: Sequence[VQARecord], batch_size: int = 32, max_new_tokens: int = 6,
           images: Sequence[Image.Image] | None = None) -> list[str]:
    """Greedy answers through ``processor`` and ``model.generate``; ``images`` overrides the records' images."""
    out: list[str] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        imgs = None if images is None else images[start : start + batch_size]
        inputs = processor_inputs(processor, batch, imgs).to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = generated[:, inputs["input_ids"].shape[1] :]  # [B, T_new]
        out.extend(processor.tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def accuracy(predictions: Sequence[str], records: Sequence[VQARecord]) -> float:
    return sum(is_correct(p, r) for p, r in zip(predictions, records)) / max(1, len(records))


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


@torch.no_grad()
def answer_with_tokens(model, processor, records: Sequence[VQARecord], select: Selector | None,
                       batch_size: int = 32, max_new_tokens: int = 6) -> list[str]:
    """Greedy answers when only the vision tokens chosen by ``select`` reach the LLM (None keeps all)."""
    tokenizer = processor.tokenizer
    out: list[str] = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        vision = vision_tokens(model, processor, [r.image for r in batch])  # [B, N, D]
        if select is not None:
            keep = select(vision)  # [B, K]
            vision = torch.gather(vision, 1, keep.unsqueeze(-1).expand(-1, -1, vision.shape[-1]))
        rows = []
        for record, tokens in zip(batch, vision):
            before, after = prompt_ids(tokenizer, record)
            rows.append((before, tokens, after))
        embeds, mask = sequence_embeds(model, rows, pad_left=True)
        generated = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False)
        out.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
    return out


def random_selector(retention: float, seed: int) -> Selector:
    """Keep a random ``retention`` fraction of tokens per image (at least one), in original order."""
    generator = torch.Generator().manual_seed(seed)

    def select(vision: torch.Tensor) -> torch.Tensor:
        b, n, _ = vision.shape
        k = max(1, round(retention * n))
        order = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :k]
        return order.sort(dim=1).values.to(vision.device)

    return select


def l2norm_selector(retention: float) -> Selector:
    """Keep the ``retention`` fraction of tokens with the largest L2 norm, in original order."""

    def select(vision: torch.Tensor) -> torch.Tensor:
        k = max(1, round(retention * vision.shape[1]))
        return vision.float().norm(dim=-1).topk(k, dim=1).indices.sort(dim=1).values

    return select


__all__ = ["accuracy", "answer", "answer_with_tokens", "l2norm_selector", "processor_inputs", "random_selector",
           "sequence_embeds", "split_at_image", "vision_tokens"]
