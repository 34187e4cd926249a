"""qapframe as an lmms-eval model: through lmms-eval's real CLI on local tasks, and each request type against an
independent computation (qapframe's own answers; a float64 log-likelihood from positions of the dense prompt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="the lmms-eval model's tests need `pip install qapframe[lmms]`")
pytest.importorskip("datasets", reason="lmms-eval's tasks read `datasets` datasets")

from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output  # noqa: E402

from qapframe.data.prompts import SHORT_ANSWER_HINT, chat_prompt  # noqa: E402
from qapframe.data.synthetic import SyntheticVQA  # noqa: E402
from qapframe.errors import QapframeError  # noqa: E402
from qapframe.integrations.lmms_eval import QapframeLMMS, manifest, select_configuration  # noqa: E402
from qapframe.spec import load_spec  # noqa: E402

PRUNED_SPEC = ("model: {path: toy}\nquantizer: {name: rtn, scheme: W8A8}\nscorer: {name: visionzip}\n"
               "pruner: {name: topk, retention: 0.5}\nevaluation: {calibration_samples: 4}\n")
# The exactness checks (against a direct computation; batched against single rows) run in fp: under W8A8 a
# batch's padding changes a matmul's blocking, and a last-bit change can flip one activation's 8-bit rounding
# (seen: 4e-3 in a continuation's NLL on an AVX-512 CPU), which says nothing about the alignment checked here.
DENSE_SPEC = "model: {path: toy}\nevaluation: {calibration_samples: 4}\n"
FP_PRUNED_SPEC = PRUNED_SPEC.replace("quantizer: {name: rtn, scheme: W8A8}\n", "")

TASK_UTILS = '''def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + "\\n''' + SHORT_ANSWER_HINT + '''"


def doc_to_question(doc):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def doc_to_answer_index(doc):
    return doc["choices"].index(doc["answer"])
'''


def _records(short: bool, n: int):
    pool = SyntheticVQA("test", size=200, seed=0)
    return [r for r in pool if (r.choices is None) == short][:n]


def write_tasks(root: Path, n: int = 6) -> Path:
    """Two lmms-eval tasks over `datasets` folders saved here: short answers (generate_until) and
    multiple choice (loglikelihood), as an offline lmms-lab task would be laid out."""
    import datasets

    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string"))})
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name, short in (("short", True), ("choice", False)):
        records = _records(short, n)
        rows = {"id": [r.id for r in records], "image": [r.image for r in records],
                "question": [r.question for r in records], "answer": [r.answer for r in records],
                "choices": [r.choices or [] for r in records]}
        datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
            str(root / name))
    common = "dataset_kwargs:\n  load_from_disk: true\ntest_split: test\ndoc_to_visual: !function local_utils.doc_to_visual\n"
    (tasks / "local_short.yaml").write_text(
        f"task: local_short\ndataset_path: {root / 'short'}\n{common}output_type: generate_until\n"
        "doc_to_text: !function local_utils.doc_to_text\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  until: [\"\\n\"]\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: true\n")
    (tasks / "local_choice.yaml").write_text(
        f"task: local_choice\ndataset_path: {root / 'choice'}\n{common}output_type: multiple_choice\n"
        "doc_to_text: !function local_utils.doc_to_question\ndoc_to_choice: !function local_utils.doc_to_choice\n"
        "doc_to_target: !function local_utils.doc_to_answer_index\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "local_utils.py").write_text(TASK_UTILS)
    return tasks


@pytest.fixture(scope="module")
def pruned_model(tmp_path_factory):
    spec = tmp_path_factory.mktemp("spec") / "pruned.yaml"
    spec.write_text(PRUNED_SPEC)
    return QapframeLMMS(spec=str(spec), batch_size=3)


class _Split(list):
    """lmms-eval's task_dict[task][split]: docs by index."""


def _attach(lm: QapframeLMMS, task: str, records) -> None:
    lm.task_dict = {task: {"test": _Split({"image": r.image, "question": r.question, "answer": r.answer,
                                           "choices": r.choices} for r in records)}}


def _request(kind: str, args: tuple, index: int) -> Instance:
    return Instance(kind, args, index, metadata={"task": args[4], "doc_id": args[3], "repeats": 1})


def _visual(doc):
    return [doc["image"]]


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    assert manifest().model_id == "qapframe"
    assert get_model("qapframe") is QapframeLMMS


def test_generate_until_answers_as_qapframe_does(pruned_model):
    """Same prompts and images as `qapframe run` asks, so the same greedy answers as qapframe's own loop
    (one record a batch there; batches of 3 of different prompt lengths here)."""
    from qapframe.eval.evaluation import answer_records

    records = _records(short=True, n=7)
    _attach(pruned_model, "t", records)
    requests = [_request("generate_until", (r.question + "\n" + SHORT_ANSWER_HINT, {"until": ["\n"], "max_new_tokens": 4},
                                            _visual, i, "t", "test"), i) for i, r in enumerate(records)]
    out = pruned_model.generate_until(requests)
    assert all(isinstance(o, GenerationResult) for o in out)
    expected = answer_records(pruned_model.model, pruned_model.processor, records, batch_size=1, max_new_tokens=4)
    assert [o.text for o in out] == expected
    for o, r in zip(out, records):  # the LLM's input: the prompt with 32 of its 64 vision tokens
        prompt = pruned_model.processor(images=[r.image], text=[chat_prompt(r.question + "\n" + SHORT_ANSWER_HINT,
                                                                            pruned_model.processor)])
        assert o.token_counts.input_tokens == len(prompt["input_ids"][0]) - 64 + 32
        assert 1 <= o.token_counts.output_tokens <= 4
    assert pruned_model.kept_tokens["generate_until"] == [32.0] * len(records)


