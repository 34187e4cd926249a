"""Stage 0b of the toy's training: pretrain the projector to hand the LLM clean, symbolic-like tokens.

Why: on ideal scene tokens (`research/toy/llm_symbolic.py`, each the sum of a vector for its place, its
colour and its shape) the toy's LLM learns search and counting; the real tokens are far from that layout:
a least-squares sum of such vectors reproduces only 57 % of the variance of the shipped toy's projected tokens
(`research/toy/probes.py`), the rest being detail of the patch that no question asks about. This stage
trains the projector alone, tower frozen, to map every patch feature onto the sum of fixed random codes of
its cell's place, colour and shape: the LLM then starts from tokens laid out like the ideal ones (on ideal
scenes, fixed random codes teach the LLM as fast as learned ones), and stage 1 goes on training the projector
with the LLM. The codes are discarded.
"""

from __future__ import annotations

import time

import torch

from qapframe.data.synthetic import COLOURS, POSITIONS, SHAPES
from research.toy.vision_pretrain import cell_labels, patch_cells, patch_features, pretraining_batches

# Stage-0b images come from their own index range of the train split, apart from stages 0 and 1 and the probes.
RECORD_OFFSET = 30_000_000


def symbolic_codes(width: int, seed: int, std: float = 1.0) -> dict[str, torch.Tensor]:
    """Fixed random codes ``place [9, W]``, ``colour [1 + C, W]``, ``shape [1 + S, W]`` (row 0: empty)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {"place": len(POSITIONS), "colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES)}
    return {name: torch.randn(rows, width, generator=generator) * std for name, rows in sizes.items()}


def target_tokens(records, cells: torch.Tensor, codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, N, W]``: each patch's target, the codes of its cell's place, colour and shape summed."""
    colour, shape = cell_labels(records)  # [B, 9]
    patch_colour, patch_shape = colour[:, cells], shape[:, cells]  # [B, N]
    return codes["place"][cells] + codes["colour"][patch_colour] + codes["shape"][patch_shape]


@torch.enable_grad()  # training, whatever grad mode the caller left on
def pretrain_projector(model, processor, steps: int, batch_size: int, lr: float, data_seed: int, seed: int,
                       log_every: int = 50) -> dict[str, float]:
    """Train ``model``'s projector in place (tower frozen); returns the last batch's fit and the time taken.

    ``projector_r2``: the fraction of the target tokens' variance that the projected tokens reproduce.
    """
    projector = model.model.multi_modal_projector
    codes = symbolic_codes(model.config.text_config.hidden_size, seed)
    params = list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sizes = model.config.vision_config.image_size, model.config.vision_config.patch_size
    cells = patch_cells(*sizes)
    start = time.time()
    stats: dict[str, float] = {}
    for step, records, pixels in pretraining_batches(processor, optimizer, lr, steps, batch_size, data_seed,
                                                     RECORD_OFFSET):
        with torch.no_grad():
            features = patch_features(model, pixels)  # [B, N, D_vision]
        target = target_tokens(records, cells, codes)
        tokens = projector(features)  # [B, N, W]
        loss = torch.nn.functional.mse_loss(tokens, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            variance = (target - target.mean(dim=(0, 1))).pow(2).mean()
            stats = {"projector_loss": round(loss.item(), 5),
                     "projector_r2": round(1 - loss.item() / variance.item(), 4)}
            print(f"projector step {step + 1:4d}  {stats}  {time.time() - start:5.0f}s", flush=True)
    stats["projector_seconds"] = round(time.time() - start, 1)
    return stats


__all__ = ["pretrain_projector", "symbolic_codes", "target_tokens"]
