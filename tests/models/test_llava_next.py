"""LLaVA-NeXT adapter on a tiny real `LlavaNextForConditionalGeneration` (anyres crops, newline tokens)."""

import pytest
import torch

from qapframe.models import adapter_for
from qapframe.models.llava_next import LlavaNextAdapter
from qapframe.strategies.base import PRUNERS, SCORERS
from tests.tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, llava_next_inputs, tiny_llava_next


@pytest.fixture(autouse=True)
def _inference_only():
    """No autograd in this module's tests (a module-level switch would leak into every later test)."""
    with torch.no_grad():
        yield


NEW = 5
SIZES = [(32, 64), (64, 64), (30, 50)]  # different grids -> different token counts per image


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next(seed=0, num_layers=3)


@pytest.fixture(scope="module")
def inputs(model):
    return llava_next_inputs(model, SIZES, [4, 7, 2], seed=2)


def gen(model, **inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def install(model, scorer, pruner="topk", **kw):
    return adapter_for(model).install(model, SCORERS.get(scorer[0])(**scorer[1]), PRUNERS.get(pruner)(**kw))


CASES = [("visionzip", {}), ("hybrid", {}), ("fastv", {"k": 2})]


def test_adapter_is_picked_by_matches(model):
    assert isinstance(adapter_for(model), LlavaNextAdapter)


@pytest.mark.parametrize("scorer", CASES, ids=lambda s: s[0])
def test_full_retention_is_identical(model, inputs, scorer):
    ref_logits, ref_tokens = model(**inputs).logits, gen(model, **inputs)
    install(model, scorer, retention=1.0)
    try:
        logits, tokens = model(**inputs).logits, gen(model, **inputs)
    finally:
        LlavaNextAdapter().remove(model)
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)


def test_newlines_are_kept_and_budget_counts_patches(model, inputs):
    install(model, ("visionzip", {}), retention=0.25)
    try:
        model(**inputs)
        images = model.qapframe_installation.latest_images
        selections = model.qapframe_last_selection["selections"]
    finally:
        LlavaNextAdapter().remove(model)
    newline = model.model.image_newline
    for image, sel in zip(images, selections):
        is_newline = (image.features == newline).all(-1)
        assert torch.equal(is_newline, ~image.prunable)  # structural tokens are exactly the newlines
        patches = int(image.prunable.sum())
        assert sel.keep_index.numel() == round(0.25 * patches) + int(is_newline.sum())
        assert is_newline[sel.keep_index].sum() == is_newline.sum()
        assert (sel.keep_index.diff() > 0).all()


def test_cls_attention_of_base_crop_matches_eager(inputs):
    sdpa, eager = tiny_llava_next(seed=0), tiny_llava_next(seed=0, attn_implementation="eager")
    install(sdpa, ("visionzip", {}), retention=0.5)
    sdpa(**inputs)
    images = sdpa.qapframe_installation.latest_images
    LlavaNextAdapter().remove(sdpa)
    base_crops = inputs["pixel_values"][:, 0]  # each image's first crop is its base (resized) view
    out = eager.model.vision_tower(base_crops, output_attentions=True)
    expected = out.attentions[len(out.attentions) - 2][:, :, 0, 1:].mean(dim=1)  # [3, 16]
    got = torch.stack([im.cls_attention[:16] for im in images])  # packed: base crop tokens come first
    assert (got - expected).abs().max() <= 1e-5