def _nll_reference(lm: QapframeLMMS, context: str, continuation: str, image) -> tuple[float, bool]:
    """-log p(continuation | prompt) in float64, indexing the dense sequence by position (no tail alignment)."""
    prompt = chat_prompt(context, lm.processor)
    short = lm.processor(images=[image], text=[prompt], return_tensors="pt")
    full = lm.processor(images=[image], text=[prompt + continuation], return_tensors="pt")
    start = short["input_ids"].shape[1]
    with torch.no_grad():
        logits = lm.model(**{k: v for k, v in full.items()}).logits[0].double()  # [L, V]
    ids = full["input_ids"][0]
    logp = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(start, ids.shape[0])
    nll = -float(logp[positions - 1, ids[positions]].sum())
    greedy = bool((logp[positions - 1].argmax(-1) == ids[positions]).all())
    return nll, greedy


def _scores(responses) -> list[tuple[float, bool]]:
    """The (nll, greedy) pairs as lmms-eval's evaluator receives them from the model's responses."""
    pairs = [unwrap_generation_output(r)[0] for r in responses]
    assert all(isinstance(p, tuple) and len(p) == 2 for p in pairs), pairs
    return pairs


def _choice_requests(records):
    return [_request("loglikelihood", (r.question, f" {c}", _visual, i, "t", "test"), j)
            for i, r in enumerate(records) for j, c in enumerate(r.choices)]


def test_loglikelihood_is_the_continuations_negative_log_likelihood(tmp_path):
    spec = tmp_path / "dense.yaml"
    spec.write_text(DENSE_SPEC)
    lm = QapframeLMMS(spec=str(spec), batch_size=4)
    records = _records(short=False, n=3)
    _attach(lm, "t", records)
    requests = _choice_requests(records)
    out = _scores(lm.loglikelihood(requests))
    for (nll, greedy), request in zip(out, requests):
        context, continuation, _, doc, *_ = request.args
        ref_nll, ref_greedy = _nll_reference(lm, context, continuation, records[doc].image)
        assert nll == pytest.approx(ref_nll, rel=1e-4, abs=1e-4)
        assert greedy == ref_greedy
        assert nll > 0


def test_pruned_loglikelihood_batched_equals_single(tmp_path):
    """Left padding and per-row pruning: a batch of 3 scores each request as it scores alone."""
    spec = tmp_path / "pruned_fp.yaml"
    spec.write_text(FP_PRUNED_SPEC)
    pruned_model = QapframeLMMS(spec=str(spec), batch_size=3)
    records = _records(short=False, n=2)
    _attach(pruned_model, "t", records)
    requests = _choice_requests(records)
    batched = _scores(pruned_model.loglikelihood(requests))
    pruned_model.batch_size_per_request = 1
    single = _scores(pruned_model.loglikelihood(requests))
    assert [g for _, g in batched] == [g for _, g in single]
    torch.testing.assert_close(torch.tensor([n for n, _ in batched]), torch.tensor([n for n, _ in single]),
                               rtol=1e-4, atol=1e-4)


def test_bad_model_args_say_what_is_valid(tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(DENSE_SPEC + "sweep:\n  - quantizer: [null, {name: rtn, scheme: W8A8}]\n")
    parsed = load_spec(spec)
    with pytest.raises(QapframeError, match=r"2 configurations; choose one with run=N \(0: fp / dense"):
        select_configuration(parsed, None)
    with pytest.raises(QapframeError, match=r"run: 5 is not one of 0..1"):
        select_configuration(parsed, 5)
    assert select_configuration(parsed, 1).quantizer.name == "rtn"
    with pytest.raises(QapframeError, match="unknown argument.*pretrained"):
        QapframeLMMS(spec=str(spec), run=0, pretrained="x")
    with pytest.raises(QapframeError, match="'auto' sizing is not supported"):
        QapframeLMMS(spec=str(spec), run=0, batch_size="auto")


def test_lmms_eval_cli_evaluates_a_spec_offline(tmp_path):
    """`lmms-eval --model qapframe --model_args spec=...` in a subprocess, offline, on both request types."""
    tasks = write_tasks(tmp_path)
    spec = tmp_path / "pruned.yaml"
    spec.write_text(PRUNED_SPEC)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    command = [str(Path(sys.executable).with_name("lmms-eval")), "eval", "--model", "qapframe", "--model_args", f"spec={spec}",
               "--tasks", "local_short,local_choice", "--include_path", str(tasks), "--batch_size", "2",
               "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = done.stdout + done.stderr
    # lmms-eval 0.7.3 exits 0 even when evaluation raised; its error line is the tell.
    assert done.returncode == 0 and "Error during evaluation" not in log, log[-4000:]
    assert "qapframe: generate_until: 6 requests, mean vision tokens kept 32.00" in log
    assert "qapframe: loglikelihood:" in log
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]
    samples = [json.loads(line) for line in next(out.rglob("*_samples_local_short.jsonl")).read_text().splitlines()]
    assert len(samples) == 6
    assert results["local_short"]["exact_match,none"] == pytest.approx(sum(s["exact_match"] for s in samples) / 6)
    assert all(s["token_counts"][0]["input_tokens"] > 0 for s in samples)
    choice = [json.loads(line) for line in next(out.rglob("*_samples_local_choice.jsonl")).read_text().splitlines()]
    assert len(choice) == 6
    assert results["local_choice"]["acc,none"] == pytest.approx(sum(s["acc"] for s in choice) / 6)
