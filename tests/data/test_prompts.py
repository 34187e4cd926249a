import pytest
from PIL import Image

from qapframe.data.base import VQARecord
from qapframe.data.prompts import build_prompt, format_choices, is_correct, normalize_answer
from qapframe.data.synthetic import make_record


def _record(answer, choices=None, question="What colour is it?"):
    return VQARecord("r", Image.new("RGB", (4, 4)), question, answer, choices)


def test_prompt_layout_has_one_image_placeholder_and_lettered_options():
    mc = build_prompt(_record("blue", ["red", "blue", "green"]))
    assert mc.count("<image>") == 1 and mc.startswith("USER: <image>\n") and mc.endswith("ASSISTANT:")
    assert "Options: A. red B. blue C. green" in mc
    short = build_prompt(_record("blue"))
    assert "Options" not in short and "What colour is it?" in short
    with pytest.raises(ValueError, match="at most 26 choices"):
        format_choices([str(i) for i in range(27)])


def test_normalization():
    assert normalize_answer("  The Top-Left. ") == "top left"
    assert normalize_answer("Three") == "3"
    assert normalize_answer("a red circle!") == "red circle"


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("blue", True), ("Blue.", True), (" BLUE ", True), ("B", True), ("b.", True), ("(B)", True),
        ("B. blue", True), ("b blue", True), ("option B", True),
        ("A", False), ("red", False), ("B. red", False), ("blue green", False), ("", False), ("C", False),
    ],
)
def test_multiple_choice_accepts_letter_or_text(prediction, expected):
    assert is_correct(prediction, _record("blue", ["red", "blue", "green"])) is expected


def test_letter_a_is_not_lost_to_article_removal():
    record = _record("red", ["red", "blue"])
    assert is_correct("A", record) and is_correct("a", record) and not is_correct("B", record)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [("3", "3", True), ("three", "3", True), ("top left", "top left", True), ("top", "top left", False),
     ("B", "blue", False), ("yes", "no", False), ("Yes.", "yes", True)],
)
def test_short_answer_is_normalized_exact_match(prediction, answer, expected):
    assert is_correct(prediction, _record(answer)) is expected


# A LLaVA-1.5-hf-style processor template: structured content, the image entry rendered as the placeholder.
HF_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _toy_processor():
    from transformers import AutoProcessor

    from qapframe.toy import TOY_PATH

    return AutoProcessor.from_pretrained(TOY_PATH)


def test_a_processor_without_chat_template_keeps_the_llava_layout():
    from qapframe.data.prompts import uses_chat_template

    processor = _toy_processor()
    record = make_record(0, "test", 3)
    assert not uses_chat_template(processor)
    assert build_prompt(record, processor) == build_prompt(record) and build_prompt(record).startswith("USER: <image>\n")


def test_the_processors_chat_template_formats_the_prompt_with_an_image_entry():
    from qapframe.data.prompts import uses_chat_template

    processor = _toy_processor()
    processor.chat_template = HF_LLAVA_TEMPLATE
    record = make_record(0, "test", 3)
    prompt = build_prompt(record, processor)
    assert uses_chat_template(processor)
    assert prompt == build_prompt(record)  # this template renders exactly LLaVA-1.5's layout
    inputs = processor(images=[record.image], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 64


def test_a_tokenizer_chat_template_gets_the_placeholder_as_text():
    processor = _toy_processor()
    processor.tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    record = make_record(0, "test", 3)
    assert build_prompt(record, processor).startswith(f"<|user|><image>\n{record.question}")
    assert build_prompt(record, processor).endswith("<|assistant|>")
