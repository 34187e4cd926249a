"""Stage 0 of the toy's training: pretrain the CLIP vision tower to recognise what sits in each grid cell.

Real LLaVA starts from a pretrained CLIP encoder; trained from scratch through the LLM alone, the toy's
tower learned shapes so slowly that 46 minutes gave 49% test accuracy. This stage stands in for CLIP
pretraining: a temporary linear head reads the mean of the patch features (from the layer LLaVA feeds
the projector) over each 3x3 grid cell and predicts that cell's colour and shape (or "empty"), and a
second one predicts from each patch feature alone which cell the patch lies in, so that a token keeps
its place in its content as real CLIP features do (pooling by cell needs no position in the features).
The colour/shape head also reads every patch alone, so that one token names what occupies its cell
(a key attention can search by attributes). It is cheap (vision tower only, no LLM); the heads are discarded, only the tower's
weights carry over.
"""

from __future__ import annotations

import math
import time

import torch

from qapframe.data.synthetic import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, cell_labels, make_record
from qapframe.data.synthetic import patch_cells as grid_cells
from research.toy.model import PATCH_SIZE

# Stage-0 images come from their own index range of the train split, apart from stage 1's records.
RECORD_OFFSET = 10_000_000
EMPTY = 0  # class 0 of both heads: no object in the cell


def patch_cells(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """``[N]`` the grid cell holding each patch's centre, patches in row-major order (the toy's patches by default)."""
    return grid_cells(patch_size, image_size)


def cell_pooling(cells: torch.Tensor) -> torch.Tensor:
    """``[9, N]`` row-stochastic matrix: row c averages the patches of grid cell c."""
    pool = torch.nn.functional.one_hot(cells, len(POSITIONS)).T.float()
    return pool / pool.sum(dim=1, keepdim=True)


def pretraining_batches(processor, optimizer, lr: float, steps: int, batch_size: int, data_seed: int, offset: int):
    """Yield ``(step, records, pixel_values)`` for each pretraining step, after setting ``optimizer``'s learning
    rate (linear warm-up over the first tenth of the steps, then cosine decay); the images are train-split records
    from index ``offset`` on, so that each pretraining stage draws its own."""
    warmup = max(1, steps // 10)
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        records = [make_record(data_seed, "train", offset + step * batch_size + i) for i in range(batch_size)]
        yield step, records, processor.image_processor([r.image for r in records], return_tensors="pt")["pixel_values"]


def patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Patch features ``[B, N, D]`` of the layer LLaVA projects (``vision_feature_layer``), CLS dropped."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


@torch.enable_grad()  # training, whatever grad mode the caller left on
def pretrain_vision(model, processor, steps: int, batch_size: int, lr: float, data_seed: int,
                    log_every: int = 50) -> dict[str, float]:
    """Train ``model``'s vision tower in place; returns the last batch's cell accuracies and the time taken."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    n_colour, n_shape = 1 + len(COLOURS), 1 + len(SHAPES)
    head = torch.nn.Linear(width, n_colour + n_shape)
    position_head = torch.nn.Linear(width, len(POSITIONS))
    params = [*tower.parameters(), *head.parameters(), *position_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    cells = patch_cells()
    pool = cell_pooling(cells)
    start = time.time()
    stats: dict[str, float] = {}
    ce = torch.nn.functional.cross_entropy
    for step, records, pixels in pretraining_batches(processor, optimizer, lr, steps, batch_size, data_seed,
                                                     RECORD_OFFSET):
        features = patch_features(model, pixels)  # [B, N, D]
        logits = head(pool @ features)  # [B, 9, n_colour + n_shape]
        position_logits = position_head(features)  # [B, N, 9]
        colour, shape = cell_labels(records)
        colour_logits, shape_logits = logits[..., :n_colour], logits[..., n_colour:]
        loss = ce(colour_logits.reshape(-1, n_colour), colour.reshape(-1)) + \
            ce(shape_logits.reshape(-1, n_shape), shape.reshape(-1)) + \
            ce(position_logits.reshape(-1, len(POSITIONS)), cells.repeat(len(records)))
        patch_logits = head(features)  # [B, N, n_colour + n_shape]: every patch alone names its cell's content
        patch_colour, patch_shape = colour[:, cells], shape[:, cells]  # each patch: its cell's labels
        loss = loss + ce(patch_logits[..., :n_colour].reshape(-1, n_colour), patch_colour.reshape(-1)) + \
            ce(patch_logits[..., n_colour:].reshape(-1, n_shape), patch_shape.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            stats = {
                "vision_loss": round(loss.item(), 5),
                "cell_colour_accuracy": round((colour_logits.argmax(-1) == colour).float().mean().item(), 4),
                "cell_shape_accuracy": round((shape_logits.argmax(-1) == shape).float().mean().item(), 4),
                "patch_cell_accuracy": round((position_logits.argmax(-1) == cells).float().mean().item(), 4),
                "patch_shape_accuracy": round(
                    (patch_logits[..., n_colour:].argmax(-1) == patch_shape).float().mean().item(), 4),
            }
            print(f"vision step {step + 1:4d}  {stats}  {time.time() - start:5.0f}s", flush=True)
    stats["vision_seconds"] = round(time.time() - start, 1)
    return stats


__all__ = ["cell_labels", "cell_pooling", "patch_cells", "patch_features", "pretrain_vision", "pretraining_batches"]
