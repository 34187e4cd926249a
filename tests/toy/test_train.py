"""The toy's training batches: captions and questions are laid out as the model is later prompted."""

import random

import torch

from qapframe.data.synthetic import POSITIONS, make_record
from qapframe.toy.model import CAPTION_PROMPT, EOS_ID, UNK_ID, build_model, build_processor, build_tokenizer
from qapframe.toy.train import batch_loss, caption, parse_args


def test_caption_lists_every_object_in_reading_order_with_known_words():
    tokenizer = build_tokenizer()
    for index in range(50):
        record = make_record(0, "train", index)
        text = caption(record)
        parts = [p.strip() for p in text.split(".") if p.strip()]
        objects = record.meta["objects"]
        assert len(parts) == len(objects)
        cells = [POSITIONS.index(" ".join(p.split()[2:])) for p in parts]
        assert cells == sorted(cells)
        assert {tuple(p.split()[:2]) for p in parts} == {(c, s) for c, s, _ in objects}
        ids = tokenizer(CAPTION_PROMPT + " " + text)["input_ids"]
        assert UNK_ID not in ids


def test_batch_loss_is_the_answer_token_cross_entropy():
    """With no captions and no dropping, the loss equals cross-entropy of answer + </s> through the processor path."""
    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0).eval()
    record = make_record(0, "train", 7)
    args = parse_args(["--out", "unused", "--caption-prob", "0", "--drop-prob", "0", "--questions-per-image", "1"])
    with torch.no_grad():
        loss = batch_loss(model, processor, [record], random.Random(0), args)
        from qapframe.data.prompts import build_prompt

        inputs = processor(images=[record.image], text=[build_prompt(record)], return_tensors="pt")
        target = processor.tokenizer(" " + record.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
        t = len(target)
        expected = torch.nn.functional.cross_entropy(logits[-t - 1 : -1], torch.tensor(target))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_multi_turn_loss_is_the_cross_entropy_of_every_answer_of_the_conversation():
    """Three question turns about one image: the loss is the mean CE over all answer tokens, as computed
    through the processor on the LLaVA conversation text ``USER: <image> Q1 ASSISTANT: A1</s>USER: Q2 ...``."""
    from qapframe.data.prompts import build_prompt
    from qapframe.data.synthetic import follow_up_questions

    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0).eval()
    record = make_record(0, "train", 11)
    args = parse_args(["--out", "unused", "--caption-prob", "0", "--drop-prob", "0", "--questions-per-image", "3"])
    turns = [record, *follow_up_questions(record, 2, args.data_seed)]
    assert len({t.question + str(t.choices) for t in turns}) > 1 and all(t.image is record.image for t in turns)
    text = "".join(
        (build_prompt(t) if i == 0 else build_prompt(t).replace("<image>\n", "")) + " " + t.answer + "</s>"
        for i, t in enumerate(turns)
    )
    with torch.no_grad():
        loss = batch_loss(model, processor, [record], random.Random(0), args)
        inputs = processor(images=[record.image], text=[text], return_tensors="pt")
        ids = inputs["input_ids"][0]
        logits = model(**inputs).logits[0]
    tokenizer = processor.tokenizer
    positions, targets, cursor = [], [], 0
    for t in turns:  # locate each answer (+ </s>) after its ASSISTANT: marker
        target = tokenizer(" " + t.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        colon = tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
        while ids[cursor : cursor + len(colon)].tolist() != colon:
            cursor += 1
        start = cursor + len(colon)
        assert ids[start : start + len(target)].tolist() == target
        positions += list(range(start, start + len(target)))
        targets += target
        cursor = start + len(target)
    expected = torch.nn.functional.cross_entropy(logits[torch.tensor(positions) - 1], torch.tensor(targets))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
