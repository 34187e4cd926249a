"""Every registered pruning method on every registered model adapter, through one shared test.

Each case is a (scorer, pruner) pair as a spec would name it; each adapter contributes a tiny real model
and its inputs (left-padded, rows with different prompt lengths and, for LLaVA-NeXT, different token
counts). Checked under sdpa attention: retention 1.0 is bit-identical to the unmodified model; a
batch of 3 gives the same kept tokens and logits as three single runs; in-LLM methods' pruned prefill
equals recomputing the later layers on the kept tokens, and cached `generate` matches that recomputation
token for token. On LLaVA, every method also composes with every built-in quantizer (and static W4A4).
"""

from __future__ import annotations

import pytest
import torch

from qapframe.models import ADAPTERS, adapter_for
from qapframe.strategies.base import PRUNERS, SCORERS
from tests.tiny_models import llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next


@pytest.fixture(autouse=True)
def _inference_only():
    with torch.no_grad():
        yield


def _llava():
    model = tiny_llava(seed=0, num_layers=4)
    return model, llava_inputs(3, [4, 9, 2], seed=1), {}


def _llava_next():
    model = tiny_llava_next(seed=0, num_layers=4)
    inputs = llava_next_inputs(model, [(32, 64), (64, 64), (30, 50)], [4, 7, 2], seed=2)
    return model, inputs, {"image_sizes"}


def _llava_onevision():
    from tests.tiny_models import llava_onevision_inputs, tiny_llava_onevision

    model = tiny_llava_onevision(seed=0, num_layers=4)
    inputs = llava_onevision_inputs(model, [(32, 64), (64, 64), (30, 50)], [4, 7, 2], seed=2)
    return model, inputs, {"image_sizes"}


def _qwen(build):
    """Qwen-VL with ``mm_token_type_ids`` all text, so that M-RoPE gives the 1-D positions `staged_reference`
    assumes (tests/models/test_qwen_vl.py checks real 3-D positions, padding and different token counts).
    Rows of one length and images of different grids but one patch count, so that `single` can slice
    ``mm_token_type_ids`` and ``pixel_values [3, 96, 96]`` per row."""

    def builder():
        from tests.tiny_models import qwen_vl_inputs

        inputs = qwen_vl_inputs([(1, 8, 12), (1, 12, 8), (1, 4, 24)], [5, 5, 5], seed=1)
        inputs["mm_token_type_ids"] = torch.zeros_like(inputs["mm_token_type_ids"])
        inputs["pixel_values"] = inputs["pixel_values"].view(3, 96, -1)
        return build(), inputs, {"image_grid_thw", "mm_token_type_ids"}

    return builder


def _qwen3_without_deepstack():
    from tests.tiny_models import tiny_qwen3_vl

    return tiny_qwen3_vl(deepstack=())  # deepstack would refuse PyramidDrop's stage at layer 0


def _qwen2_vl():
    from tests.tiny_models import tiny_qwen2_vl

    return tiny_qwen2_vl()


def _qwen2_5_vl():
    from tests.tiny_models import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl()


# One tiny model per adapter; an adapter registered later must add its builder here (the test below fails
# for any registered adapter without one, so no adapter goes untested).
BUILDERS = {"llava": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
            "qwen2_vl": _qwen(_qwen2_vl), "qwen2_5_vl": _qwen(_qwen2_5_vl), "qwen3_vl": _qwen(_qwen3_without_deepstack)}

