"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters on tiny real models, saved and re-loaded with `from_pretrained`.

Prompts carry ``mm_token_type_ids`` (as the processor returns them), so the models use 3-D M-RoPE positions.
The reference for pruning is the unmodified model, decoded greedily without a cache, fed only the kept
tokens (shortened ids, kept features as ``mm_encoder_outputs``) with the unpruned prompt's positions at
those tokens and decode positions continuing after the unpruned prompt.
"""

import pytest
import torch

from qapframe.models import adapter_for
from qapframe.models.qwen_vl import Qwen2VLAdapter, Qwen3VLAdapter, Qwen25VLAdapter
from qapframe.strategies.base import PRUNERS, SCORERS
from tests.tiny_models import (
    PAD_TOKEN_ID,
    QWEN_END_ID,
    QWEN_IMAGE_ID,
    QWEN_START_ID,
    QWEN_VIDEO_ID,
    qwen_vl_inputs,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)


@pytest.fixture(autouse=True)
def _inference_only():
    with torch.no_grad():
        yield


NEW = 4
GRIDS = [(1, 8, 12), (1, 8, 8), (1, 12, 8)]  # 24, 16 and 24 merged tokens; 2.5-VL's windows split them unevenly
LENGTHS = [4, 9, 2]
ADAPTERS = {"qwen2_5_vl": Qwen25VLAdapter, "qwen2_vl": Qwen2VLAdapter, "qwen3_vl": Qwen3VLAdapter}
BUILD = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen2_vl": tiny_qwen2_vl, "qwen3_vl": tiny_qwen3_vl}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    out = {}
    for name, build in BUILD.items():
        directory = tmp_path_factory.mktemp(name)
        build().save_pretrained(directory)
        out[name] = AutoModelForImageTextToText.from_pretrained(directory, attn_implementation="sdpa").eval()
    return out


@pytest.fixture(scope="module")
def inputs():
    return qwen_vl_inputs(GRIDS, LENGTHS, seed=1)


def gen(model, inputs, new=NEW):
    return model.generate(**inputs, max_new_tokens=new, do_sample=False)


def install(model, scorer, pruner="topk", **kw):
    return adapter_for(model).install(model, SCORERS.get(scorer[0])(**scorer[1]), PRUNERS.get(pruner)(**kw))


def remove(model):
    adapter_for(model).remove(model)


def rows_of(inputs, i):
    """Row ``i`` of a one-item-per-row batch, padding dropped: its own pixels and grid."""
    key = "video" if "pixel_values_videos" in inputs else "image"
    pixel_key = "pixel_values_videos" if key == "video" else "pixel_values"
    grid = inputs[f"{key}_grid_thw"]
    counts = grid.prod(-1).tolist()
    start = sum(counts[:i])
    mask = inputs["attention_mask"][i].bool()
    return {"input_ids": inputs["input_ids"][i : i + 1, mask], "attention_mask": inputs["attention_mask"][i : i + 1, mask],
            "mm_token_type_ids": inputs["mm_token_type_ids"][i : i + 1, mask],
            pixel_key: inputs[pixel_key][start : start + counts[i]], f"{key}_grid_thw": grid[i : i + 1]}


def encoded(model, inputs):
    """The unmodified model's per-item encoder outputs, by modality, in prompt order within each."""
    base = model.model
    out = {}
    if inputs.get("pixel_values") is not None:
        out["image"] = base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    if inputs.get("pixel_values_videos") is not None:
        out["video"] = base.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
    return out


def kept_rows(sel, per_token):
    """``per_token [N, D]`` at the kept tokens; a merged kept token (ToMe) is its weights' sum of rows, which
    tests/strategies/pruners/test_tome.py checks are its group's mean (a mean summed in another order can flip
    a near-tie of the tiny model's greedy tokens)."""
    if sel.kept_weights is None:
        return per_token[sel.keep_index]
    return sel.kept_weights @ per_token


