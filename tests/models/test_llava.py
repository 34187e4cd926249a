"""LLaVA-1.5 adapter on a tiny real `LlavaForConditionalGeneration`: pre-LLM and FastV pruning."""

import pytest
import torch

from qapframe.models import adapter_for
from qapframe.models.llava import LlavaAdapter
from qapframe.strategies.base import PRUNERS, SCORERS
from tests.tiny_models import IMAGE_TOKEN_ID, PAD_TOKEN_ID, llava_inputs, tiny_llava


@pytest.fixture(autouse=True)
def _inference_only():
    """No autograd in this module's tests (a module-level switch would leak into every later test)."""
    with torch.no_grad():
        yield


NEW = 6


def gen(model, **inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0, num_layers=4)


@pytest.fixture(scope="module")
def inputs():
    return llava_inputs(3, [4, 9, 2], seed=1)


def install(model, scorer, pruner="topk", **pruner_kwargs):
    return adapter_for(model).install(model, SCORERS.get(scorer[0])(**scorer[1]), PRUNERS.get(pruner)(**pruner_kwargs))


SCORER_CASES = [("visionzip", {}), ("hybrid", {}), ("l2norm", {}), ("fastv", {"k": 2})]


def test_adapter_is_picked_by_matches(model):
    assert isinstance(adapter_for(model), LlavaAdapter)


@pytest.mark.parametrize("scorer", SCORER_CASES, ids=lambda s: s[0])
def test_full_retention_is_identical(model, inputs, scorer):
    ref_logits, ref_tokens = model(**inputs).logits, gen(model, **inputs)
    install(model, scorer, retention=1.0)
    try:
        logits, tokens = model(**inputs).logits, gen(model, **inputs)
    finally:
        LlavaAdapter().remove(model)
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)


def reference_generate(model, inputs, selections):
    """Feed only the kept (and merged) tokens to the unmodified model, left-padded."""
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    kept = [f[sel.keep_index] if sel.kept_weights is None else sel.kept_weights @ f for sel, f in zip(selections, features)]
    kept = [k if sel.extra_tokens is None else torch.cat([k, sel.extra_tokens]) for k, sel in zip(kept, selections)]
    rows = []
    for ids, mask, k in zip(inputs["input_ids"], inputs["attention_mask"], kept):
        ids = ids[mask.bool()]
        image = (ids == IMAGE_TOKEN_ID).nonzero().squeeze(-1)
        rows.append(torch.cat([ids[: image[0]], torch.full((k.shape[0],), IMAGE_TOKEN_ID), ids[image[-1] + 1 :]]))
    width = max(len(r) for r in rows)
    short = torch.full((len(rows), width), PAD_TOKEN_ID)
    mask = torch.zeros_like(short)
    for i, r in enumerate(rows):
        short[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    embeds = model.get_input_embeddings()(short)
    embeds = embeds.masked_scatter((short == IMAGE_TOKEN_ID)[..., None], torch.cat(kept))
    return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize(
    "scorer,pruner", [(("visionzip", {}), "visionzip"), (("l2norm", {}), "tome"), (("hybrid", {"alpha": 0.3}), "topk"), (("random", {}), "topk")]
)
def test_pruned_generate_equals_kept_tokens_reference(model, inputs, scorer, pruner):
    install(model, scorer, pruner, retention=0.25)
    try:
        tokens = gen(model, **inputs)
        selections = model.qapframe_last_selection["selections"]
    finally:
        LlavaAdapter().remove(model)
    assert [s.num_tokens for s in selections] == [4, 4, 4]
    if pruner == "visionzip":
        assert all(s.extra_tokens is not None for s in selections)
    assert torch.equal(tokens[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(tokens[:, inputs["input_ids"].shape[1] :], reference_generate(model, inputs, selections))


@pytest.mark.parametrize("scorer", SCORER_CASES, ids=lambda s: s[0])
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
            }
            assert torch.equal(gen(model, **single)[0, -NEW:], batch[i, -NEW:])
    finally:
        LlavaAdapter().remove(model)


def test_remove_restores_unmodified_behaviour(model, inputs):
    ref = model(**inputs).logits
    install(model, ("visionzip", {}), "visionzip", retention=0.25)
    assert model(**inputs).logits.shape[1] < ref.shape[1]
    LlavaAdapter().remove(model)
    assert not hasattr(model, "qapframe_last_selection")
    assert "generate" not in vars(model) and "get_image_features" not in vars(model.model)
    assert torch.equal(model(**inputs).logits, ref)
    assert not model._forward_pre_hooks and not model.model.language_model._forward_pre_hooks


def test_installing_twice_is_an_error(model):
    install(model, ("l2norm", {}), retention=0.5)
    try:
        with pytest.raises(ValueError, match="already installed"):
            install(model, ("l2norm", {}), retention=0.5)
    finally:
        LlavaAdapter().remove(model)


def test_visionzip_scores_match_eager_attentions(inputs):
    sdpa, eager = tiny_llava(seed=0, num_layers=4), tiny_llava(seed=0, num_layers=4, attn_implementation="eager")
    install(sdpa, ("visionzip", {}), retention=0.5)
    sdpa(**inputs)
    images = sdpa.qapframe_installation.latest_images
    scores = torch.stack([s.scores for s in sdpa.qapframe_last_selection["selections"]])
    out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = len(out.attentions) - 2  # vision_feature_layer = -2 -> produced by the second-to-last layer
    expected = out.attentions[layer][:, :, 0, 1:].mean(dim=1)  # [B, 16]
    assert (scores - expected).abs().max() <= 1e-5
    block = eager.model.vision_tower.encoder.layers[layer]
    k = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[layer]))  # [B, 17, 32]
    keys = k.view(*k.shape[:2], 4, -1).mean(dim=2)[:, 1:]
    assert (torch.stack([im.keys for im in images]) - keys).abs().max() <= 1e-5


