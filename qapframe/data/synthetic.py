"""qapframe's own seeded VQA benchmark: coloured shapes on a 3x3 grid, questions that need the image.

Every record is a pure function of ``(seed, split, index)``: the scene and question are drawn from a
`random.Random` seeded with that triple, so splits are fixed, reproducible and independent of the order
in which records are read. Question types: colour, shape, position, count, comparison; each in a
multiple-choice and a short-answer form.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from PIL import Image, ImageDraw
from pydantic import Field

from qapframe.data.base import DATASETS, DatasetLoader, VQADataset, VQARecord
from qapframe.strategy import StrategyConfig

if TYPE_CHECKING:
    import torch

IMAGE_SIZE = 64
BACKGROUND = (24, 24, 24)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
# Row-major 3x3 grid cells and the words a question uses for them.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
QUESTION_TYPES = ("colour", "shape", "position", "count", "comparison")
FORMS = ("multiple_choice", "short_answer")
SPLITS = ("train", "calibration", "test")
DEFAULT_SIZES = {"train": 50_000, "calibration": 256, "test": 1_000}
NUMBERS = ("0", "1", "2", "3", "4", "5")
MIN_OBJECTS, MAX_OBJECTS = 3, 5  # per scene


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    cell: int  # index into POSITIONS


def random_scene(rng: random.Random, min_objects: int = MIN_OBJECTS) -> list[SceneObject]:
    """``min_objects``-`MAX_OBJECTS` objects in distinct grid cells."""
    count = rng.randint(min_objects, MAX_OBJECTS)
    cells = rng.sample(range(len(POSITIONS)), count)
    return [SceneObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), cell) for cell in cells]


def render_scene(objects: list[SceneObject], rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the objects with a little jitter in size and placement (so a cell is not one fixed pixel set)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for obj in objects:
        row, col = divmod(obj.cell, 3)
        radius = cell * rng.uniform(0.28, 0.38)
        jitter = cell / 2 - radius - 1
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
        fill = COLOURS[obj.colour]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
    return image


def blank_image(size: int = IMAGE_SIZE) -> Image.Image:
    """The background alone: what a model sees when the image carries no information."""
    return Image.new("RGB", (size, size), BACKGROUND)


def _plural(shape: str) -> str:
    return shape + "s"


def _options(rng: random.Random, answer: str, pool: list[str], k: int) -> list[str]:
    """``answer`` plus ``k - 1`` distinct distractors from ``pool``, shuffled."""
    distractors = rng.sample([p for p in pool if p != answer], min(k - 1, len(pool) - 1))
    options = [answer, *distractors]
    rng.shuffle(options)
    return options


def _has_unique_object(objects: list[SceneObject]) -> bool:
    pairs = [(o.colour, o.shape) for o in objects]
    return any(pairs.count(p) == 1 for p in pairs)


def _ask(rng: random.Random, objects: list[SceneObject], qtype: str) -> tuple[str, str, list[str]]:
    """(question, answer, the answer's candidate pool) for one question type."""
    if qtype == "colour":
        obj = rng.choice(objects)
        return f"What colour is the object at the {POSITIONS[obj.cell]}?", obj.colour, list(COLOURS)
    if qtype == "shape":
        obj = rng.choice(objects)
        return f"What shape is the object at the {POSITIONS[obj.cell]}?", obj.shape, list(SHAPES)
    if qtype == "position":
        # Only objects whose colour-shape pair is unique in the scene have a well-defined position.
        pairs = [(o.colour, o.shape) for o in objects]
        unique = [o for o in objects if pairs.count((o.colour, o.shape)) == 1]
        obj = rng.choice(unique)
        return f"Where is the {obj.colour} {obj.shape}?", POSITIONS[obj.cell], list(POSITIONS)
    if qtype == "count":
        # Half the time ask about an attribute present in the scene so small counts are not all zeros.
        by_colour = rng.random() < 0.5
        present = [o.colour if by_colour else o.shape for o in objects]
        values = list(COLOURS) if by_colour else list(SHAPES)
        value = rng.choice(present) if rng.random() < 0.5 else rng.choice(values)
        n = present.count(value)
        question = f"How many {value} objects are there?" if by_colour else f"How many {_plural(value)} are there?"
        return question, str(n), list(NUMBERS)
    # comparison: prefer attribute pairs with unequal counts so "yes" and "no" are balanced.
    by_colour = rng.random() < 0.5
    present = [o.colour if by_colour else o.shape for o in objects]
    values = list(COLOURS) if by_colour else list(SHAPES)
    pairs = [(a, b) for a in values for b in values if a != b]
    unequal = [(a, b) for a, b in pairs if present.count(a) != present.count(b)]
    a, b = rng.choice(unequal or pairs)
    if by_colour:
        question = f"Are there more {a} objects than {b} objects?"
    else:
        question = f"Are there more {_plural(a)} than {_plural(b)}?"
    return question, "yes" if present.count(a) > present.count(b) else "no", ["yes", "no"]


def _question_record(rng: random.Random, objects: list[SceneObject], image: Image.Image, record_id: str) -> VQARecord:
    """A random question (type and form drawn from ``rng``) about the scene ``objects``."""
    qtype = rng.choice(QUESTION_TYPES)
    if qtype == "position" and not _has_unique_object(objects):
        qtype = "shape"  # no object is identified by its colour and shape alone
    form = rng.choice(FORMS)
    question, answer, pool = _ask(rng, objects, qtype)
    choices = _options(rng, answer, pool, 4) if form == "multiple_choice" else None
    return VQARecord(
        id=record_id,
        image=image,
        question=question,
        answer=answer,
        choices=choices,
        meta={"type": qtype, "form": form, "objects": [(o.colour, o.shape, POSITIONS[o.cell]) for o in objects]},
    )


def make_record(seed: int, split: str, index: int, min_objects: int = MIN_OBJECTS) -> VQARecord:
    """The record at ``index`` of ``split``: a pure function of its arguments.

    ``min_objects`` below `MIN_OBJECTS` draws simpler scenes (training curricula); the splits use the default.
    """
    if not 1 <= min_objects <= MAX_OBJECTS:
        raise ValueError(f"min_objects: must be in 1..{MAX_OBJECTS}, got {min_objects}")
    # String seeds hash through SHA-512 in `random.Random`, so nearby triples give unrelated streams.
    rng = random.Random(f"qapframe-synthetic:{seed}:{split}:{index}")
    objects = random_scene(rng, min_objects)
    image = render_scene(objects, rng)
    variant = "" if min_objects == MIN_OBJECTS else f"-min{min_objects}"  # ids stay unique across variants
    return _question_record(rng, objects, image, f"synthetic-{seed}-{split}-{index}{variant}")


def patch_cells(patch_size: int, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N]`` the grid cell (0-8, row-major) holding each ``patch_size`` patch's centre, patches row-major."""
    import torch

    side = image_size // patch_size
    cell_of = [min(2, int((i + 0.5) * patch_size * 3 // image_size)) for i in range(side)]
    return torch.tensor([cell_of[row] * 3 + cell_of[col] for row in range(side) for col in range(side)])


def cell_labels(records: Sequence[VQARecord]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(colour [B, 9], shape [B, 9])`` class ids per grid cell of each record's scene: 0 empty, 1 + index otherwise."""
    import torch

    colour = torch.zeros((len(records), len(POSITIONS)), dtype=torch.long)
    shape = torch.zeros_like(colour)
    for i, record in enumerate(records):
        for c, s, position in record.meta["objects"]:
            cell = POSITIONS.index(position)
            colour[i, cell] = 1 + list(COLOURS).index(c)
            shape[i, cell] = 1 + SHAPES.index(s)
    return colour, shape


class SyntheticVQA(VQADataset):
    """A fixed split of the synthetic benchmark; ``size=None`` uses the split's default size."""

    def __init__(self, split: str = "test", size: int | None = None, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"SyntheticVQA: unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if size is not None and size < 0:
            raise ValueError(f"SyntheticVQA: size must be >= 0 or None, got {size}")
        self.split = split
        self.seed = seed
        self.size = DEFAULT_SIZES[split] if size is None else size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> VQARecord:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticVQA({self.split!r}) index {index} out of range for size {self.size}")
        return make_record(self.seed, self.split, index)

    def __repr__(self) -> str:
        return f"SyntheticVQA(split={self.split!r}, size={self.size}, seed={self.seed})"


class SyntheticConfig(StrategyConfig):
    seed: int = Field(0, description="the benchmark's seed: another seed draws other records for every split")


@DATASETS.register("synthetic")
class SyntheticLoader(DatasetLoader):
    """qapframe's seeded benchmark (coloured shapes on a grid); splits train, calibration and test."""

    Config = SyntheticConfig

    def open(self, split: str, num_samples: int | None = None) -> SyntheticVQA:
        # The split's size is ``num_samples`` (its default size when None): records do not depend on it.
        return SyntheticVQA(split, size=num_samples, seed=self.config.seed)


__all__ = [
    "COLOURS",
    "FORMS",
    "MAX_OBJECTS",
    "MIN_OBJECTS",
    "POSITIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "SyntheticConfig",
    "SyntheticLoader",
    "SyntheticVQA",
    "blank_image",
    "cell_labels",
    "make_record",
    "patch_cells",
    "render_scene",
]
