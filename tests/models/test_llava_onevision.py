"""LLaVA-OneVision adapter on a tiny real `LlavaOnevisionForConditionalGeneration` (SigLIP, anyres, Qwen2, video).

The tiny model is saved with `save_pretrained` and loaded back with `from_pretrained` (sdpa), so the weights
under test are what a user's checkpoint would give; the eager twin for the attention check is the same files.
"""

import copy
import json

import pytest
import torch
import yaml
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

from qapframe.models import adapter_for
from qapframe.models.llava_onevision import LlavaOnevisionAdapter
from qapframe.strategies.base import PRUNERS, SCORERS
from tests.tiny_models import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VIDEO_TOKEN_ID,
    llava_onevision_inputs,
    llava_onevision_video_inputs,
    tiny_llava_onevision,
)


@pytest.fixture(autouse=True)
def _inference_only():
    """No autograd in this module's tests (a module-level switch would leak into every later test)."""
    with torch.no_grad():
        yield


NEW = 5
SIZES = [(32, 64), (64, 64), (30, 50)]  # a 1 x 2 grid; a 2 x 2 grid shrunk by anyres_max_2; an unpadded 1 x 2 grid


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_onevision")
    tiny_llava_onevision(seed=0, num_layers=3).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def images(model):
    return llava_onevision_inputs(model, SIZES, [4, 7, 2], seed=2)


@pytest.fixture(scope="module")
def video(model):
    return llava_onevision_video_inputs(model, num_frames=2, prompt_lengths=[5], seed=3)


@pytest.fixture(scope="module")
def mixed(model, images, video):
    """One prompt with a clip first and an image after it: the selections must follow prompt order."""
    n_video = int((video["input_ids"] == VIDEO_TOKEN_ID).sum())
    n_image = int((images["input_ids"][0] == IMAGE_TOKEN_ID).sum())
    ids = [1, 9, *[VIDEO_TOKEN_ID] * n_video, 11, 12, *[IMAGE_TOKEN_ID] * n_image, 13, 14, 15]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": images["pixel_values"][:1],
        "image_sizes": images["image_sizes"][:1],
        "pixel_values_videos": video["pixel_values_videos"],
    }


@pytest.fixture(scope="module")
def multi(images):
    """One prompt with two images (``batch_num_images = [2]``): each is its base crop plus one newline."""
    ids = [1, 9, *[IMAGE_TOKEN_ID] * 17, 11, *[IMAGE_TOKEN_ID] * 17, 12, 13]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": images["pixel_values"][:2],
        "image_sizes": images["image_sizes"][:2],
        "batch_num_images": torch.tensor([2]),
    }


def gen(model, **inputs):
    return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def install(model, scorer, pruner="topk", **kw):
    return adapter_for(model).install(model, SCORERS.get(scorer[0])(**scorer[1]), PRUNERS.get(pruner)(**kw))


def remove(model):
    LlavaOnevisionAdapter().remove(model)


def test_adapter_is_picked_by_matches(model):
    assert isinstance(adapter_for(model), LlavaOnevisionAdapter)
    assert model.model.language_model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # Qwen2's biases are live


@pytest.mark.parametrize("kind", ["images", "video", "mixed", "multi"])
@pytest.mark.parametrize("scorer", [("visionzip", {}), ("fastv", {"k": 2})], ids=lambda s: s[0])
def test_full_retention_is_bit_identical(model, request, kind, scorer):  # every other method: the shared test
    inputs = request.getfixturevalue(kind)
    ref_logits, ref_tokens = model(**inputs).logits, gen(model, **inputs)
    install(model, scorer, retention=1.0)
    try:
        logits, tokens = model(**inputs).logits, gen(model, **inputs)
    finally:
        remove(model)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


MODALITIES = {  # each prompt's vision units, in prompt order
    "images": ["image"] * 3, "video": ["video"], "mixed": ["video", "image"], "multi": ["image"] * 2,
}


