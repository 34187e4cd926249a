"""SpinQuant: Cayley steps stay orthogonal and descend, the learning loss is the quantized model's own loss,
learned rotations keep the fp function exactly, and learning lowers the quantized loss."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import qapframe
from qapframe.quantizers.config import QuantizerConfig
from qapframe.quantizers.rotations import ROTATIONS, CalibrationContext, random_orthogonal
from qapframe.quantizers.rotations.quarot import rotate_decoder
from qapframe.quantizers.rotations.spinquant import (
    QuantizedLoss, _kl_at_labelled_positions, _next_token_labels, cayley_step,
)
from qapframe.data import load_dataset
from qapframe.eval.inputs import model_inputs
from qapframe.toy import load_toy
from tests.quantizers.test_rotation import _ids, _llama, _rel, _scramble_norms
from tests.tiny_models import IMAGE_TOKEN_ID, llava_inputs, tiny_llava

W4A4 = QuantizerConfig(scheme="W4A4", group_size=16)


def _orthogonality(R):
    return float((R.T @ R - torch.eye(R.shape[0], dtype=R.dtype)).abs().max())


def test_cayley_steps_stay_orthogonal_and_converge_to_the_minimiser():
    # f(R) = ||R - T||^2 over orthogonal R has its minimum at the orthogonal T. Cayley steps stay in R's
    # component of the orthogonal group (they never flip the determinant), so R starts in T's.
    T = random_orthogonal(12, 1)
    S = torch.randn(12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    R = T @ torch.linalg.matrix_exp(S - S.T)
    distances = []
    for _ in range(60):
        R = cayley_step(R, 2 * (R - T), 0.2)
        assert _orthogonality(R) < 1e-12
        distances.append(float((R - T).norm()))
    assert all(b <= a + 1e-12 for a, b in zip(distances, distances[1:]))
    assert distances[-1] < 1e-6 < distances[0]


def test_a_small_cayley_step_decreases_f_by_its_first_order_term():
    # d/ds f(R(s)) at 0 is -||A||^2 / 2 with A = G R^T - R G^T (the step's docstring).
    C = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = lambda R: float((C * R).sum())  # noqa: E731  linear: G = C
    R = random_orthogonal(8, 3)
    A = C @ R.T - R @ C.T
    s = 1e-6
    assert (f(cayley_step(R, C, s)) - f(R)) / s == pytest.approx(-float(A.norm()) ** 2 / 2, rel=1e-4)


def _fused(model):
    layout = rotate_decoder(model, torch.eye(model.config.get_text_config().hidden_size, dtype=torch.float64),
                            None, True, 0)
    return model, layout


def _qwen2_with_biases():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = _scramble_norms(Qwen2ForCausalLM(config).eval())
    for layer in model.model.layers:
        layer.self_attn.v_proj.bias.data.normal_()
        layer.self_attn.q_proj.bias.data.normal_()
    return model


def _llava():
    return _scramble_norms(tiny_llava(seed=1))


@pytest.mark.parametrize("build, sample", [
    (lambda: _llama(48, 96, tied=True, dtype=torch.float32), lambda: {"input_ids": _ids(1, batch=1, length=16)}),
    (lambda: _llama(64, 128, tied=False, dtype=torch.float32), lambda: {"input_ids": _ids(2, batch=1, length=16)}),
    (_qwen2_with_biases, lambda: {"input_ids": _ids(3, batch=1, length=16)}),
    (_llava, lambda: llava_inputs(2, prompt_lengths=[3, 6], seed=4)),
], ids=["llama-tied", "llama-untied", "qwen2-biases", "llava"])
def test_the_learning_loss_is_the_loss_of_the_rotated_rtn_quantized_model(build, sample):
    """What SpinQuant minimises is what the quantizer then makes: rotate_decoder + RTN W4A4 (dynamic)."""
    model, layout = _fused(build())
    sample = sample()
    hidden, d = layout.hidden, layout.head_dim
    R1 = random_orthogonal(hidden, 5)
    R2 = [random_orthogonal(d, 6 + i) for i in range(len(layout.layers))]
    objective = QuantizedLoss(model, layout, CalibrationContext([sample], W4A4.weight_spec, W4A4.act_spec,
                                                                W4A4.targets, W4A4.ignore), quantize_weights=True)
    with torch.no_grad(), objective.quantizing():
        learned = objective(R1.float(), [r.float() for r in R2], [sample])
    reference = copy.deepcopy(model)
    rotate_decoder(reference, R1, R2, False, 0)
    qapframe.quantize(reference, {"name": "rtn", "scheme": "W4A4", "group_size": 16})
    with torch.no_grad():
        expected = reference(**sample, labels=_next_token_labels(reference, sample)).loss
    assert float(learned) == pytest.approx(float(expected), rel=1e-5)
    # with nothing quantized, any rotation gives the fp model's loss
    fp = QuantizedLoss(model, layout, CalibrationContext([sample], W4A4.weight_spec, None), quantize_weights=False)
    with torch.no_grad():
        assert float(fp(R1.float(), [r.float() for r in R2], [sample])) == pytest.approx(
            float(build()(**sample, labels=_next_token_labels(model, sample)).loss), rel=1e-5)


def test_labels_skip_padding_and_image_placeholders():
    model = tiny_llava()
    sample = llava_inputs(2, prompt_lengths=[3, 6], seed=4)
    labels = _next_token_labels(model, sample)
    ids, mask = sample["input_ids"], sample["attention_mask"]
    assert torch.equal(labels == -100, (mask == 0) | (ids == IMAGE_TOKEN_ID))
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    given = {**sample, "labels": torch.full_like(ids, 7)}
    assert torch.equal(_next_token_labels(model, given), given["labels"])


@pytest.mark.parametrize("build, inputs", [
    (lambda: _llama(48, 96, tied=True), lambda: {"input_ids": _ids(0)}),
    (lambda: _scramble_norms(tiny_llava(seed=1).double()), lambda: llava_inputs(2, prompt_lengths=[3, 6], seed=5)),
], ids=["llama", "llava"])
def test_learned_rotations_are_orthogonal_and_keep_the_fp_logits(build, inputs):
    model, inputs = build(), inputs()
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        reference = model(**inputs).logits
    rotation = ROTATIONS.get("spinquant")(steps=4, learning_rate=1.0)
    calibration = [{k: v[:1] for k, v in inputs.items()}, {k: v[1:] for k, v in inputs.items()}]
    rotation.fit(model, CalibrationContext(calibration, W4A4.weight_spec, W4A4.act_spec, W4A4.targets, W4A4.ignore))
    R1, R2 = rotation.learned
    assert _orthogonality(R1) < 1e-10 and all(_orthogonality(r) < 1e-10 for r in R2)
    assert len(rotation.losses) == 4
    rotation.apply(model)
    with torch.no_grad():
        assert _rel(model(**inputs).logits, reference) <= 1e-6


@pytest.fixture(scope="module")
def toy_questions():
    """Calibration and held-out questions with their answers for the trained toy (its LLM is a LLaMA)."""
    model, processor = load_toy()
    return [[model_inputs(processor, [record], model, with_answer=True)
             for record in load_dataset("synthetic", split, num_samples=8)] for split in ("calibration", "test")]


def _kl_to_fp(model, reference, samples):
    """Mean KL(fp || model) of the next-token distributions over the samples' labelled positions."""
    with torch.no_grad():
        return sum(float(_kl_at_labelled_positions(reference(**s).logits, model(**s).logits,
                                                   _next_token_labels(model, s))) for s in samples) / len(samples)


