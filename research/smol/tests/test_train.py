"""smol-llava's training pieces on a tiny real LLaVA: the LoRA hooks and what ships must be the same model."""

from __future__ import annotations

import copy

import torch

from qapframe.sources.smol_llava import apply_delta, delta_tensors
from research.smol.prior import prior_accuracy
from research.smol.train import LoRA, lr_at
from tests.tiny_models import llava_inputs, tiny_llava


def test_lora_hooks_equal_the_merged_delta_that_ships():
    """Training runs ``W x + s B (A x)`` through hooks; the shipped model merges ``W + s B A``: same logits."""
    model = tiny_llava(seed=0, num_layers=2)
    merged = copy.deepcopy(model)
    lora = LoRA(model, rank=4, alpha=8.0, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a, b in lora.factors.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)  # B starts at 0: make the adapters matter
        model.model.multi_modal_projector.linear_1.weight.add_(0.1)
    assert len(lora.factors) == 2 * 7  # q/k/v/o/gate/up/down of each layer
    apply_delta(merged, delta_tensors(model, lora.factors), lora.scale)
    inputs = llava_inputs(2, [3, 5], seed=2)
    with torch.no_grad():
        hooked, plain = model(**inputs).logits, merged(**inputs).logits
        assert (hooked - plain).abs().max() <= 1e-4 * plain.abs().max()
        for handle in lora.handles:
            handle.remove()
        assert (model(**inputs).logits - plain).abs().max() > 1e-3  # the hooks were doing the work


def test_learning_rate_warms_up_then_decays_to_five_percent():
    assert lr_at(0, 100, 1.0, 10) == 0.1 and lr_at(9, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10) - 0.05) < 1e-9
    assert all(lr_at(s, 100, 1.0, 10) >= lr_at(s + 1, 100, 1.0, 10) for s in range(10, 100))


def test_the_prior_guesser_beats_chance_without_an_image_and_is_deterministic():
    first, second = prior_accuracy(2000, 200), prior_accuracy(2000, 200)
    assert first == second
    assert 0.2 < first["accuracy"] < 0.45 and first["accuracy_by_type"]["comparison"] > 0.3