@pytest.mark.parametrize("kind", list(MODALITIES))
@pytest.mark.parametrize("scorer", [("visionzip", {}), ("fastv", {"k": 2})], ids=lambda s: s[0])
def test_units_follow_the_prompt_keep_their_newlines_and_have_one_budget_each(model, request, kind, scorer):
    inputs = request.getfixturevalue(kind)
    install(model, scorer, retention=0.25)
    try:
        model(**inputs)
        units = model.qapframe_installation.latest_images
        info = model.qapframe_last_selection
    finally:
        remove(model)
    assert [u.modality for u in units] == MODALITIES[kind]
    newline = model.model.image_newline
    for unit, sel, (row, positions) in zip(units, info["selections"], info["spans"]):
        placeholder = VIDEO_TOKEN_ID if unit.modality == "video" else IMAGE_TOKEN_ID
        assert (inputs["input_ids"][row, positions] == placeholder).all()  # each unit sits on its own run
        is_newline = (unit.features == newline).all(-1)
        assert torch.equal(is_newline, ~unit.prunable)  # structural tokens are exactly the newlines
        if unit.cls_attention is not None:
            assert unit.cls_attention[is_newline].eq(0).all() and unit.cls_attention[~is_newline].gt(0).all()
        patches = int(unit.prunable.sum())
        assert sel.keep_index.numel() == round(0.25 * patches) + int(is_newline.sum())  # one budget per image / clip
        assert is_newline[sel.keep_index].sum() == is_newline.sum()
        if unit.modality == "video":  # both frames' 2 x 2 pooled tokens, then one newline for the whole clip
            assert unit.num_tokens == 2 * 4 + 1 and torch.equal(unit.prunable, torch.arange(9) < 8)
        if kind == "multi":  # several images in one sample: the base crop and one newline each
            assert unit.num_tokens == 16 + 1 and torch.equal(unit.prunable, torch.arange(17) < 16)


def _eager_mean_received(eager, pixels):
    """``pixels [C, 3, H, W]`` -> eager attention probabilities of the feature layer, mean over heads and queries."""
    out = eager.model.vision_tower(pixels, output_attentions=True)
    return out.attentions[-1].mean(dim=(1, 2))  # vision_feature_layer -1: the last layer, [C, S]


def test_stand_in_attention_matches_eager_attention(model_dir, model, images, video):
    eager = LlavaOnevisionForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval()
    install(model, ("visionzip", {}), retention=0.5)
    try:
        model(**images)
        stills = model.qapframe_installation.latest_images
        model(**video)
        clip = model.qapframe_installation.latest_images[0]
    finally:
        remove(model)
    crops = [3, 5, 3]  # base view + grid crops per image (image_size_to_num_patches)
    expected = _eager_mean_received(eager, torch.cat([images["pixel_values"][i, :c] for i, c in enumerate(crops)]))
    per_image = torch.split(expected, crops)
    for image, want in zip(stills, per_image):
        assert (image.cls_attention[:16] - want[0]).abs().max() <= 1e-6  # packed: the base crop comes first
    # image 0 (32 x 64) is a 1 x 2 grid, neither unpadded nor shrunk: row r = crop 1's row r, crop 2's row r, newline
    grid = torch.cat([per_image[0][1].view(4, 4), per_image[0][2].view(4, 4), torch.zeros(4, 1)], dim=1)
    assert (stills[0].cls_attention[16:] - grid.flatten()).abs().max() <= 1e-6
    # the clip: each frame's scores pooled 2 x 2 bilinearly, as the model pools the frame's features
    frames = _eager_mean_received(eager, video["pixel_values_videos"][0]).view(2, 1, 4, 4)
    pooled = torch.nn.functional.interpolate(frames, size=[2, 2], mode="bilinear").flatten()
    assert (clip.cls_attention[:8] - pooled).abs().max() <= 1e-6 and clip.cls_attention[8] == 0