METHODS = {  # name -> (scorer, pruner)
    "visionzip": ({"name": "visionzip"}, {"name": "visionzip"}),
    "cdpruner": ({"name": "cdpruner"}, {"name": "cdpruner"}),
    "cdpruner+hybrid": ({"name": "hybrid", "semantic": {"name": "cdpruner"}}, {"name": "cdpruner"}),
    "divprune": ({"name": "l2norm"}, {"name": "divprune"}),
    "vispruner": ({"name": "visionzip"}, {"name": "vispruner"}),
    "tome": ({"name": "l2norm"}, {"name": "tome"}),
    "prunevid": ({"name": "l2norm"}, {"name": "prunevid"}),  # an image is a one-frame clip
    "mustdrop_merge": ({"name": "l2norm"}, {"name": "mustdrop_merge"}),
    "fastvid": ({"name": "visionzip"}, {"name": "fastvid"}),  # an image is a one-frame clip
    "holitom": ({"name": "visionzip"}, {"name": "holitom"}),  # an image: top-k by score
    "random": ({"name": "random"}, {"name": "topk"}),
    "fastv": ({"name": "fastv", "k": 2}, {"name": "topk"}),
    "dart": ({"name": "fastv", "k": 2}, {"name": "dart", "k": 2, "num_pivots": 2}),
    "pyramiddrop": ({"name": "pyramiddrop", "stages": [0.25, 0.5, 0.75]}, {"name": "topk"}),
    # the paper's 3/32, 7/32, 1/2 cannot be three distinct layers of a 4-layer LLM: layers 0, 1, 2
    "sparsevlm": ({"name": "sparsevlm", "stages": [0.25, 0.5, 0.75]}, {"name": "sparsevlm"}),
    "mustdrop": ({"name": "mustdrop", "stages": [0.25, 0.5, 0.75]}, {"name": "topk"}),
}
# Pruners that need a clip's frames, tested on the video adapters instead (the shared inputs are images):
# tests/models/test_llava_onevision.py and tests/models/test_qwen_vl.py (`-k dycoke`).
VIDEO_ONLY = {"dycoke"}
IN_LLM = {"fastv", "dart", "pyramiddrop", "sparsevlm", "mustdrop"}
STAGES = {"pyramiddrop": 3, "sparsevlm": 3, "mustdrop": 3}  # in-LLM pruning stages (others: 1)
NEW = 4

_cache: dict = {}


def setup(adapter: str):
    if adapter not in BUILDERS:
        pytest.fail(f"adapter {adapter!r} is registered but tests/models/{__name__} has no tiny model for it")
    if adapter not in _cache:
        _cache[adapter] = BUILDERS[adapter]()
    return _cache[adapter]


def install(model, method: str, retention: float):
    scorer, pruner = METHODS[method]
    s = SCORERS.get(scorer["name"])(**{k: v for k, v in scorer.items() if k != "name"})
    p = PRUNERS.get(pruner["name"])(**{k: v for k, v in pruner.items() if k != "name"}, retention=retention)
    return adapter_for(model).install(model, s, p)


def remove(model):
    adapter_for(model).remove(model)


def single(inputs, extra, i):
    mask = inputs["attention_mask"][i].bool()
    out = {
        "input_ids": inputs["input_ids"][i : i + 1, mask],
        "attention_mask": inputs["attention_mask"][i : i + 1, mask],
        "pixel_values": inputs["pixel_values"][i : i + 1],
    }
    for key in extra:
        out[key] = inputs[key][i : i + 1]
    return out


def placeholder_ids(model) -> list[int]:
    ids = [getattr(model.config, k, None) for k in ("image_token_id", "video_token_id", "image_token_index")]
    return sorted({int(t) for t in ids if t is not None})


def gen(model, inputs, text_only: bool = False):
    """Greedy tokens; ``text_only``: never a placeholder token (the staged reference re-feeds the new tokens
    as text, and a random tiny model may emit an image token, which the model would take for an image)."""
    suppress = placeholder_ids(model) if text_only else None
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False, suppress_tokens=suppress)


ADAPTER_NAMES = ADAPTERS.names()


def test_every_built_in_pruner_is_tested_here_or_on_video():
    built_in = {e.name for e in PRUNERS.entries() if e.source == "built-in"}
    missing = built_in - {p["name"] for _, p in METHODS.values()} - VIDEO_ONLY
    assert not missing, f"built-in pruners with no case in METHODS: {sorted(missing)}"


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
def test_full_retention_is_bit_identical(adapter, method):
    model, inputs, _ = setup(adapter)
    ref_logits, ref_tokens = model(**inputs).logits, gen(model, inputs)
    install(model, method, 1.0)
    try:
        logits, tokens = model(**inputs).logits, gen(model, inputs)
    finally:
        remove(model)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)

