"""Stage 0 of the toy's training: pretrain the CLIP vision tower to recognise what sits in each grid cell.

Real LLaVA starts from a pretrained CLIP encoder; trained from scratch through the LLM alone, the toy's
tower learned shapes so slowly that 46 minutes gave 49% test accuracy. This stage stands in for CLIP
pretraining: a temporary linear head reads the mean of the patch features (from the layer LLaVA feeds
the projector) over each 3x3 grid cell and predicts that cell's colour and shape (or "empty"), and a
second one predicts from each patch feature alone which cell the patch lies in, so that a token keeps
its place in its content as real CLIP features do (pooling by cell needs no position in the features).
Optional per-patch targets (`pretrain_vision`'s options, training experiments in the README) ask more of
each token alone. It is cheap (vision tower only, no LLM); the heads are discarded, only the tower's
weights carry over.
"""

from __future__ import annotations

import math
import time

import torch

from qapframe.data.synthetic import COLOURS, IMAGE_SIZE, MAX_OBJECTS, POSITIONS, SHAPES, make_record
from qapframe.toy.model import PATCH_SIZE

# Stage-0 images come from their own index range of the train split, apart from stage 1's records.
RECORD_OFFSET = 10_000_000
EMPTY = 0  # class 0 of both heads: no object in the cell