def _runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(start, end, placeholder id)`` of each run of vision placeholders in one row ``ids [L]``, in order."""
    runs, i = [], 0
    while i < len(ids):
        j = i
        if int(ids[i]) in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID):
            while j + 1 < len(ids) and ids[j + 1] == ids[i]:
                j += 1
            runs.append((i, j + 1, int(ids[i])))
        i = j + 1
    return runs


def reference_generate(model, inputs, selections):
    """Greedy decoding of the unmodified model fed only the kept vision tokens (a shortened, left-padded prompt)."""
    features = {IMAGE_TOKEN_ID: [], VIDEO_TOKEN_ID: []}  # per kind, in prompt order
    if "pixel_values" in inputs:
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                             batch_num_images=inputs.get("batch_num_images"))
        features[IMAGE_TOKEN_ID] = list(out.pooler_output)
    if "pixel_values_videos" in inputs:
        features[VIDEO_TOKEN_ID] = list(model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output)
    rows, kept = [], {IMAGE_TOKEN_ID: [], VIDEO_TOKEN_ID: []}
    selections = iter(selections)  # one per placeholder run, in prompt order
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids = ids[mask.bool()]
        pieces, cursor = [], 0
        for start, end, token in _runs(ids):
            tokens = next(selections).tokens(features[token].pop(0))
            kept[token].append(tokens)
            pieces += [ids[cursor:start], torch.full((tokens.shape[0],), token)]
            cursor = end
        rows.append(torch.cat(pieces + [ids[cursor:]]))
    width = max(len(r) for r in rows)
    short, mask = torch.full((len(rows), width), PAD_TOKEN_ID), torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        short[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    embeds = model.get_input_embeddings()(short)
    for token, values in kept.items():
        if values:
            embeds = embeds.masked_scatter((short == token)[..., None], torch.cat(values))
    return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize(
    "kind,scorer,pruner",
    [
        ("images", ("hybrid", {}), "topk"),
        ("images", ("visionzip", {}), "visionzip"),
        ("video", ("hybrid", {}), "topk"),
        ("video", ("visionzip", {}), "vispruner"),
        ("mixed", ("visionzip", {}), "visionzip"),
        ("mixed", ("l2norm", {}), "tome"),
        ("mixed", ("l2norm", {}), "prunevid"),
        ("mixed", ("visionzip", {}), "fastvid"),
        ("video", ("visionzip", {}), "fastvid"),
        ("video", ("visionzip", {}), "holitom"),
        ("multi", ("hybrid", {}), "topk"),
    ],
)
def test_pruned_generate_equals_the_model_fed_only_kept_tokens(model, request, kind, scorer, pruner):
    inputs = request.getfixturevalue(kind)
    install(model, scorer, pruner, retention=0.25)
    try:
        tokens = gen(model, **inputs)
        selections = model.qapframe_last_selection["selections"]
    finally:
        remove(model)
    if kind == "images":
        assert len({s.num_tokens for s in selections}) > 1  # rows shrink by different amounts
    if kind == "mixed":  # prompt order: the clip, then the image
        assert [s.num_tokens for s in selections] == [round(0.25 * 8) + 1, round(0.25 * 48) + 4]
    length = inputs["input_ids"].shape[1]
    assert torch.equal(tokens[:, length:], reference_generate(model, inputs, selections))


def pruned_clips(model, seed: int, pruner: str, retention: float) -> dict:
    """Two 4-frame clips pruned by ``pruner``: the selection info, after checking generate against the
    model fed only the kept (merged) tokens."""
    clips = llava_onevision_video_inputs(model, num_frames=4, prompt_lengths=[5, 7], seed=seed)
    install(model, ("l2norm", {}), pruner, retention=retention)
    try:
        tokens = gen(model, **clips)
        info = model.qapframe_last_selection
    finally:
        remove(model)
    length = clips["input_ids"].shape[1]
    assert torch.equal(tokens[:, length:], reference_generate(model, clips, info["selections"]))
    return info


def test_dycoke_keeps_the_first_frame_whole_and_spreads_the_rest_over_the_others(model):
    info = pruned_clips(model, 6, "dycoke", 0.5)
    for unit, selection in zip(info["units"], info["selections"]):
        assert unit.grid == (4, 2, 2) and unit.num_tokens == 4 * 4 + 1  # 2 x 2 pooled frames, then the newline
        kept = selection.keep_index.tolist()
        frames = [sum(1 for i in kept if i // 4 == f) for f in range(4)]
        assert frames == [4, 2, 1, 1] and kept[-1] == 16  # 8 of 16: frame 0 whole, 4 over frames 1-3; the newline


def test_prunevid_merges_each_clip_to_its_budget_within_its_frames(model):
    info = pruned_clips(model, 7, "prunevid", 0.25)
    for unit, selection in zip(info["units"], info["selections"]):
        assert unit.grid == (4, 2, 2) and selection.num_tokens == 4 + 1  # 25 % of 16, then the newline
        assert selection.keep_index[-1] == 16 and torch.equal(selection.kept_weights[-1, 16], torch.tensor(1.0))


@pytest.mark.parametrize("scorer", [("hybrid", {}), ("fastv", {"k": 2})], ids=lambda s: s[0])
def test_batch_of_three_equals_single_runs(model, images, scorer):
    install(model, scorer, retention=0.5)
    try:
        batch = gen(model, **images)
        batch_kept = [s.keep_index for s in model.qapframe_last_selection["selections"]]
        for i in range(3):
            mask = images["attention_mask"][i].bool()
            single = {
                "input_ids": images["input_ids"][i : i + 1, mask],
                "attention_mask": images["attention_mask"][i : i + 1, mask],
                "pixel_values": images["pixel_values"][i : i + 1],
                "image_sizes": images["image_sizes"][i : i + 1],
            }
            assert torch.equal(gen(model, **single)[0, -NEW:], batch[i, -NEW:])
            assert torch.equal(model.qapframe_last_selection["selections"][0].keep_index, batch_kept[i])
    finally:
        remove(model)


@pytest.mark.parametrize("scorer", [("hybrid", {}), ("fastv", {"k": 2})], ids=lambda s: s[0])
def test_remove_restores_the_unmodified_model(model, images, video, scorer):
    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    ref, before = (model(**images).logits, gen(model, **video)), hooks()
    install(model, scorer, retention=0.25)
    pruned = model(**images).logits
    remove(model)
    assert pruned.shape != ref[0].shape or not torch.equal(pruned, ref[0])
    for obj, names in ((model, ("generate", "qapframe_installation", "qapframe_last_selection")),
                       (model.model, ("get_image_features", "get_video_features"))):
        assert not set(names) & set(vars(obj))  # the instance attributes are gone: the class methods show again
    assert hooks() == before
    assert torch.equal(model(**images).logits, ref[0]) and torch.equal(gen(model, **video), ref[1])


# -- quantization of the LLM ----------------------------------------------------------------------------------------
QUANTIZERS = {
    "rtn-w4a16": {"name": "rtn", "scheme": "W4A16", "group_size": 32},
    "gptq-w4a16": {"name": "gptq", "scheme": "W4A16", "group_size": 32},
    "rtn-w4a4-hadamard": {"name": "rtn", "scheme": "W4A4", "group_size": 32, "rotation": {"name": "hadamard"}},
    "gptq-w4a4-hadamard": {"name": "gptq", "scheme": "W4A4", "group_size": 32, "rotation": {"name": "hadamard"}},
}


@pytest.mark.parametrize("case", list(QUANTIZERS))
def test_quantized_llm_with_pruning_through_the_pipeline(model, images, video, case):
    from qapframe.pipeline import Pipeline
    from qapframe.quantizers import QuantizedLinear

    calibration = [llava_onevision_inputs(model, [s], [3 + i], seed=10 + i) for i, s in enumerate(SIZES)]
    calibration.append(video)
    pipeline = Pipeline.from_spec({"quantizer": QUANTIZERS[case], "scorer": {"name": "visionzip"},
                                   "pruner": {"name": "topk", "retention": 0.5}})
    quantized = pipeline.apply(copy.deepcopy(model), calibration)
    names = {n for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".language_model." in n}
    assert names == expected and len(expected) == 3 * 7  # the LLM only: vision tower, projector, lm_head stay fp
    assert all((m.act_quant is None) == case.endswith("w4a16") for n, m in quantized.named_modules() if n in names)
    for inputs in (images, video):
        tokens = gen(quantized, **inputs)
        assert tokens.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + NEW)
        assert quantized.qapframe_last_selection["selections"]
    adapter_for(quantized).remove(quantized)
    rel = float((quantized(**images).logits - model(**images).logits).norm() / model(**images).logits.norm())
    assert 0 < rel < 0.6


def test_hadamard_rotation_keeps_the_fp_function_for_images_and_video(model, images, video):
    """The newline parameter, the bilinear shrinking and the frame pooling are all linear: they commute with Q."""
    from qapframe.quantizers.rotations import ROTATIONS

    reference, rotated = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    ROTATIONS.get("hadamard")(seed=0).apply(rotated)
    for inputs in (images, video):
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        ref = reference(**inputs).logits
        assert float((rotated(**inputs).logits - ref).norm() / ref.norm()) <= 1e-6  # as for LLaVA: ~1e-7


# -- qapframe run on a saved OneVision directory --------------------------------------------------------------------
PATCH = 16  # 64 px synthetic images, 16 tokens per crop


def save_tiny_onevision_dir(directory, seed: int = 0):
    """A tiny OneVision over the toy's tokenizer (plus a ``<video>`` token) with its image processor;
    returns ``(tokenizer, image_processor, processor settings)`` for building the processor."""
    from transformers import (
        AutoProcessor, LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig,
    )

    from qapframe.data.synthetic import IMAGE_SIZE
    from qapframe.toy import TOY_PATH

    tokenizer = AutoProcessor.from_pretrained(TOY_PATH).tokenizer
    tokenizer.add_tokens(["<video>"], special_tokens=True)  # its own id: the unknown token must not mark video
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                      image_grid_pinpoints=pinpoints)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>", "<video>")}
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=special["<pad>"], bos_token_id=special["<s>"],
                                eos_token_id=special["</s>"]),
        image_token_index=special["<image>"],
        video_token_index=special["<video>"],
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=special["<pad>"],
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = special["<s>"], special["</s>"]
    generation.pad_token_id = special["<pad>"]
    model.save_pretrained(directory)
    settings = {"num_image_tokens": (IMAGE_SIZE // PATCH) ** 2, "vision_feature_select_strategy": "full",
                "vision_aspect_ratio": "anyres_max_9"}
    return tokenizer, image_processor, settings


def _run_spec(tmp_path, model_dir) -> list[dict]:
    from qapframe.cli import main

    spec = {
        "model": {"path": str(model_dir)},
        "quantizer": {"name": "rtn", "scheme": "W4A16", "group_size": 32},
        "scorer": {"name": "visionzip"},
        "pruner": {"name": "topk", "retention": 0.5},
        "sweep": {"scorer": [{"name": "visionzip"}, {"name": "fastv", "k": 1}]},  # pre-LLM and in-LLM
        "evaluation": {"num_samples": 4, "batch_size": 2, "max_new_tokens": 2, "calibration_samples": 2},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 0
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def _check_rows(rows):
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for row in rows:  # half of each image's 16 + 16 patch tokens, plus its 4 newlines, of 36 tokens
        assert row["metrics"]["dense_tokens"] == 36 and row["metrics"]["retained_tokens"] == 20


def test_qapframe_run_end_to_end_with_the_saved_processor(tmp_path):
    """The real `LlavaOnevisionProcessor` loaded by `AutoProcessor`: in transformers 5 its video processor
    needs torchvision, so this runs only where torchvision is installed (see the next test otherwise)."""
    pytest.importorskip("torchvision")

    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    tokenizer, image_processor, settings = save_tiny_onevision_dir(tmp_path / "model")
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(), **settings)
    processor.save_pretrained(tmp_path / "model")
    _check_rows(_run_spec(tmp_path, tmp_path / "model"))


class _ImagesOnlyOnevisionProcessor:
    """`LlavaOnevisionProcessor`'s image path (its own token-count code) without the video processor, which
    transformers 5 cannot build without torchvision: the processor stand-in for `qapframe run` here."""

    _get_number_of_features = LlavaOnevisionProcessor._get_number_of_features
    _get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features

    def __init__(self, tokenizer, image_processor, num_image_tokens, vision_feature_select_strategy,
                 vision_aspect_ratio):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.vision_aspect_ratio = num_image_tokens, vision_aspect_ratio
        assert vision_feature_select_strategy == "full"

    def __call__(self, images, text, return_tensors="pt", padding=True):
        from transformers import BatchFeature

        pixels = self.image_processor(images, return_tensors=return_tensors)
        height, width = pixels["pixel_values"].shape[-2:]
        expanded = []
        for prompt, size in zip(text, pixels["image_sizes"].tolist()):
            count = self._get_number_of_features(size[0], size[1], height, width)
            expanded.append(prompt.replace("<image>", "<image>" * count, 1))
        tokens = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding)
        return BatchFeature({**tokens, **pixels})


def test_qapframe_run_end_to_end_on_the_saved_directory(tmp_path, monkeypatch):
    """`model.path` names the saved directory; the model comes through `from_pretrained` and the adapter is
    picked by architecture. Only the processor is the images-only stand-in (no torchvision here)."""
    import qapframe.eval.loading as loading

    tokenizer, image_processor, settings = save_tiny_onevision_dir(tmp_path / "model")
    processor = _ImagesOnlyOnevisionProcessor(tokenizer, image_processor, **settings)
    monkeypatch.setattr(loading, "load_processor", lambda spec: processor)
    _check_rows(_run_spec(tmp_path, tmp_path / "model"))


def test_without_torchvision_loading_the_processor_says_what_to_install(tmp_path):
    """transformers cannot build the real processor without torchvision: one clear line, not a traceback."""
    import importlib.util

    from qapframe.errors import QapframeError
    from qapframe.eval.loading import load_processor
    from qapframe.spec import ModelSpec

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the real processor loads")
    save_tiny_onevision_dir(tmp_path / "model")
    with pytest.raises(QapframeError, match=r"LLaVA-OneVision processor needs torchvision.*pip install torchvision"):
        load_processor(ModelSpec(path=str(tmp_path / "model")))