def test_fastv_scores_match_eager_attentions(inputs):
    sdpa, eager = tiny_llava(seed=0, num_layers=4), tiny_llava(seed=0, num_layers=4, attn_implementation="eager")
    install(sdpa, ("fastv", {"k": 2}), retention=0.5)
    sdpa(**inputs)
    got = sdpa.qapframe_last_selection["text_attention"]  # [B, L]
    attn = eager(**inputs, output_attentions=True).attentions[1]  # [B, H, L, L]
    expected = attn[:, :, -1].mean(dim=1)  # left padding: the last position is the last text token
    vision = inputs["input_ids"] == IMAGE_TOKEN_ID
    assert (got[vision] - expected[vision]).abs().max() <= 1e-5


def test_fastv_prefill_matches_recomputing_later_layers_on_kept_tokens(model, inputs):
    k = 1  # the ranking layer, FastV's K - 1: layers >= K = 2 see only kept tokens
    hidden = model(**inputs, output_hidden_states=True).hidden_states[k + 1]  # output of layer K - 1, [B, L, D]
    install(model, ("fastv", {"k": k + 1}), retention=0.25)
    try:
        logits = model(**inputs).logits
        state = model.qapframe_last_selection["state"]
    finally:
        LlavaAdapter().remove(model)
    lm = model.model.language_model
    index, kept = state.keep_index, state.kept_mask.bool()  # [B, L']
    assert (kept.sum(1) == inputs["attention_mask"].sum(1) - 12).all()  # 16 -> 4 vision tokens per image
    h = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    position_ids = index  # forward without position_ids uses 0..L-1; kept tokens keep theirs
    cos, sin = lm.rotary_emb(h, position_ids=position_ids)
    n = h.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal[None] & kept[:, None, :]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    for layer in lm.layers[k + 1 :]:
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids)
        h = h[0] if isinstance(h, tuple) else h
    expected = model.lm_head(lm.norm(h))
    assert logits.shape == expected.shape
    assert (logits[kept] - expected[kept]).abs().max() <= 1e-5


def test_pyramiddrop_keeps_each_stages_most_attended_tokens_by_eager_attention(inputs):
    """PyramidDrop's rule against transformers' own eager attention weights, read inside the pruned run: at the
    end of each stage the kept vision tokens are the ones the last token attends most (mean over heads) among
    those that reached it, ``round(16 * (2 / 16) ** ((s + 1) / 3))`` = 8, 4, 2 of an image's 16 at 12.5 %."""
    model = tiny_llava(seed=0, num_layers=4, attn_implementation="eager")
    install(model, ("pyramiddrop", {"stages": [0.25, 0.5, 0.75]}), retention=0.125)
    layers = list(model.qapframe_installation.inllm.layers)
    weights = {}

    def keep_weights(layer):
        def hook(module, args, out):
            weights[layer] = out[1]  # [B, H, L_in, L_in] eager softmax probabilities

        return hook

    hooks = [model.model.language_model.layers[layer].self_attn.register_forward_hook(keep_weights(layer)) for layer in layers]
    try:
        model(**inputs)
        state = model.qapframe_last_selection["state"]
    finally:
        for hook in hooks:
            hook.remove()
        LlavaAdapter().remove(model)
    ids = inputs["input_ids"]
    length = ids.shape[1]
    entering = torch.arange(length).expand(3, length)  # token ids entering stage 0's ranking layer
    entering_mask = inputs["attention_mask"].bool()
    for stage, (layer, count) in enumerate(zip(layers, [8, 4, 2])):
        last_row = weights[layer][:, :, -1].double().mean(dim=1)  # [B, L_in]: the last token's attention
        after = state.stages[stage]
        for row in range(3):
            vision = entering_mask[row] & (ids[row, entering[row].clamp_max(length - 1)] == IMAGE_TOKEN_ID)
            candidates = entering[row][vision]
            expected = candidates[last_row[row][vision].topk(count).indices].sort().values
            kept = after.keep_index[row][after.kept_mask[row].bool()]
            kept_vision = kept[ids[row, kept] == IMAGE_TOKEN_ID]
            assert torch.equal(kept_vision, expected)
        entering, entering_mask = after.keep_index, after.kept_mask.bool()
