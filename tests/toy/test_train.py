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
    args = parse_args(["--out", "unused", "--caption-prob", "0", "--drop-prob", "0", "--questions-per-image", "1",
                       "--prompt-loss-weight", "0"])
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
    args = parse_args(["--out", "unused", "--caption-prob", "0", "--drop-prob", "0", "--questions-per-image", "3",
                       "--prompt-loss-weight", "0"])
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


def test_equal_question_weights_keep_the_benchmarks_own_record_stream():
    import itertools

    from qapframe.toy.train import question_type_weights, training_records

    stream = training_records(0, question_type_weights(""), seed=0)
    assert [r.id for r in itertools.islice(stream, 40)] == [make_record(0, "train", i).id for i in range(40)]


def test_curriculum_draws_easy_scenes_for_the_first_records_only():
    import itertools

    from qapframe.toy.train import question_type_weights, training_records

    stream = training_records(0, question_type_weights(""), seed=0, min_objects=1, easy_records=200)
    records = list(itertools.islice(stream, 240))
    assert [r.id for r in records[:200]] == [make_record(0, "train", i, min_objects=1).id for i in range(200)]
    assert [r.id for r in records[200:]] == [make_record(0, "train", i).id for i in range(200, 240)]
    assert min(len(r.meta["objects"]) for r in records[:200]) == 1
    assert min(len(r.meta["objects"]) for r in records[200:]) == 3
    whole_run = training_records(0, question_type_weights(""), seed=0, min_objects=1)  # no end: every record
    assert all(r.id.endswith("-min1") for r in itertools.islice(whole_run, 50))
    # with question weights the curriculum still covers the first easy_records records *kept*
    weighted = training_records(0, question_type_weights("colour=0.1"), seed=0, min_objects=1, easy_records=30)
    kept = list(itertools.islice(weighted, 40))
    assert [r.id.endswith("-min1") for r in kept] == [True] * 30 + [False] * 10


def test_bad_curriculum_flags_are_refused_naming_the_flag(capsys):
    import pytest

    from qapframe.toy.train import parse_args

    for flags, expected in [(["--min-objects", "0"], "--min-objects: must be in 1..5, got 0"),
                            (["--easy-until", "-1"], "--easy-until: must be a step >= 0, got -1")]:
        with pytest.raises(SystemExit):
            parse_args(["--out", "unused", *flags])
        assert expected in capsys.readouterr().err


def test_question_weights_set_the_training_mix_of_question_types():
    import collections
    import itertools

    from qapframe.data.synthetic import QUESTION_TYPES
    from qapframe.toy.train import question_type_weights, training_records

    def mix(text):
        records = list(itertools.islice(training_records(0, question_type_weights(text), seed=0), 1500))
        counts = collections.Counter(r.meta["type"] for r in records)
        return {t: counts[t] / len(records) for t in QUESTION_TYPES}

    own, reweighted = mix(""), mix("colour=0.5,shape=0.5")
    # expected share of type t: own[t] * w[t] / sum_u own[u] * w[u]
    norm = sum(own[t] * (0.5 if t in ("colour", "shape") else 1.0) for t in QUESTION_TYPES)
    for t in QUESTION_TYPES:
        expected = own[t] * (0.5 if t in ("colour", "shape") else 1.0) / norm
        assert abs(reweighted[t] - expected) < 0.035, (t, reweighted[t], expected)
    assert mix("count=0")["count"] == 0.0
    # seeded: the same arguments give the same stream
    first = [r.id for r in itertools.islice(training_records(0, question_type_weights("count=0.3"), seed=1), 30)]
    again = [r.id for r in itertools.islice(training_records(0, question_type_weights("count=0.3"), seed=1), 30)]
    assert first == again


def test_bad_question_weights_are_refused_naming_the_flag_and_the_valid_types(capsys):
    import pytest

    for bad, expected in [("size=2", "colour, shape, position, count, comparison"), ("count=x", "count: weight must be"),
                          ("count=-1", "count: weight must be"),
                          ("colour=0,shape=0,position=0,count=0,comparison=0", "at least one")]:
        with pytest.raises(SystemExit):
            parse_args(["--out", "unused", "--question-weights", bad])
        err = capsys.readouterr().err
        assert "--question-weights" in err and expected in err, err


def test_init_from_continues_the_shipped_toy_with_its_tower_frozen(tmp_path):
    from safetensors.torch import load_file

    from qapframe.toy import TOY_PATH
    from qapframe.toy.train import main

    shipped = load_file(TOY_PATH / "model.safetensors")
    common = ["--init-from", "toy", "--eval-every", "0", "--final-eval-size", "4", "--batch-size", "4"]
    main(["--out", str(tmp_path / "zero"), "--steps", "0", *common])
    unchanged = load_file(tmp_path / "zero" / "model.safetensors")
    assert unchanged.keys() == shipped.keys()
    assert all(torch.equal(unchanged[k], shipped[k]) for k in shipped)

    main(["--out", str(tmp_path / "one"), "--steps", "1", *common])
    stepped = load_file(tmp_path / "one" / "model.safetensors")
    tower = [k for k in shipped if "vision_tower" in k]
    llm = [k for k in shipped if "language_model" in k]
    assert tower and all(torch.equal(stepped[k], shipped[k]) for k in tower)
    assert any(not torch.equal(stepped[k], shipped[k]) for k in llm)


