"""Prompt text for a VQA record and the answer matcher every evaluation uses.

The prompt follows the model's chat template (the processor's, else its tokenizer's), else the LLaVA-1.5
conversation layout (``USER: <image>\\n... ASSISTANT:``); the processor expands the single image placeholder
into one token per vision token.
"""

from __future__ import annotations

import re
import string

from qapframe.data.base import VQARecord

IMAGE_PLACEHOLDER = "<image>"
LETTERS = string.ascii_uppercase
SHORT_ANSWER_HINT = "Answer with a single word or phrase."
MULTIPLE_CHOICE_HINT = "Answer with the option's text."

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])
}
_PUNCT = re.compile(r"[^\w\s]")


def format_choices(choices: list[str]) -> str:
    """``Options: A. red B. blue ...``"""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "Options: " + " ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def build_prompt(record: VQARecord, processor=None) -> str:
    """The text fed to the processor together with ``record.image``, in the model's own chat format.

    The question, its choices and qapframe's answer hint form the user turn's text (see `chat_prompt`).
    """
    if record.choices:
        body = f"{record.question}\n{format_choices(record.choices)}\n{MULTIPLE_CHOICE_HINT}"
    else:
        body = f"{record.question}\n{SHORT_ANSWER_HINT}"
    return chat_prompt(body, processor)


def chat_prompt(body: str, processor=None) -> str:
    """One user turn holding one image and ``body``, with the assistant's turn opened.

    ``processor`` (a processor or a tokenizer) decides the format: the processor's chat template when it has
    its own (the user turn holds an image entry, then the text), else its tokenizer's (the image placeholder,
    then the text, as one string: e.g. smol-llava's SmolLM2); without either, the LLaVA-1.5 layout
    ``USER: <image>\\n... ASSISTANT:``. lmms-eval's tasks bring their own ``body`` (qapframe.integrations).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    placeholder = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    processor_template = getattr(processor, "chat_template", None) if tokenizer is not processor else None
    # A processor saved beside a text LLM's tokenizer may carry that tokenizer's template (string content only).
    if processor_template and processor_template != getattr(tokenizer, "chat_template", None):
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": body}]}]
        return processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    if getattr(tokenizer, "chat_template", None):
        turn = [{"role": "user", "content": f"{placeholder}\n{body}"}]
        return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return f"USER: {placeholder}\n{body}\nASSISTANT:"


def uses_chat_template(processor) -> bool:
    """Whether `build_prompt` formats prompts for ``processor`` with a chat template."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return bool(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))


def normalize_answer(text: str) -> str:
    """Lower case, punctuation dropped, number words as digits, articles and extra spaces removed."""
    words = _PUNCT.sub(" ", text.lower()).split()
    words = [_NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def is_correct(prediction: str, record: VQARecord) -> bool:
    """Normalized exact match; for multiple choice the letter, the text, or ``letter. text`` all count."""
    pred = normalize_answer(prediction)
    answer = normalize_answer(record.answer)
    if pred == answer:
        return True
    if not record.choices:
        return False
    normalized = [normalize_answer(c) for c in record.choices]
    if answer not in normalized:
        return False
    letter = LETTERS[normalized.index(answer)].lower()
    # Letters are matched on the raw text too: "A" must count even though normalization drops the article "a".
    raw = _PUNCT.sub(" ", prediction.lower()).split()
    if raw and raw[0] in (letter, f"({letter})"):
        rest = " ".join(raw[1:])
        return rest == "" or normalize_answer(rest) == answer
    return pred in (letter, f"{letter} {answer}", f"option {letter}")


__all__ = ["IMAGE_PLACEHOLDER", "build_prompt", "format_choices", "is_correct", "normalize_answer", "uses_chat_template"]