def reference_generate(model, inputs, selections, new=NEW):
    """Greedy tokens of the unmodified model fed only the kept tokens at their unpruned positions (no cache)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    full, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask,
    )  # [3, B, L]
    enc = encoded(model, inputs)
    counters = {"image": 0, "video": 0}
    kept = {"image": [], "video": []}
    kept_deepstack = {"image": [], "video": []}
    order = iter(selections)
    rows, positions = [], []
    for r in range(ids.shape[0]):
        real = mask[r].bool()
        src, col = [], 0
        cols = real.nonzero().squeeze(-1).tolist()
        while col < len(cols):
            c = cols[col]
            token = int(ids[r, c])
            if token not in (QWEN_IMAGE_ID, QWEN_VIDEO_ID):
                src.append(c)
                col += 1
                continue
            run = [c]
            while col + len(run) < len(cols) and int(ids[r, cols[col + len(run)]]) == token:
                run.append(cols[col + len(run)])
            modality = "image" if token == QWEN_IMAGE_ID else "video"
            sel = next(order)
            item = counters[modality]
            counters[modality] += 1
            features = enc[modality].pooler_output[item]
            assert features.shape[0] == len(run)  # the adapter's order is the prompt's
            src += [run[i] for i in sel.keep_index.tolist()]
            merged = 0 if sel.extra_tokens is None else sel.extra_tokens.shape[0]
            src += [run[-1]] * merged
            kept[modality].append(torch.cat([kept_rows(sel, features), *([] if sel.extra_tokens is None else [sel.extra_tokens])]))
            deepstack = getattr(enc[modality], "deepstack_features", None)
            if deepstack:
                ds = torch.stack([kept_rows(sel, layer[item]) for layer in deepstack])
                kept_deepstack[modality].append(torch.cat([ds, ds.new_zeros(ds.shape[0], merged, ds.shape[2])], 1))
            col += len(run)
        src = torch.tensor(src)
        rows.append(ids[r, src])
        positions.append(full[:, r, src])
    width = max(len(r) for r in rows)
    short = torch.full((len(rows), width), PAD_TOKEN_ID)
    short_mask = torch.zeros_like(short)
    pos = torch.zeros(3, len(rows), width, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, positions)):
        short[i, width - len(row) :], short_mask[i, width - len(row) :], pos[:, i, width - len(row) :] = row, 1, p
    last = full.masked_fill(~mask.bool()[None], -1).amax(dim=(0, 2))  # [B] the unpruned prompt's last position
    mm = {}
    for modality, feats in kept.items():
        if feats:
            kind = type(enc[modality])
            extra = {}
            if kept_deepstack[modality]:
                layers = kept_deepstack[modality][0].shape[0]
                extra["deepstack_features"] = [tuple(d[l] for d in kept_deepstack[modality]) for l in range(layers)]
            mm[modality] = kind(pooler_output=tuple(feats), **extra)
    tokens, logits = [], None
    for step in range(new):
        step_pos = (last[:, None] + 1 + torch.arange(step)[None]).expand(3, -1, -1)
        out = model(
            input_ids=torch.cat([short, *tokens], 1) if tokens else short,
            attention_mask=torch.cat([short_mask, torch.ones(len(rows), step, dtype=torch.long)], 1),
            position_ids=torch.cat([pos, step_pos], 2),
            mm_encoder_outputs=dict(mm),
            use_cache=False,
        )
        logits = out.logits[:, width - 1] if logits is None else logits
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    tokens = torch.cat(tokens, 1)
    # generate pads a row once it has emitted EOS
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    if eos is not None and pad is not None:
        is_eos = torch.isin(tokens, torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos])).long()
        ended = is_eos.cumsum(1) - is_eos > 0  # after the first EOS
        tokens = tokens.masked_fill(ended, pad)
    return tokens, logits


@pytest.mark.parametrize("name", list(BUILD))
def test_adapter_is_picked_by_matches(models, name):
    assert type(adapter_for(models[name])) is ADAPTERS[name]


VISIONZIP, FASTV = (("visionzip", {}), "visionzip"), (("fastv", {"k": 2}), "topk")
# Every model gets a pre-LLM and an in-LLM method; the shared code paths get the rest once (the shared
# tests/models/test_strategies_on_adapters.py runs every method on every adapter).
FULL_CASES = [(n, c) for n in BUILD for c in (VISIONZIP, FASTV)] + [
    ("qwen2_5_vl", (("hybrid", {}), "topk")), ("qwen2_5_vl", (("cdpruner", {}), "cdpruner"))]


@pytest.mark.parametrize("name,case", FULL_CASES, ids=lambda v: v if isinstance(v, str) else v[0][0])
def test_full_retention_is_bit_identical(models, inputs, name, case):
    model = models[name]
    ref_logits, ref_tokens = model(**inputs).logits, gen(model, inputs)
    install(model, case[0], case[1], retention=1.0)
    try:
        logits, tokens = model(**inputs).logits, gen(model, inputs)
    finally:
        remove(model)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


PRUNE_CASES = [(n, VISIONZIP) for n in BUILD] + [
    ("qwen2_5_vl", (("hybrid", {"alpha": 0.3}), "topk")), ("qwen3_vl", (("l2norm", {}), "divprune")),
    ("qwen3_vl", (("l2norm", {}), "tome")), ("qwen2_5_vl", (("l2norm", {}), "prunevid")),
    ("qwen2_vl", (("visionzip", {}), "fastvid"))]


@pytest.mark.parametrize("name,case", PRUNE_CASES, ids=lambda v: v if isinstance(v, str) else v[1])
def test_pruned_generate_equals_kept_tokens_at_their_positions(models, inputs, name, case):
    model = models[name]
    install(model, case[0], case[1], retention=0.25)
    try:
        logits = model(**inputs).logits[:, -1]
        tokens = gen(model, inputs)
        selections = model.qapframe_last_selection["selections"]
    finally:
        remove(model)
    assert [s.num_tokens for s in selections] == [6, 4, 6]
    assert torch.equal(tokens[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    expected, expected_logits = reference_generate(model, inputs, selections)
    assert (logits - expected_logits).abs().max() <= 1e-5
    assert torch.equal(tokens[:, inputs["input_ids"].shape[1] :], expected)


BATCH_CASES = [(n, c) for n in BUILD for c in (VISIONZIP, FASTV)] + [("qwen2_5_vl", (("cdpruner", {}), "cdpruner"))]


@pytest.mark.parametrize("name,case", BATCH_CASES, ids=lambda v: v if isinstance(v, str) else v[0][0])
def test_batch_equals_single_runs(models, inputs, name, case):
    model = models[name]
    install(model, case[0], case[1], retention=0.25)
    try:
        batch_logits = model(**inputs).logits[:, -1]
        batch_kept = [s.keep_index for s in model.qapframe_last_selection["selections"]]
        batch = gen(model, inputs)
        for i in range(3):
            one = rows_of(inputs, i)
            assert (model(**one).logits[0, -1] - batch_logits[i]).abs().max() <= 1e-4
            assert torch.equal(model.qapframe_last_selection["selections"][0].keep_index, batch_kept[i])
            assert torch.equal(gen(model, one)[0, -NEW:], batch[i, -NEW:])
    finally:
        remove(model)


@pytest.mark.parametrize("name", list(BUILD))
def test_remove_restores_unmodified_behaviour(models, inputs, name):
    model = models[name]
    ref = model(**inputs).logits
    install(model, ("visionzip", {}), "visionzip", retention=0.25)
    assert model(**inputs).logits.shape[1] < ref.shape[1]
    remove(model)
    assert not hasattr(model, "qapframe_last_selection") and not hasattr(model, "qapframe_installation")
    assert not {"get_image_features", "get_video_features"} & set(vars(model.model)) and "generate" not in vars(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.visual.modules())
    assert torch.equal(model(**inputs).logits, ref)


def _eager_received(monkeypatch, name, inputs, cap=None):
    """Per merged token: mean attention received in the scoring block, from eager attention weights
    (``cap``: only every ceil(S / cap)-th query of a frame of S patches counts, in the block's token order)."""
    import sys

    eager = BUILD[name](attn_implementation="eager")
    block = ADAPTERS[name]().feature_block(eager)
    target = eager.model.visual.blocks[block].attn
    module = sys.modules[type(target).__module__]
    original, seen = module.eager_attention_forward, []

    def recording(attn, *args, **kwargs):
        out, weights = original(attn, *args, **kwargs)
        if attn is target:
            seen.append(weights)  # [1, H, s, s] per frame
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    eager.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    stride = [1 if cap is None else -(-w.shape[-1] // cap) for w in seen]
    received = torch.cat([w[0, :, ::k].mean(dim=(0, 1)) for w, k in zip(seen, stride)])  # [S] in block order
    merged = received.view(-1, 4).mean(dim=1)
    if name == "qwen2_5_vl":
        merged = merged[torch.argsort(ADAPTERS[name]().block_order(eager, inputs["image_grid_thw"]))]
    return list(torch.split(merged, (inputs["image_grid_thw"].prod(-1) // 4).tolist()))


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
def test_cls_stand_in_is_the_eager_attention_each_merged_token_receives(models, inputs, name, monkeypatch):
    model = models[name]
    install(model, ("visionzip", {}), "topk", retention=0.5)
    try:
        model(**inputs)
        images = model.qapframe_installation.latest_images
        scores = [s.scores for s in model.qapframe_last_selection["selections"]]
    finally:
        remove(model)
    expected = _eager_received(monkeypatch, name, inputs)
    for im, score, exp in zip(images, scores, expected):
        assert (im.cls_attention - exp).abs().max() <= 1e-6
        assert torch.equal(score.argsort(), im.cls_attention.argsort())  # VisionZip ranks by it
        assert im.keys.shape == (im.num_tokens, 8)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
def test_cls_stand_in_averages_a_strided_subset_of_queries_beyond_its_cap(models, inputs, name, monkeypatch):
    """With fewer allowed queries than a frame's patches, the stand-in is the eager attention received from
    every ceil(S / cap)-th query of a frame of S patches (an estimate of the full mean, which it is not)."""
    cap = int(inputs["image_grid_thw"].prod(-1).min()) // 3  # strides of 3 and more on every image
    monkeypatch.setattr(type(ADAPTERS[name]()), "stand_in_queries", cap)
    model = models[name]
    install(model, ("visionzip", {}), "topk", retention=0.5)
    try:
        model(**inputs)
        images = model.qapframe_installation.latest_images
    finally:
        remove(model)
    strided = _eager_received(monkeypatch, name, inputs, cap=cap)
    full = _eager_received(monkeypatch, name, inputs)
    for im, exp, everything in zip(images, strided, full):
        assert (im.cls_attention - exp).abs().max() <= 1e-6
        # The tiny tower attends almost uniformly (1/96 per patch), so the subset moves the mean only ~1e-5:
        # still well outside the 1e-6 match above.
        assert (im.cls_attention - everything).abs().max() > 5e-6


def test_video_clip_is_pruned_across_its_frames(models):
    model = models["qwen2_5_vl"]
    clip = qwen_vl_inputs([(2, 8, 8), (2, 8, 12)], [3, 6], seed=3, video=True)  # two frames each: 32, 48 tokens
    full, _ = model.model.get_rope_index(clip["input_ids"], mm_token_type_ids=clip["mm_token_type_ids"],
                                         video_grid_thw=clip["video_grid_thw"], attention_mask=clip["attention_mask"])
    video = clip["input_ids"] == QWEN_VIDEO_ID
    assert all(full[0, r][video[r]].unique().numel() == 2 for r in range(2))  # two temporal positions per clip
    ref_logits, ref_tokens = model(**clip).logits, gen(model, clip)
    install(model, ("visionzip", {}), "visionzip", retention=1.0)
    try:
        assert torch.equal(model(**clip).logits, ref_logits) and torch.equal(gen(model, clip), ref_tokens)
    finally:
        remove(model)
    install(model, ("l2norm", {}), "topk", retention=0.25)
    try:
        tokens = gen(model, clip)
        selections = model.qapframe_last_selection["selections"]
    finally:
        remove(model)
    assert [s.num_tokens for s in selections] == [8, 12]  # one budget over both frames of a clip
    assert torch.equal(tokens[:, clip["input_ids"].shape[1] :], reference_generate(model, clip, selections)[0])


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])  # (Qwen3-VL splits a clip's prompt by frame)
def test_dycoke_prunes_clips_frame_by_frame_in_the_models_own_layout(models, name):
    model = models[name]
    clip = qwen_vl_inputs([(4, 8, 8), (4, 8, 12)], [3, 6], seed=4, video=True)  # 4 temporal tokens of 4x4, 4x6
    install(model, ("l2norm", {}), "dycoke", retention=0.5)
    try:
        tokens = gen(model, clip)
        info = model.qapframe_last_selection
    finally:
        remove(model)
    units, selections = info["units"], info["selections"]
    assert [u.grid for u in units] == [(4, 4, 4), (4, 4, 6)]
    full, _ = model.model.get_rope_index(clip["input_ids"], mm_token_type_ids=clip["mm_token_type_ids"],
                                         video_grid_thw=clip["video_grid_thw"], attention_mask=clip["attention_mask"])
    video = clip["input_ids"] == QWEN_VIDEO_ID
    for r, (t, h, w) in enumerate([u.grid for u in units]):
        position = full[:, r][:, video[r]]  # [3, N]: the model's temporal, row and column position of each token
        token = torch.arange(t * h * w)
        layout = torch.stack([token // (h * w), token % (h * w) // w, token % w])  # what `grid` claims
        position = position - position.amin(dim=1, keepdim=True)
        position[0] = position[0].unique(return_inverse=True)[1]  # temporal ids are scaled by the frame time
        assert torch.equal(position, layout)
        kept = selections[r].keep_index
        assert kept[: h * w].tolist() == list(range(h * w))  # the first frame is kept whole
        assert selections[r].num_tokens == t * h * w // 2
    assert torch.equal(tokens[:, clip["input_ids"].shape[1] :], reference_generate(model, clip, selections)[0])


MERGING_VIDEO_CASES = [("qwen2_5_vl", (("l2norm", {}), "prunevid")), ("qwen2_vl", (("l2norm", {}), "prunevid")),
                       ("qwen2_5_vl", (("visionzip", {}), "fastvid")), ("qwen2_vl", (("visionzip", {}), "holitom"))]


@pytest.mark.parametrize("name,case", MERGING_VIDEO_CASES, ids=str)
def test_merging_video_pruners_give_generate_the_merged_tokens_at_their_positions(models, name, case):
    model = models[name]
    clip = qwen_vl_inputs([(4, 8, 8), (4, 8, 12)], [3, 6], seed=5, video=True)
    install(model, *case, retention=0.25)
    try:
        tokens = gen(model, clip)
        selections = model.qapframe_last_selection["selections"]
    finally:
        remove(model)
    assert [s.num_tokens for s in selections] == [16, 24]
    assert all(s.kept_weights is not None for s in selections)
    assert torch.equal(tokens[:, clip["input_ids"].shape[1] :], reference_generate(model, clip, selections)[0])


def test_images_and_videos_in_one_prompt_are_pruned_in_prompt_order(models):
    """A row holding a clip then an image: features are matched to placeholders in prompt order."""
    model = models["qwen2_5_vl"]
    image = qwen_vl_inputs([(1, 8, 8)], [0], seed=4)
    clip = qwen_vl_inputs([(2, 8, 12)], [0], seed=5, video=True)
    row = [1, 9, 10, QWEN_START_ID] + [QWEN_VIDEO_ID] * 48 + [QWEN_END_ID, 11, QWEN_START_ID]
    row += [QWEN_IMAGE_ID] * 16 + [QWEN_END_ID, 12, 13]
    ids = torch.tensor([row])
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == QWEN_IMAGE_ID], types[ids == QWEN_VIDEO_ID] = 1, 2
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
              "pixel_values": image["pixel_values"], "image_grid_thw": image["image_grid_thw"],
              "pixel_values_videos": clip["pixel_values_videos"], "video_grid_thw": clip["video_grid_thw"]}
    install(model, ("l2norm", {}), "topk", retention=0.25)
    try:
        tokens = gen(model, prompt)
        info = model.qapframe_last_selection
        modalities = [im.modality for im in model.qapframe_installation.latest_images]
    finally:
        remove(model)
    assert modalities == ["video", "image"] and [s.num_tokens for s in info["selections"]] == [12, 4]
    assert torch.equal(tokens[:, ids.shape[1] :], reference_generate(model, prompt, info["selections"])[0])


def test_qwen3_in_llm_pruning_must_rank_after_the_deepstack_layers(models):
    model = models["qwen3_vl"]  # deepstack into LLM layer 0
    with pytest.raises(ValueError, match=r"deepstack features after its first 1 LLM layers"):
        install(model, ("fastv", {"k": 1}), retention=0.5)
    assert getattr(model, "qapframe_installation", None) is None


# -- quantization -------------------------------------------------------------------------------------------
QUANT_CASES = {
    "rtn-w4a4": {"name": "rtn", "scheme": "W4A4", "group_size": 32},
    "gptq-w4a16": {"name": "gptq", "scheme": "W4A16", "group_size": 32, "act_order": True},
    "awq-w4a8": {"name": "awq", "scheme": "W4A8", "group_size": 32, "grid_size": 5},
    "smoothquant-w8a8": {"name": "smoothquant", "scheme": "W8A8"},
    "hadamard+rtn-w4a4": {"name": "rtn", "scheme": "W4A4", "group_size": 32, "rotation": {"name": "hadamard"}},
}


@pytest.fixture(scope="module")
def calibration():
    """Single prompts (no padding) with their own grids, as `qapframe run` calibrates."""
    return [rows_of(qwen_vl_inputs([(1, 8, 8)], [3 + i % 3], seed=10 + i), 0) for i in range(4)]


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantizers_on_qwen2_5_vl_leave_the_vision_side_alone(inputs, calibration, case):
    import qapframe
    from qapframe.quantizers import QuantizedLinear

    reference = tiny_qwen2_5_vl()(**inputs).logits
    model = qapframe.quantize(tiny_qwen2_5_vl(), QUANT_CASES[case], calibration)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    expected = {n for n, m in tiny_qwen2_5_vl().named_modules()
                if isinstance(m, torch.nn.Linear) and ".language_model." in n}
    assert quantized == expected and len(expected) == 4 * 7  # the LLM's Linears (q/k/v with biases)
    assert all(type(m) is torch.nn.Linear for m in model.model.visual.modules() if isinstance(m, torch.nn.Linear))
    assert all(model.get_submodule(n).quantized for n in quantized)
    logits = model(**inputs).logits
    rel = float((logits - reference).norm() / reference.norm())
    assert 0 < rel < 0.6


def test_hadamard_rotation_keeps_qwen2_5_vl_logits(inputs):
    """The merger writes the rotated stream (its last Linear is rotated): vision tokens stay consistent."""
    from qapframe.quantizers.rotations.base import ROTATIONS

    model = tiny_qwen2_5_vl().double()
    for layer in model.model.language_model.layers:  # unit norms would hide a missed norm fusion
        layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    reference = model(**batch).logits
    merger_before = model.model.visual.merger.mlp[2].weight.clone()
    ROTATIONS.get("hadamard")(seed=0).apply(model)
    assert not torch.equal(model.model.visual.merger.mlp[2].weight, merger_before)
    assert float((model(**batch).logits - reference).norm() / reference.norm()) <= 1e-4


def test_layerwise_calibration_sees_the_m_rope_position_embeddings(calibration):
    """Block-by-block calibration replays layer 0's inputs: their rotary embeddings are the 3-D ones."""
    from qapframe.quantizers.calibration import capture_block_inputs

    model = tiny_qwen2_5_vl()
    lm = model.model.language_model
    sample = calibration[0]
    (captured,) = capture_block_inputs(model, lm.layers[0], [sample])
    cos, sin = captured.kwargs["position_embeddings"]
    positions, _ = model.model.get_rope_index(sample["input_ids"], mm_token_type_ids=sample["mm_token_type_ids"],
                                              image_grid_thw=sample["image_grid_thw"])
    hidden = captured.args[0] if captured.args else captured.kwargs["hidden_states"]
    expected_cos, expected_sin = lm.rotary_emb(hidden, positions)
    flat_cos, _ = lm.rotary_emb(hidden, torch.arange(sample["input_ids"].shape[1])[None])
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin) and not torch.equal(cos, flat_cos)


def _m_rope_positions(model, inputs, extra_ids=None):
    """The unpruned prompt's 3-D positions ``[3, B, L + T]`` (generated tokens: text continuing after it)."""
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    if extra_ids is not None:
        ids, mask = torch.cat([ids, extra_ids], 1), torch.cat([mask, torch.ones_like(extra_ids)], 1)
        types = torch.cat([types, torch.zeros_like(extra_ids)], 1)
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=inputs["image_grid_thw"],
                                              attention_mask=mask)
    return positions


IN_LLM_CASES = [("qwen2_vl", "fastv"), ("qwen2_5_vl", "fastv"), ("qwen2_5_vl", "dart"),
                ("qwen2_5_vl", "pyramiddrop"), ("qwen3_vl", "fastv"), ("qwen2_vl", "sparsevlm"),
                ("qwen2_5_vl", "sparsevlm")]


@pytest.mark.parametrize("name, method", IN_LLM_CASES)
def test_in_llm_pruning_keeps_the_3d_positions(models, inputs, name, method):
    """In-LLM pruning under real M-RoPE (left padding, different prompt lengths and grids): prefill logits equal
    the unmodified model's later layers recomputed on the kept tokens at their original 3-D positions, and
    cached `generate` matches that reference token for token. SparseVLM's merged tokens take their image's last
    placeholder's 3-D position."""
    from tests.models.test_strategies_on_adapters import check_merged_slots, install, remove, staged_reference

    model = models[name]
    install(model, method, 0.25)
    try:
        logits = model(**inputs).logits
        state, spans = model.qapframe_last_selection["state"], model.qapframe_last_selection["spans"]
        layers = list(model.qapframe_installation.inllm.layers)
        tokens = gen(model, inputs)
        generate_state = model.qapframe_last_selection["state"]
    finally:
        remove(model)
    if method == "sparsevlm":
        check_merged_slots(state, spans, inputs["input_ids"].shape[1])
    rest = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    expected, kept = staged_reference(model, rest, state, layers, positions=_m_rope_positions(model, inputs))
    assert (logits[kept] - expected[kept]).abs().max() <= 1e-4
    assert int(state.stages[-1].kept_mask.sum()) < int(inputs["attention_mask"].sum())
    new = tokens[:, inputs["input_ids"].shape[1]:]
    for step in range(NEW):
        extra = new[:, :step]
        step_logits, _ = staged_reference(model, rest, generate_state, layers, extra,
                                          positions=_m_rope_positions(model, inputs, extra))
        assert torch.equal(step_logits[:, -1].argmax(-1), new[:, step])


def test_layerwise_calibration_replays_qwen3_vl_deepstack_between_layers(calibration):
    """Each block gets, during block-by-block calibration, exactly what the model's own forward gives it:
    after layers 0 and 1 Qwen3-VL adds the deepstack features at the vision positions."""
    from qapframe.quantizers.calibration import calibrate_sequential

    model = tiny_qwen3_vl(deepstack=(0, 1))
    layers = model.model.language_model.layers
    real: list[list[torch.Tensor]] = [[] for _ in layers]

    def record(i):
        def hook(module, args, kwargs):
            real[i].append((args[0] if args else kwargs["hidden_states"]).clone())
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for sample in calibration:
        model(**sample)
    for handle in handles:
        handle.remove()

    replayed: list[list[torch.Tensor]] = []

    def process(data, modules):  # leaves every weight as it is: only what each block is fed is checked
        replayed.append([(inp.args[0] if inp.args else inp.kwargs["hidden_states"]) for inp in data.inputs])

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".language_model." in n}
    calibrate_sequential(model, linears, calibration, wrap=lambda linear: linear, process=process)
    assert len(replayed) == len(layers)
    for i in range(len(layers)):
        for got, want in zip(replayed[i], real[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- `qapframe run` end to end ---------------------------------------------------------------------------------
def _save_tiny_qwen2_5_vl_with_processor(directory) -> None:
    """The toy's word-level tokenizer (its ``<image>`` is the placeholder) and a Qwen2-VL image processor:
    64 px images -> 8 x 8 patches of 8 px -> 16 merged tokens."""
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from qapframe.toy import TOY_PATH

    tokenizer = AutoProcessor.from_pretrained(TOY_PATH).tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    n = len(tokenizer)  # ids past the vocabulary: the video and vision start/end tokens never occur
    text = dict(vocab_size=n + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"],
                eos_token_id=ids["</s>"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=8, temporal_patch_size=2,
                  spatial_merge_size=2, window_size=32, out_hidden_size=64, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"], video_token_id=n,
                              vision_start_token_id=n + 1, vision_end_token_id=n + 2)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["<s>"], ids["</s>"], ids["<pad>"]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                             size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64}).save_pretrained(directory)


def test_qapframe_run_on_a_local_qwen2_5_vl(tmp_path):
    import json

    import yaml

    from qapframe.cli import main

    model_dir = tmp_path / "tiny_qwen2_5_vl"
    _save_tiny_qwen2_5_vl_with_processor(model_dir)
    spec = {
        "model": {"path": str(model_dir)},
        "quantizer": {"name": "rtn", "scheme": "W4A8", "group_size": 32},
        "scorer": {"name": "visionzip"},
        "pruner": {"name": "visionzip", "retention": 0.25},
        "evaluation": {"num_samples": 4, "batch_size": 4, "max_new_tokens": 2, "calibration_samples": 2},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and record["metrics"]["retained_tokens"] == 4  # 16 merged tokens at 25 %