def reference_generate(model, inputs, selections):
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    kept = [sel.tokens(f) for sel, f in zip(selections, features)]
    rows = []
    for ids, mask, k in zip(inputs["input_ids"], inputs["attention_mask"], kept):
        ids = ids[mask.bool()]
        image = (ids == IMAGE_TOKEN_ID).nonzero().squeeze(-1)
        rows.append(torch.cat([ids[: image[0]], torch.full((k.shape[0],), IMAGE_TOKEN_ID), ids[image[-1] + 1 :]]))
    width = max(len(r) for r in rows)
    short, mask = torch.full((len(rows), width), PAD_TOKEN_ID), torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        short[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    embeds = model.get_input_embeddings()(short).masked_scatter((short == IMAGE_TOKEN_ID)[..., None], torch.cat(kept))
    return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("scorer,pruner", [(("hybrid", {}), "topk"), (("visionzip", {}), "visionzip")])
def test_pruned_generate_equals_kept_tokens_reference(model, inputs, scorer, pruner):
    install(model, scorer, pruner, retention=0.25)
    try:
        tokens = gen(model, **inputs)
        selections = model.qapframe_last_selection["selections"]
    finally:
        LlavaNextAdapter().remove(model)
    assert len({s.num_tokens for s in selections}) > 1  # rows shrink by different amounts
    length = inputs["input_ids"].shape[1]
    assert torch.equal(tokens[:, length:], reference_generate(model, inputs, selections))


@pytest.mark.parametrize("scorer", [("hybrid", {}), ("fastv", {"k": 2})], ids=lambda s: s[0])
def test_batch_equals_single_runs(model, inputs, scorer):
    install(model, scorer, retention=0.5)
    try:
        batch = gen(model, **inputs)
        for i in range(3):
            mask = inputs["attention_mask"][i].bool()
            single = {
                "input_ids": inputs["input_ids"][i : i + 1, mask],
                "attention_mask": inputs["attention_mask"][i : i + 1, mask],
                "pixel_values": inputs["pixel_values"][i : i + 1],
                "image_sizes": inputs["image_sizes"][i : i + 1],
            }
            assert torch.equal(gen(model, **single)[0, -NEW:], batch[i, -NEW:])
    finally:
        LlavaNextAdapter().remove(model)



def test_layout_is_the_base_crop_then_the_unpadded_grid_as_the_model_packs_them(model, inputs):
    """Each image's pieces against the model's own packing of every token's (crop, row, col): along a layout
    row the tokens are horizontal neighbours in the image, down a layout column vertical ones."""
    from qapframe.transformers_internals import image_size_to_num_patches

    install(model, ("l2norm", {}), "mustdrop_merge", retention=0.5)
    try:
        model(**inputs)
        units = model.qapframe_last_selection["units"]
    finally:
        LlavaNextAdapter().remove(model)
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    for unit, size in zip(units, inputs["image_sizes"].tolist()):
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        channel = torch.stack([torch.stack([torch.full((side, side), c), rows, cols], -1).view(side * side, 3)
                               for c in range(crops)]).float()  # [C, S, 3]: crop, row, col of every token
        packed, _ = model.model.pack_image_features(
            [channel], [size], vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_newline=torch.full((3,), -1.0),
        )
        tokens = packed[0][packed[0][:, 0] >= 0].long()  # [P, 3], newlines dropped
        (base_rows, base_cols), (grid_rows, grid_cols) = unit.layout
        assert (base_rows, base_cols) == (side, side) and (tokens[: side * side, 0] == 0).all()  # the base crop first
        assert grid_rows * grid_cols == tokens.shape[0] - side * side
        grid = tokens[side * side :].view(grid_rows, grid_cols, 3)

        def neighbours(a, b, along, across):  # b is the next token after a along one image axis
            same_line = a[..., across] == b[..., across]
            step = (a[..., 0] == b[..., 0]) & (b[..., along] == a[..., along] + 1)
            crossing = (a[..., 0] != b[..., 0]) & (a[..., along] == side - 1) & (b[..., along] == 0)
            return bool((same_line & (step | crossing)).all())

        assert neighbours(grid[:, :-1], grid[:, 1:], along=2, across=1)  # rightwards: same patch row
        assert neighbours(grid[:-1], grid[1:], along=1, across=2)  # downwards: same patch column


def test_anyres_layout_reads_the_packing_or_says_none():
    from qapframe.models.pruning import anyres_layout

    def mask(base, rows, cols, newline_after_base=False):
        parts = [torch.ones(base, dtype=torch.bool)] + [torch.zeros(1, dtype=torch.bool)] * newline_after_base
        parts += [torch.cat([torch.ones(cols, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)])] * rows
        return torch.cat(parts)

    assert anyres_layout(mask(16, 3, 5), 16) == ((4, 4), (3, 5))
    assert anyres_layout(mask(16, 0, 0, newline_after_base=True), 16) == ((4, 4),)  # the base view alone
    assert anyres_layout(mask(16, 3, 5), 17) is None  # a kept [CLS]: the crop is not a square
    assert anyres_layout(mask(16, 3, 5, newline_after_base=True), 16) is None  # not this packing
    uneven = torch.cat([torch.ones(16, dtype=torch.bool), mask(0, 1, 5), mask(0, 1, 4)])
    assert anyres_layout(uneven, 16) is None