def patch_cells(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """``[N]`` the grid cell holding each patch's centre, patches in row-major order."""
    side = image_size // patch_size
    cell_of = [min(2, int((i + 0.5) * patch_size * 3 // image_size)) for i in range(side)]
    return torch.tensor([cell_of[row] * 3 + cell_of[col] for row in range(side) for col in range(side)])


def cell_centre_patches(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """``[9]`` per grid cell, the patch whose centre lies nearest the cell's centre (ties: the first, row-major)."""
    side = image_size // patch_size

    def distance(patch: int, cell: int) -> float:  # along one axis, between the two centres
        return abs((patch + 0.5) * patch_size - (cell + 0.5) * image_size / 3)

    nearest = [min(range(side), key=lambda patch: distance(patch, cell)) for cell in range(3)]
    return torch.tensor([nearest[row] * side + nearest[col] for row in range(3) for col in range(3)])


def off_centre_patches(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """``[N]`` bool, row-major: True for every patch that is not its cell's centre patch (`cell_centre_patches`)."""
    off_centre = torch.ones((image_size // patch_size) ** 2, dtype=torch.bool)
    off_centre[cell_centre_patches(image_size, patch_size)] = False
    return off_centre


def cell_pooling(cells: torch.Tensor) -> torch.Tensor:
    """``[9, N]`` row-stochastic matrix: row c averages the patches of grid cell c."""
    pool = torch.nn.functional.one_hot(cells, len(POSITIONS)).T.float()
    return pool / pool.sum(dim=1, keepdim=True)


def cell_labels(records) -> tuple[torch.Tensor, torch.Tensor]:
    """``(colour [B, 9], shape [B, 9])`` class ids per grid cell; 0 is empty, 1 + index otherwise."""
    colours, shapes = list(COLOURS), list(SHAPES)
    colour = torch.full((len(records), len(POSITIONS)), EMPTY, dtype=torch.long)
    shape = torch.full_like(colour, EMPTY)
    for i, record in enumerate(records):
        for c, s, position in record.meta["objects"]:
            cell = POSITIONS.index(position)
            colour[i, cell] = 1 + colours.index(c)
            shape[i, cell] = 1 + shapes.index(s)
    return colour, shape


def scene_counts(records) -> torch.Tensor:
    """``[B, C + S]`` how many objects of each colour, then of each shape, each scene holds."""
    rows = []
    for record in records:
        objects = record.meta["objects"]
        rows.append([sum(o[0] == c for o in objects) for c in COLOURS] + [sum(o[1] == s for o in objects) for s in SHAPES])
    return torch.tensor(rows)


def cell_shared_counts(records) -> tuple[torch.Tensor, torch.Tensor]:
    """``(same_colour [B, 9], same_shape [B, 9])``: how many objects share the cell's colour / shape (0: empty)."""
    same_colour = torch.zeros((len(records), len(POSITIONS)), dtype=torch.long)
    same_shape = torch.zeros_like(same_colour)
    for i, record in enumerate(records):
        objects = record.meta["objects"]
        for c, s, position in objects:
            cell = POSITIONS.index(position)
            same_colour[i, cell] = sum(o[0] == c for o in objects)
            same_shape[i, cell] = sum(o[1] == s for o in objects)
    return same_colour, same_shape


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
                    log_every: int = 50, patch_labels: bool = False, patch_scene_counts: bool = False,
                    patch_shared_counts: bool = False) -> dict[str, float]:
    """Train ``model``'s vision tower in place; returns the last batch's cell accuracies and the time taken.

    ``patch_labels``: the same colour/shape head must also read every patch alone, so that one token names
    what occupies its cell (a key that attention can search by attributes), not only the cell's mean.
    ``patch_scene_counts``: every patch must also say how many objects of each colour and each shape the
    whole scene holds, standing in for the image-level information real CLIP patch tokens also carry (a
    count then reads off any one token instead of an attention-weighted sum of patch masses).
    ``patch_shared_counts``: every patch must also say how many objects share its cell's colour and how many
    its cell's shape, so that "how many red objects" is a lookup (attend to a red token, read its count), the
    kind of question the toy's LLM learns, instead of a question-gated read of nine counts.
    """
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    n_colour, n_shape = 1 + len(COLOURS), 1 + len(SHAPES)
    head = torch.nn.Linear(width, n_colour + n_shape)
    position_head = torch.nn.Linear(width, len(POSITIONS))
    params = [*tower.parameters(), *head.parameters(), *position_head.parameters()]
    n_counts, n_values = len(COLOURS) + len(SHAPES), MAX_OBJECTS + 1
    if patch_scene_counts:  # built only when used, so runs without it draw the same random numbers as before
        count_head = torch.nn.Linear(width, n_counts * n_values)
        params += count_head.parameters()
    if patch_shared_counts:
        shared_head = torch.nn.Linear(width, 2 * n_values)
        params += shared_head.parameters()
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
        if patch_labels:
            patch_logits = head(features)  # [B, N, n_colour + n_shape]
            patch_colour, patch_shape = colour[:, cells], shape[:, cells]  # each patch: its cell's labels
            loss = loss + ce(patch_logits[..., :n_colour].reshape(-1, n_colour), patch_colour.reshape(-1)) + \
                ce(patch_logits[..., n_colour:].reshape(-1, n_shape), patch_shape.reshape(-1))
        if patch_scene_counts:
            count_logits = count_head(features).reshape(len(records), -1, n_counts, n_values)  # [B, N, C + S, V]
            counts = scene_counts(records)[:, None].expand(-1, count_logits.shape[1], -1)  # [B, N, C + S]
            loss = loss + ce(count_logits.reshape(-1, n_values), counts.reshape(-1))
        if patch_shared_counts:
            shared_logits = shared_head(features).reshape(len(records), -1, 2, n_values)  # [B, N, 2, V]
            shared = torch.stack(cell_shared_counts(records), dim=-1)[:, cells]  # [B, N, 2]: each patch its cell's
            loss = loss + ce(shared_logits.reshape(-1, n_values), shared.reshape(-1))
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
            }
            if patch_labels:
                stats["patch_shape_accuracy"] = round(
                    (patch_logits[..., n_colour:].argmax(-1) == patch_shape).float().mean().item(), 4)
            if patch_scene_counts:
                stats["patch_count_accuracy"] = round((count_logits.argmax(-1) == counts).float().mean().item(), 4)
            if patch_shared_counts:
                stats["patch_shared_count_accuracy"] = round(
                    (shared_logits.argmax(-1) == shared).float().mean().item(), 4)
            print(f"vision step {step + 1:4d}  {stats}  {time.time() - start:5.0f}s", flush=True)
    stats["vision_seconds"] = round(time.time() - start, 1)
    return stats


__all__ = ["cell_centre_patches", "cell_labels", "cell_pooling", "cell_shared_counts", "off_centre_patches", "patch_cells",
           "patch_features", "pretrain_vision", "pretraining_batches", "scene_counts"]