def test_a_learned_rotation_lowers_the_w4a4_toys_loss_on_held_out_questions(toy_questions):
    calibration, held_out = toy_questions
    losses = {}
    for rotation in ({"name": "hadamard"}, {"name": "spinquant", "steps": 10}):
        spec = {"name": "rtn", "scheme": "W4A4", "group_size": -1, "symmetric": True, "act_symmetric": True,
                "rotation": rotation}
        model = qapframe.quantize(load_toy()[0], spec, calibration)
        assert model.qapframe_quantization["rotation"]["name"] == rotation["name"]
        with torch.no_grad():
            losses[rotation["name"]] = sum(float(model(**s, labels=_next_token_labels(model, s)).loss)
                                           for s in held_out) / len(held_out)
    assert losses["spinquant"] < 0.9 * losses["hadamard"], losses


def test_fp_kl_learning_brings_the_quantized_toy_closer_to_fp(toy_questions):
    # The quantized loss is rough in the rotation (rounding flips move it by ~0.01 for tiny turns), so
    # claims are about ten steps' outcome, not one step's; fp_kl's gradients are small, hence the step size.
    calibration, _ = toy_questions
    loss, learning_rate = "fp_kl", 20.0
    context = CalibrationContext(calibration, W4A4.weight_spec, W4A4.act_spec, W4A4.targets, W4A4.ignore)
    start, learned = (ROTATIONS.get("spinquant")(steps=steps, loss=loss, learning_rate=learning_rate)
                      for steps in (0, 10))
    start.fit(load_toy()[0], context)
    learned.fit(load_toy()[0], context)
    model, layout = _fused(load_toy()[0])
    objective = QuantizedLoss(model, layout, context, True, loss)
    with torch.no_grad(), objective.quantizing():
        before, after = (float(objective(*_float(r.learned), calibration)) for r in (start, learned))
    assert after < 0.9 * before, (before, after)