@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
def test_batch_equals_single_runs(adapter, method):
    model, inputs, extra = setup(adapter)
    install(model, method, 0.25)
    try:
        batch_logits = model(**inputs).logits
        batch_kept = [s.keep_index for s in model.qapframe_last_selection["selections"]]
        batch_tokens = gen(model, inputs)
        for i in range(3):
            one = single(inputs, extra, i)
            logits = model(**one).logits
            kept = model.qapframe_last_selection["selections"][0].keep_index
            if method != "random":  # random draws new positions for every call by design
                assert torch.equal(kept, batch_kept[i])
                assert (logits[0, -1] - batch_logits[i, -1]).abs().max() <= 1e-4
                assert torch.equal(gen(model, one)[0, -NEW:], batch_tokens[i, -NEW:])
    finally:
        remove(model)


def staged_reference(model, inputs, state, layers, extra_ids=None, generate_positions=False, positions=None):
    """Logits of the unmodified model run layer by layer: dense up to the first ranking layer, then each
    stage's layers on that stage's kept prompt tokens (plus every token in ``extra_ids [B, T]``), at their
    original positions: ``positions [B, L + T]`` or M-RoPE's ``[3, B, L + T]`` when given, else 1-D ones.
    A merged token (id L + j) enters at the first stage that lists it, as ``state.merged[:, j]``, at the
    position ``StageState.position_index`` names."""
    lm = model.model.language_model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    length = ids.shape[1]
    if extra_ids is not None:
        ids = torch.cat([ids, extra_ids], 1)
        mask = torch.cat([mask, torch.ones_like(extra_ids)], 1)
    # generate numbers positions from the mask; a plain forward uses 0..L-1
    if positions is None:
        positions = (mask.cumsum(-1) - 1).clamp_min(0) if generate_positions else torch.arange(ids.shape[1]).expand_as(ids)
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, **rest).hidden_states
    h_full = hidden[layers[0] + 1]  # [B, L + T, D] output of the first ranking layer (causal: prompt part unchanged)
    bounds = layers + [len(lm.layers) - 1]
    b, t = ids.shape[0], ids.shape[1] - length
    tail = torch.arange(length, length + t).expand(b, t)
    merged = state.merged  # [B, M, D] or None
    h = previous = None
    for s, stage in enumerate(state.stages):
        # reference ids: prompt positions, then the T decode tokens, then the merged tokens
        own = torch.where(stage.keep_index >= length, stage.keep_index + t, stage.keep_index)
        index = torch.cat([own, tail], 1)  # [B, L_s + T]
        kept = torch.cat([stage.kept_mask.bool(), torch.ones(b, t, dtype=torch.bool)], 1)
        source = h_full if h is None else h
        if h is None:
            local = index  # h_full holds every prompt and decode token; merged ones follow it
        else:  # this stage's tokens within the previous stage's sequence (its padding slots match nothing)
            match = index[:, :, None] == previous[:, None, :]
            local = torch.where(match.any(-1), match.float().argmax(-1), h.shape[1] + index - (length + t))
        if merged is not None:
            source = torch.cat([source, merged], 1)
        local = local.clamp(0, source.shape[1] - 1)  # padding slots: anything
        h = source.gather(1, local[..., None].expand(-1, -1, source.shape[-1]))
        where = torch.cat([stage.position_index, tail], 1)
        pos = positions.gather(-1, where.expand(*positions.shape[:-2], *where.shape))
        cos, sin = lm.rotary_emb(h, position_ids=pos)
        n = h.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & kept[:, None, :]
        attn = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        for layer in lm.layers[bounds[s] + 1 : bounds[s + 1] + 1]:
            h = layer(h, attention_mask=attn, position_embeddings=(cos, sin), position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        previous = index.masked_fill(~kept, -1)
    return model.lm_head(lm.norm(h)), kept


def check_merged_slots(state, spans, length):
    """Every merged token sits right after its image's tokens (before the text after the image) and takes the
    image's last placeholder position; every stage of a SparseVLM run below full retention made some."""
    assert state.merged is not None
    for stage in state.stages:
        for row in range(stage.keep_index.shape[0]):
            real = stage.kept_mask[row].bool()
            ids, where = stage.keep_index[row][real].tolist(), stage.position_index[row][real].tolist()
            images = [pos for r, pos in spans if r == row]
            for slot, (token, at) in enumerate(zip(ids, where)):
                if token < length:
                    assert at == token
                    continue
                image = next(pos for pos in images if int(pos[-1]) == at)
                before = ids[slot - 1]
                assert before >= length or before in image.tolist()
                if slot + 1 < len(ids):
                    after = ids[slot + 1]
                    assert after >= length or after > int(image[-1])


@pytest.mark.parametrize("method", sorted(IN_LLM))
@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
def test_in_llm_prefill_equals_recomputing_later_layers_on_kept_tokens(adapter, method):
    model, inputs, _ = setup(adapter)
    install(model, method, 0.25)
    try:
        logits = model(**inputs).logits
        info = model.qapframe_last_selection
        layers = list(model.qapframe_installation.inllm.layers)
    finally:
        remove(model)
    state = info["state"]
    assert len(state.stages) == STAGES.get(method, 1)
    if method == "sparsevlm":
        check_merged_slots(state, info["spans"], inputs["input_ids"].shape[1])
    expected, kept = staged_reference(model, inputs, state, layers)
    assert logits.shape == expected.shape
    assert (logits[kept] - expected[kept]).abs().max() <= 1e-4
    # each stage really shrinks the sequence
    lengths = [int(st.kept_mask.sum()) for st in state.stages]
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < int(inputs["attention_mask"].sum())


@pytest.mark.parametrize("method", sorted(IN_LLM))
@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
def test_in_llm_generate_matches_the_staged_reference_token_for_token(adapter, method):
    """Cached decoding (each stage's layers hold only its kept prompt tokens) against the recomputed reference."""
    model, inputs, _ = setup(adapter)
    install(model, method, 0.25)
    try:
        tokens = gen(model, inputs, text_only=True)
        state, spans = model.qapframe_last_selection["state"], model.qapframe_last_selection["spans"]
        layers = list(model.qapframe_installation.inllm.layers)
    finally:
        remove(model)
    length = inputs["input_ids"].shape[1]
    if method == "sparsevlm":  # the cache holds merged tokens too
        check_merged_slots(state, spans, length)
    new = tokens[:, length:]
    for step in range(NEW):
        logits, _ = staged_reference(model, inputs, state, layers, new[:, :step], generate_positions=True)
        logits[:, -1, placeholder_ids(model)] = -torch.inf  # as `gen(text_only=True)` suppresses them
        assert torch.equal(logits[:, -1].argmax(-1), new[:, step])


def test_hybrid_pipeline_error_is_what_the_quantized_first_layer_does():
    """e_mode=pipeline: E is the error of layer 0's q_proj activation quantizer on the normed vision tokens."""
    from qapframe.kernels.reference import fake_quantize_groups
    from qapframe.pipeline import quantize

    model = quantize(tiny_llava(seed=3, num_layers=2), {"name": "rtn", "scheme": "W4A4"})
    inputs = llava_inputs(2, [3, 5], seed=4)
    adapter_for(model).install(model, SCORERS.get("hybrid")(e_mode="pipeline"), PRUNERS.get("topk")(retention=0.5))
    try:
        model(**inputs)
        images = model.qapframe_installation.latest_images
        got = [model.qapframe_installation.adapter.activation_error(model, im.features) for im in images]
    finally:
        remove(model)
    layer = model.model.language_model.layers[0]
    spec = layer.self_attn.q_proj.act_quant.spec
    for im, error in zip(images, got):
        x = layer.input_layernorm(im.features)
        expected = (x - fake_quantize_groups(x, spec.bits, spec.group_size, spec.symmetric)).norm(dim=-1)
        assert error is not None and (error - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
def test_stages_that_collapse_onto_one_layer_are_refused(adapter):
    model, _, _ = setup(adapter)
    scorer = SCORERS.get("pyramiddrop")(stages=[0.3, 0.35])  # both start at layer round(1.2) = round(1.4) = 1
    with pytest.raises(ValueError, match=r"resolve to ranking layers \[0, 0\] on this 4-layer LLM"):
        adapter_for(model).install(model, scorer, PRUNERS.get("topk")(retention=0.5))
    assert getattr(model, "qapframe_installation", None) is None
    assert "get_image_features" not in vars(model.model)  # nothing was left half-installed


def test_sparsevlm_raters_follow_the_image_and_are_chosen_by_relevance():
    """Each image's raters: the text tokens after it whose relevance (input embeddings) is at least the mean."""
    from qapframe.strategies.scorers.sparsevlm import text_raters

    model, inputs, _ = setup("llava")
    install(model, "sparsevlm", 0.25)
    try:
        model(**inputs)
        info = model.qapframe_last_selection
        images = model.qapframe_installation.latest_images
    finally:
        remove(model)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    for raters, (row, pos), image in zip(info["raters"], info["spans"], images):
        after = inputs["attention_mask"][row].bool() & (inputs["input_ids"][row] != model.config.image_token_id)
        after[: int(pos[-1]) + 1] = False
        candidates = after.nonzero().squeeze(-1)
        assert candidates.numel() > 1
        expected = candidates[text_raters(image.features, embeds[row, candidates])]
        assert torch.equal(raters, expected)
    # the raters' rows are what the scorer averaged at the first stage
    first = info["stages"][0]
    for rows, sel in zip(first["rater_attention"], first["selections"]):
        assert rows.shape[0] >= 1 and torch.allclose(rows.mean(0), sel.scores)


def test_in_llm_context_without_an_in_llm_scorer_is_refused():
    model, _, _ = setup("llava")
    with pytest.raises(ValueError, match="needs context from inside the LLM"):
        adapter_for(model).install(model, SCORERS.get("l2norm")(), PRUNERS.get("sparsevlm")(retention=0.5))
    assert getattr(model, "qapframe_installation", None) is None
    assert "get_image_features" not in vars(model.model)


QUANTIZER_CASES = ["rtn-w4a4", "gptq-w4a16-actorder", "awq-w4a8", "smoothquant-w8a8"]
STATIC_W4A4 = {"name": "rtn", "scheme": "W4A4", "group_size": 32, "act_dynamic": False, "act_symmetric": True}


@pytest.mark.parametrize("case", QUANTIZER_CASES + ["rtn-w4a4-static"])
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"random"}))  # random: tests/models/test_llava.py
def test_every_method_in_a_pipeline_with_every_quantizer(method, case):
    """Quantized (calibrated on unpruned prompts), then pruned, from spec dicts, on LLaVA: the budget is met and
    the pruned model is the quantized model on the kept tokens. Pre-LLM: `generate` equals the quantized model
    fed only the kept (and merged) vision tokens; in-LLM: the prefill equals the quantized model's later
    layers recomputed on the kept (and merged) tokens."""
    from qapframe.pipeline import Pipeline
    from qapframe.quantizers.base import QUANTIZERS
    from tests.models.test_llava import reference_generate
    from tests.quantizers.test_llava import CASES

    assert {CASES[c]["name"] for c in QUANTIZER_CASES} == {e.name for e in QUANTIZERS.entries() if e.source == "built-in"}
    quantizer = STATIC_W4A4 if case == "rtn-w4a4-static" else CASES[case]
    scorer, pruner = METHODS[method]
    calibration = [llava_inputs(1, prompt_lengths=[4 + i % 3], seed=i) for i in range(4)]
    model = Pipeline(quantizer, scorer, {**pruner, "retention": 0.25}).apply(tiny_llava(seed=0, num_layers=4), calibration)
    inputs = llava_inputs(3, [4, 9, 2], seed=1)
    try:
        logits = model(**inputs).logits
        info = model.qapframe_last_selection
        layers = list(model.qapframe_installation.inllm.layers) if method in IN_LLM else None
        tokens = gen(model, inputs)
        generated = model.qapframe_last_selection["selections"]
    finally:
        remove(model)
    assert [s.num_tokens for s in info["selections"]] == [4, 4, 4]  # 25 % of 16, merged tokens included
    if method in IN_LLM:
        expected, kept = staged_reference(model, inputs, info["state"], layers)
        assert (logits[kept] - expected[kept]).abs().max() <= 1e-4
        assert tokens.shape == (3, inputs["input_ids"].shape[1] + NEW)
    else:
        length = inputs["input_ids"].shape[1]
        reference = reference_generate(model, inputs, generated)
        assert torch.equal(tokens[:, length:], reference[:, :NEW])
