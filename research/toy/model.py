"""Builders for the toy LLaVA: word-level tokenizer, LLaVA processor, and the untrained model.

The toy is a real `LlavaForConditionalGeneration` (CLIP vision tower, two-layer GELU projector,
LLaMA LLM with RMSNorm and RoPE) laid out like LLaVA-1.5: CLS dropped, features from layer -2.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from qapframe.data.prompts import LETTERS, build_prompt
from qapframe.data.synthetic import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, make_record

PATCH_SIZE = 8
NUM_VISION_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped ("default" select strategy)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, UNK_ID = range(len(SPECIAL_TOKENS))
# The training-only captioning prompt (LLaVA's stage-1 "feature alignment" task); its words join the vocabulary.
CAPTION_PROMPT = "USER: <image>\nDescribe the image.\nASSISTANT:"
# Records scanned for words: enough that every template/value combination appears.
_VOCAB_SCAN = 3000

# Sizes: a few million parameters, evaluation of ~200 questions in seconds on 2 CPU cores.
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=12)
LLM_INIT_STD = 0.072  # initial standard deviation of every LLM weight matrix (`build_model`)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Whitespace()  # words and punctuation runs


def build_vocab() -> list[str]:
    """Every word of the synthetic benchmark's prompts and answers, in a fixed order."""
    texts = [*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *POSITIONS, *LETTERS, *map(str, range(10)), "yes", "no",
             CAPTION_PROMPT.replace("<image>", " "), "."]
    for i in range(_VOCAB_SCAN):
        record = make_record(0, "train", i)
        texts.append(build_prompt(record).replace("<image>", " "))
        texts.append(record.answer)
    words: dict[str, None] = {}
    pre = _pre_tokenizer()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text.lower()):
            words.setdefault(word, None)
    return [*SPECIAL_TOKENS, *sorted(words)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lower-cased, ``<s>`` prepended; left padding for batched generation."""
    vocab = {w: i for i, w in enumerate(build_vocab())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
        extra_special_tokens={"image_token": "<image>"},
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """CLIP preprocessing at the toy's resolution; ``<image>`` expands to `NUM_VISION_TOKENS` tokens."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )


def check_llm_heads(heads: int) -> None:
    """Refuse a head count that does not split the LLM's width evenly; callers prefix their own name."""
    if heads < 1 or TEXT["hidden_size"] % heads:
        raise ValueError(f"must divide the LLM width {TEXT['hidden_size']}, got {heads}")


def build_config(vocab_size: int, llm_heads: int | None = None) -> LlavaConfig:
    """The toy's config; ``llm_heads`` splits the LLM's width into that many attention heads (None: `TEXT`'s)."""
    text_sizes = dict(TEXT)
    if llm_heads is not None:
        try:
            check_llm_heads(llm_heads)
        except ValueError as error:
            raise ValueError(f"llm_heads: {error}") from None
        text_sizes.update(num_attention_heads=llm_heads, num_key_value_heads=llm_heads,
                          head_dim=TEXT["hidden_size"] // llm_heads)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=VISION["hidden_size"], **VISION)
    text = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        **text_sizes,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=NUM_VISION_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=PAD_ID,
    )


def redraw_llm_weights(language_model: torch.nn.Module, lm_head: torch.nn.Linear, std: float, seed: int) -> None:
    """Every weight matrix of a LLaMA LLM and its LM head drawn anew from N(0, std^2); norms and the rest untouched.

    Its own generator, so every other initial weight stays what the model's seed gave.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    matrices = [m.weight for m in language_model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    with torch.no_grad():
        for weight in [*matrices, lm_head.weight]:
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        language_model.embed_tokens.weight[PAD_ID] = 0  # padding stays a zero vector


def build_model(vocab_size: int, seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised toy LLaVA (float32, CPU), initialised from ``seed``.

    Every weight matrix of the LLM (word embeddings, attention and MLP Linears, LM head) is redrawn at
    `LLM_INIT_STD`, about 1/sqrt(width), instead of LLaMA's 0.02: at the toy's width of 192, 0.02 starts
    query-key products near zero, attention stays uniform and learns to select tokens late; with stages 0b
    and 0c, 0.072 is what makes the LLM count (docs/toy.md).
    """
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(vocab_size, TEXT["num_attention_heads"]))
    redraw_llm_weights(model.model.language_model, model.lm_head, LLM_INIT_STD, seed)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    gen.do_sample = False
    return model


__all__ = ["CAPTION_PROMPT", "LLM_INIT_STD", "NUM_VISION_TOKENS", "PATCH_SIZE", "build_config", "build_model",
           "build_processor", "build_tokenizer", "check_llm_heads", "redraw_llm_weights"]
