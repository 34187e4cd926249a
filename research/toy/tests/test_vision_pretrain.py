"""Stage 0 of the toy's training: cell pooling and labels agree with the scene, and the stage learns."""

import torch

from qapframe.data.synthetic import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, make_record
from research.toy.model import NUM_VISION_TOKENS, PATCH_SIZE, build_model, build_processor
from research.toy.vision_pretrain import RECORD_OFFSET, cell_labels, cell_pooling, patch_cells, patch_features, pretrain_vision


def test_each_cell_holds_the_patches_whose_centres_lie_in_it():
    cells = patch_cells()
    assert cells.shape == (NUM_VISION_TOKENS,)
    side = IMAGE_SIZE // PATCH_SIZE
    cell_width = IMAGE_SIZE / 3
    for patch in range(NUM_VISION_TOKENS):
        row, col = divmod(patch, side)
        y, x = (row + 0.5) * PATCH_SIZE, (col + 0.5) * PATCH_SIZE
        assert cells[patch].item() == int(y // cell_width) * 3 + int(x // cell_width)
    # the toy's geometry (64-pixel images, 8-pixel patches): 3x3, 3x2 and 2x2 patch blocks
    assert patch_cells(image_size=64, patch_size=8).bincount().tolist() == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    assert patch_cells(image_size=48, patch_size=8).bincount().tolist() == [4] * 9


def test_cell_pooling_is_the_plain_mean_of_each_cells_patches():
    cells = patch_cells()
    pool = cell_pooling(cells)
    features = torch.randn(2, NUM_VISION_TOKENS, 5, dtype=torch.float64)
    pooled = pool.double() @ features
    for cell in range(len(POSITIONS)):
        torch.testing.assert_close(pooled[:, cell], features[:, cells == cell].mean(dim=1))


def test_cell_labels_name_each_object_at_its_cell_and_leave_the_rest_empty():
    records = [make_record(0, "train", i) for i in range(20)]
    colour, shape = cell_labels(records)
    for i, record in enumerate(records):
        occupied = {POSITIONS.index(p): (c, s) for c, s, p in record.meta["objects"]}
        for cell in range(len(POSITIONS)):
            if cell in occupied:
                c, s = occupied[cell]
                assert (colour[i, cell].item(), shape[i, cell].item()) == (1 + list(COLOURS).index(c),
                                                                           1 + list(SHAPES).index(s))
            else:
                assert colour[i, cell].item() == 0 and shape[i, cell].item() == 0


def test_patch_features_are_the_layer_llava_projects():
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0).eval()
    pixels = processor.image_processor([make_record(0, "test", i).image for i in range(2)],
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = patch_features(model, pixels)
        llava = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output
        projected = model.model.multi_modal_projector(ours)
    torch.testing.assert_close(projected, torch.stack(list(llava)))


def _pretrain(steps: int) -> tuple[dict, set[str], list]:
    """A fresh toy's stage 0 (batches of 16): its stats, the parameters it changed, and its last batch."""
    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stats = pretrain_vision(model, processor, steps=steps, batch_size=16, lr=2e-3, data_seed=0, log_every=steps)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    last_batch = [make_record(0, "train", RECORD_OFFSET + (steps - 1) * 16 + i) for i in range(16)]
    return stats, changed, last_batch


def test_pretraining_changes_only_the_vision_tower_and_learns_cell_colours():
    stats, changed, _ = _pretrain(40)
    assert changed and all(name.startswith("model.vision_tower.") for name in changed)
    # layers up to the projected one (-2 of 4) learn; the last layer feeds nothing and stays as initialised
    assert any(".encoder.layers.2." in name for name in changed)
    assert not any(".encoder.layers.3." in name for name in changed)
    # 40 small steps already beat always answering "empty" (4-6 of the 9 cells are empty)
    assert stats["cell_colour_accuracy"] > 0.7 and stats["patch_cell_accuracy"] > 0.5


def test_patch_labels_teach_every_patch_its_cells_content():
    """The shared head also reads each patch alone; its per-patch accuracy is reported and beats answering
    "empty" everywhere (the majority of patches lie in empty cells)."""
    stats, changed, last_batch = _pretrain(40)
    assert changed and all(name.startswith("model.vision_tower.") for name in changed)
    _, shape = cell_labels(last_batch)
    empty_share = (shape[:, patch_cells()] == 0).float().mean().item()
    assert stats["patch_shape_accuracy"] > empty_share
