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
    args = parse_args(["--out", "unused", "--caption-prob", "0", "--drop-prob", "0"])
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