def test_init_from_a_directory_without_a_model_is_refused(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        parse_args(["--out", "unused", "--init-from", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--init-from" in err and str(tmp_path) in err and "model.safetensors" in err


def test_fresh_run_with_scaled_embeddings_and_scene_counts(tmp_path):
    """The stage-0 count targets and the embedding scale reach the saved model and its summary."""
    import json

    from safetensors.torch import load_file

    from qapframe.toy.train import main

    out = tmp_path / "run"
    main(["--out", str(out), "--embed-std", "1.0", "--vision-scene-counts", "--vision-shared-counts",
          "--vision-steps", "1", "--vision-batch-size", "2", "--projector-steps", "0", "--steps", "0", "--eval-every", "0",
          "--final-eval-size", "2"])
    embeddings = load_file(out / "model.safetensors")["language_model.model.embed_tokens.weight"]  # saved layout
    assert abs(embeddings[1:].std().item() - 1.0) < 0.05
    summary = json.loads((out / "training_summary.json").read_text())
    assert 0.0 <= summary["patch_count_accuracy"] <= 1.0 and summary["args"]["embed_std"] == 1.0
    assert 0.0 <= summary["patch_shared_count_accuracy"] <= 1.0 and summary["args"]["vision_shared_counts"]


def test_bad_embed_std_is_refused_naming_the_flag(capsys):
    import pytest

    for argv in (["--embed-std", "0"], ["--embed-std", "-1"], ["--embed-std", "1", "--init-from", "toy"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "unused", *argv])
        assert "--embed-std" in capsys.readouterr().err


def test_bad_llm_init_std_is_refused_naming_the_flag(capsys):
    import pytest

    for argv in (["--llm-init-std", "0"], ["--llm-init-std", "-0.1"], ["--llm-init-std", "0.07", "--init-from", "toy"],
                 ["--llm-init-std", "0.07", "--embed-std", "1"]):
        with pytest.raises(SystemExit):
            parse_args(["--out", "unused", *argv])
        assert "--llm-init-std" in capsys.readouterr().err


def test_prompt_loss_adds_the_weighted_cross_entropy_of_the_question_text():
    """Weight w: answer-token CE plus w times the mean CE over the prompt tokens after the image, as computed
    through the processor path; weight 0 is the answer loss alone."""
    from qapframe.data.prompts import build_prompt

    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(len(processor.tokenizer), seed=0).eval()
    record = make_record(0, "train", 7)
    flags = ["--out", "unused", "--caption-prob", "0", "--drop-prob", "0"]
    with torch.no_grad():
        answer_only = batch_loss(model, processor, [record], random.Random(0),
                                 parse_args([*flags, "--prompt-loss-weight", "0"]))
        weighted = batch_loss(model, processor, [record], random.Random(0),
                              parse_args([*flags, "--prompt-loss-weight", "0.5"]))
        inputs = processor(images=[record.image], text=[build_prompt(record)], return_tensors="pt")
        target = processor.tokenizer(" " + record.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)[0]
        logits = model(input_ids=ids[None], pixel_values=inputs["pixel_values"]).logits[0]
    image_positions = (ids == processor.tokenizer.convert_tokens_to_ids("<image>")).nonzero().flatten()
    first_text, first_answer = image_positions[-1].item() + 1, len(ids) - len(target)
    assert first_answer - first_text > 5  # the question and its hints
    ce = torch.nn.functional.cross_entropy
    expected_answer = ce(logits[first_answer - 1 : -1], ids[first_answer:])
    expected_prompt = ce(logits[first_text - 1 : first_answer - 1], ids[first_text:first_answer])
    torch.testing.assert_close(answer_only, expected_answer, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weighted, expected_answer + 0.5 * expected_prompt, rtol=1e-4, atol=1e-5)


def test_bad_llm_flags_are_refused_naming_the_flag(capsys):
    import pytest

    for flags, expected in [(["--llm-heads", "5"], "--llm-heads: must divide the LLM width 192, got 5"),
                            (["--llm-heads", "12", "--init-from", "toy"], "--llm-heads: only a fresh model"),
                            (["--prompt-loss-weight", "-1"], "--prompt-loss-weight: must be a number >= 0, got -1")]:
        with pytest.raises(SystemExit):
            parse_args(["--out", "unused", *flags])
        assert expected in capsys.readouterr().err