def _float(learned):
    R1, R2 = learned
    return R1.float(), [r.float() for r in R2]


def test_the_fp_kl_objective_is_zero_for_the_fp_model_and_the_kl_of_the_quantized_one(toy_questions):
    calibration, _ = toy_questions
    model, layout = _fused(load_toy()[0])
    R1 = random_orthogonal(layout.hidden, 1)
    R2 = [random_orthogonal(layout.head_dim, 2) for _ in layout.layers]
    fp_context = CalibrationContext(calibration[:2], W4A4.weight_spec, None, W4A4.targets, W4A4.ignore)
    with torch.no_grad():
        assert float(QuantizedLoss(model, layout, fp_context, False, "fp_kl")(R1.float(), [r.float() for r in R2],
                                                                              calibration[:2])) < 1e-6
    context = CalibrationContext(calibration[:2], W4A4.weight_spec, W4A4.act_spec, W4A4.targets, W4A4.ignore)
    objective = QuantizedLoss(model, layout, context, True, "fp_kl")
    with torch.no_grad(), objective.quantizing():
        learned = float(objective(R1.float(), [r.float() for r in R2], calibration[:2]))
    reference = copy.deepcopy(model)
    rotate_decoder(reference, R1, R2, False, 0)
    qapframe.quantize(reference, {"name": "rtn", "scheme": "W4A4", "group_size": 16})
    # float32 noise: the two paths round rotated weights differently (abs ~1e-6 on a KL of ~1e-3)
    assert learned == pytest.approx(_kl_to_fp(reference, load_toy()[0], calibration[:2]), abs=2e-6)


def test_without_head_rotations_only_the_stream_rotation_is_learned():
    model, inputs = _llama(48, 96, tied=False), {"input_ids": _ids(0)}
    with torch.no_grad():
        reference = model(**inputs).logits
    rotation = ROTATIONS.get("spinquant")(steps=3, rotate_heads=False)
    calibration = [{"input_ids": _ids(1 + i, batch=1, length=12)} for i in range(2)]
    rotation.fit(model, CalibrationContext(calibration, W4A4.weight_spec, W4A4.act_spec, W4A4.targets, W4A4.ignore))
    R1, R2 = rotation.learned
    assert all(torch.equal(r, torch.eye(r.shape[0], dtype=torch.float64)) for r in R2)
    assert not torch.allclose(R1, ROTATIONS.get("hadamard")().stream_matrix(48))
    v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
    rotation.apply(model)
    assert torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_before @ R1)  # R1 only, no R2
    with torch.no_grad():
        assert _rel(model(**inputs).logits, reference) <= 1e-6


def test_no_steps_is_the_hadamard_rotation():
    inputs = {"input_ids": _ids(0)}
    models = {name: _llama(48, 96, tied=False) for name in ("hadamard", "spinquant")}
    ROTATIONS.get("hadamard")(seed=2).apply(models["hadamard"])
    ROTATIONS.get("spinquant")(steps=0, seed=2).apply(models["spinquant"])  # no data needed, no fit called
    for name, p in models["hadamard"].named_parameters():
        torch.testing.assert_close(dict(models["spinquant"].named_parameters())[name], p, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert _rel(models["spinquant"](**inputs).logits, models["hadamard"](**inputs).logits) <= 1e-10


def test_learning_is_seeded(toy_questions):
    calibration, _ = toy_questions
    context = CalibrationContext(calibration, W4A4.weight_spec, W4A4.act_spec, W4A4.targets, W4A4.ignore)
    runs = []
    for seed in (0, 0, 1):
        rotation = ROTATIONS.get("spinquant")(steps=3, seed=seed)
        rotation.fit(load_toy()[0], context)
        runs.append(rotation)
    assert torch.equal(runs[0].learned[0], runs[1].learned[0]) and runs[0].losses == runs[1].losses
    assert not torch.equal(runs[0].learned[0], runs[2].learned[0])


def test_a_learned_rotation_without_data_or_fit_is_a_clear_error():
    spec = {"name": "rtn", "scheme": "W4A4", "rotation": {"name": "spinquant", "steps": 2}}
    with pytest.raises(ValueError, match="rtn with rotation spinquant needs calibration data"):
        qapframe.quantize(_llama(), spec)
    with pytest.raises(ValueError, match="spinquant learns its rotations from calibration data.*fit"):
        ROTATIONS.get("spinquant")().apply(_llama())
    with pytest.raises(qapframe.SpecError, match="quantizer.rotation.steps"):
        qapframe.load_spec({"quantizer": {"name": "gptq", "rotation": {"name": "spinquant", "steps": -1}}})
