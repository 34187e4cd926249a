"""Stage 0b of the toy's training: the projector learns to lay each patch out as its cell's symbolic code."""

import json

import torch
from safetensors.torch import load_file

from qapframe.data.synthetic import COLOURS, POSITIONS, SHAPES, make_record
from research.toy.model import NUM_VISION_TOKENS, build_model, build_processor
from research.toy.projector_pretrain import RECORD_OFFSET, pretrain_projector, symbolic_codes, target_tokens
from research.toy.train import main
from research.toy.vision_pretrain import patch_cells, patch_features


def test_codes_are_seeded_unit_scale_tables_with_an_empty_row():
    codes = symbolic_codes(192, seed=3)
    assert {name: tuple(c.shape) for name, c in codes.items()} == {
        "place": (len(POSITIONS), 192), "colour": (1 + len(COLOURS), 192), "shape": (1 + len(SHAPES), 192)}
    assert all(torch.equal(codes[k], symbolic_codes(192, seed=3)[k]) for k in codes)
    assert not torch.equal(codes["place"], symbolic_codes(192, seed=4)["place"])
    assert abs(torch.cat(list(codes.values())).std().item() - 1.0) < 0.05


def test_each_patch_target_is_its_cells_place_colour_and_shape_codes_summed():
    codes = symbolic_codes(16, seed=0)
    records = [make_record(0, "train", i) for i in range(3)]
    cells = patch_cells()
    targets = target_tokens(records, cells, codes)
    assert targets.shape == (3, NUM_VISION_TOKENS, 16)
    for record, target in zip(records, targets):  # reference: walk the scene's objects
        occupant = {POSITIONS.index(p): (c, s) for c, s, p in record.meta["objects"]}
        for patch, cell in enumerate(cells.tolist()):
            colour, shape = occupant.get(cell, (None, None))
            colour_row = 0 if colour is None else 1 + list(COLOURS).index(colour)
            shape_row = 0 if shape is None else 1 + SHAPES.index(shape)
            expected = codes["place"][cell] + codes["colour"][colour_row] + codes["shape"][shape_row]
            torch.testing.assert_close(target[patch], expected)


def _fit(model, processor, records, codes) -> float:
    """Mean squared error of the projected patch features against their targets (an independent recomputation)."""
    pixels = processor.image_processor([r.image for r in records], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = model.model.multi_modal_projector(patch_features(model, pixels))
    return torch.nn.functional.mse_loss(tokens, target_tokens(records, patch_cells(), codes)).item()


def test_pretraining_changes_only_the_projector_and_fits_the_codes():
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    codes = symbolic_codes(model.config.text_config.hidden_size, seed=0)
    held_out = [make_record(0, "train", RECORD_OFFSET - 1 - i) for i in range(8)]  # never a stage-0b record
    error_before = _fit(model, processor, held_out, codes)
    stats = pretrain_projector(model, processor, steps=30, batch_size=8, lr=2e-3, data_seed=0, seed=0, log_every=30)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.startswith("model.multi_modal_projector.")}
    error_after = _fit(model, processor, held_out, codes)
    assert error_after < 0.7 * error_before  # an untrained tower still shows place and colour
    assert 0.0 < stats["projector_r2"] <= 1.0 and stats["projector_seconds"] >= 0


def _projector(out) -> dict[str, torch.Tensor]:
    weights = load_file(out / "model.safetensors")
    return {k: v for k, v in weights.items() if "multi_modal_projector" in k}


def test_stage_1_goes_on_training_the_projector_stage_0b_fitted(tmp_path):
    tiny = ["--vision-steps", "1", "--vision-batch-size", "2", "--projector-steps", "2", "--llm-pretrain-steps", "0",
            "--eval-every", "0", "--final-eval-size", "2", "--batch-size", "2", "--threads", "1"]
    main(["--out", str(tmp_path / "stage0b"), *tiny, "--steps", "0"])
    main(["--out", str(tmp_path / "trained"), *tiny, "--steps", "2"])
    stage0b, trained = (_projector(tmp_path / d) for d in ("stage0b", "trained"))
    assert stage0b and any(not torch.equal(stage0b[k], trained[k]) for k in stage0b)
    summary = json.loads((tmp_path / "trained" / "training_summary.json").read_text())
    assert summary["args"]["projector_steps"] == 2 and summary["projector_r2"] <= 1.0  # two steps: any fit, reported
