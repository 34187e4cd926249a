"""One quantization per group of runs that differ only in pruning: every answer as if each run quantized alone."""

from __future__ import annotations

import json

import pytest
import torch

from qapframe.eval import evaluation as evaluation_module
from qapframe.eval.evaluation import evaluate_run
from qapframe.eval.inputs import DataCache
from qapframe.eval.loading import ModelSource
from qapframe.eval.reuse import order_by_quantization, quantization_key
from qapframe.eval.runner import run_spec
from qapframe.pipeline import Pipeline
from qapframe.spec import load_spec

EVAL = {"num_samples": 8, "batch_size": 4, "max_new_tokens": 3, "calibration_samples": 4, "seeds": [0, 1]}
# Pre-LLM and in-LLM methods (the tiny LLM has 2 layers), and the hybrid measuring the pipeline's own quantizer.
METHODS = [
    {"scorer": {"name": "hybrid", "e_mode": "pipeline"}, "pruner": {"name": "topk", "retention": 0.5}},
    {"scorer": {"name": "visionzip"}, "pruner": {"name": "visionzip", "retention": 0.25}},
    {"scorer": {"name": "hybrid", "semantic": {"name": "cdpruner"}}, "pruner": {"name": "cdpruner", "retention": 0.25}},
    {"scorer": {"name": "random"}, "pruner": {"name": "topk", "retention": 0.25}},
    {"scorer": {"name": "fastv", "k": 1}, "pruner": {"name": "topk", "retention": 0.25}},
    {"scorer": {"name": "pyramiddrop", "stages": [0.5]}, "pruner": {"name": "topk", "retention": 0.25}},
    {"scorer": {"name": "sparsevlm", "stages": [0.5]}, "pruner": {"name": "sparsevlm", "retention": 0.25}},
]
# Weights and activations quantized, with the online Hadamard rotation; and static ranges (observers' state).
QUANTIZERS = [{"name": "gptq", "scheme": "W4A4", "rotation": {"name": "hadamard"}},
              {"name": "rtn", "scheme": "W4A4", "act_dynamic": False, "act_symmetric": True}]


def sweep_spec(model_dir) -> dict:
    return {"model": {"path": str(model_dir)}, "evaluation": EVAL,
            "sweep": [{"quantizer": QUANTIZERS, "scorer": [m["scorer"]], "pruner": [m["pruner"]]} for m in METHODS]
            + [{"quantizer": [None]}]}


def alone(cfg, seed) -> dict:
    """The run as it was before any sharing: its own fresh model, calibrated and quantized for it alone."""
    return evaluate_run(cfg, seed, ModelSource(cfg.model, "cpu"), DataCache())


def outcome_rows(outcomes) -> list[tuple]:
    return [(o["index"], o["prediction"], o["correct"], o["retained_tokens"]) for o in outcomes]


def test_runs_sharing_a_quantization_answer_exactly_as_each_alone(tiny_llava_dir, tmp_path):
    summary = run_spec(sweep_spec(tiny_llava_dir), output_dir=tmp_path, progress=False)
    assert summary.failed == 0 and summary.ran == (2 * len(METHODS) + 1) * 2
    spec = load_spec(sweep_spec(tiny_llava_dir))
    runs = [(cfg, seed) for cfg in spec.expand() for seed in cfg.evaluation.seeds]
    quantizations = {quantization_key(cfg, seed) for cfg, seed in runs} - {None}
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    reused = [r for r in written if r["quantization"] and r["quantization"]["reused"]]
    assert len(quantizations) == 4 and len(reused) == len(written) - 4 - 2  # 4 quantize, 2 fp runs have none
    assert all(r["quantization"] is None for r in written if r["spec"]["quantizer"] is None)
    by_key = {r["key"]: r for r in written}
    from qapframe.eval.results import run_key

    for cfg, seed in runs:
        record = by_key[run_key(cfg, seed)]
        expected = [o.to_dict() for o in sorted(alone(cfg, seed)["outcomes"], key=lambda o: o.index)]
        assert outcome_rows(record["outcomes"]) == outcome_rows(expected), record["label"]


def test_removing_the_pruning_leaves_the_quantized_model_as_a_fresh_quantization(tiny_llava_dir):
    spec = load_spec(sweep_spec(tiny_llava_dir))
    cfgs = [c for c in spec.expand() if c.quantizer is not None and c.quantizer.name == "gptq"]
    source, data = ModelSource(cfgs[0].model, "cpu"), DataCache()
    from qapframe.eval.inputs import calibration_inputs
    from qapframe.eval.reuse import QuantizedModelSlot

    slot = QuantizedModelSlot()
    for cfg in cfgs:  # every method installed on, used in and removed from the one quantized model
        assert evaluate_run(cfg, 0, source, data, reuse=slot)["quantization"]["reused"] == (cfg is not cfgs[0])
    shared = slot.take(quantization_key(cfgs[0], 0)).model
    fresh = source.fresh()
    fresh = Pipeline(cfgs[0].quantizer, seed=0).quantize(fresh, calibration_inputs(cfgs[0].evaluation, 0, source, data, fresh))
    assert set(vars(shared)) == set(vars(fresh))  # no installation attribute or wrapped method left behind
    got, want = shared.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    hooks = lambda m: sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())  # noqa: E731
    assert hooks(shared) == hooks(fresh)


def test_a_run_failing_inside_a_group_leaves_the_next_one_exact(tiny_llava_dir, tmp_path, monkeypatch):
    spec = {"model": {"path": str(tiny_llava_dir)}, "quantizer": QUANTIZERS[0],
            "evaluation": {**EVAL, "seeds": [0]}, "sweep": [{"scorer": [m["scorer"]], "pruner": [m["pruner"]]}
                                                          for m in METHODS[:3]]}
    answer = evaluation_module._answer

    def fail_the_second(model, cfg, *args, **kwargs):
        if cfg.scorer.name == "visionzip":
            raise RuntimeError("injected failure while answering")
        return answer(model, cfg, *args, **kwargs)

    monkeypatch.setattr(evaluation_module, "_answer", fail_the_second)
    summary = run_spec(spec, output_dir=tmp_path, progress=False)
    assert (summary.ran, summary.failed) == (2, 1)
    first, failed, last = summary.records
    assert failed["status"] == "error" and "injected failure" in failed["error"]
    assert last["quantization"]["reused"]  # the failed run took its pruning off again
    monkeypatch.setattr(evaluation_module, "_answer", answer)
    cfg = load_spec(spec).expand()[2]
    expected = [o.to_dict() for o in sorted(alone(cfg, 0)["outcomes"], key=lambda o: o.index)]
    assert outcome_rows(last["outcomes"]) == outcome_rows(expected)


def test_a_model_whose_pruning_will_not_come_off_is_quantized_again(tiny_llava_dir, tmp_path, monkeypatch, caplog):
    spec = {"model": {"path": str(tiny_llava_dir)}, "quantizer": QUANTIZERS[1],
            "evaluation": {**EVAL, "seeds": [0]}, "sweep": [{"scorer": [m["scorer"]], "pruner": [m["pruner"]]}
                                                          for m in METHODS[:2]]}

    def refuse(self, model):
        raise RuntimeError("injected: pruning stuck")

    monkeypatch.setattr(Pipeline, "remove_pruning", refuse)
    summary = run_spec(spec, output_dir=tmp_path, progress=False)
    assert summary.failed == 0  # the run itself succeeded; only the sharing is given up
    assert [r["quantization"]["reused"] for r in summary.records] == [False, False]
    assert "could not remove the pruning" in caplog.text and "pruning stuck" in caplog.text


def test_the_key_follows_what_calibration_depends_on_and_nothing_else(tiny_llava_dir):
    base = {"model": {"path": str(tiny_llava_dir)}, "quantizer": QUANTIZERS[0], "evaluation": EVAL}
    key = lambda **changes: quantization_key(load_spec({**base, **changes}), 0)  # noqa: E731
    same = [key(), key(scorer={"name": "visionzip"}, pruner={"name": "visionzip", "retention": 0.25}),
            key(evaluation={**EVAL, "num_samples": 4, "batch_size": 2, "max_new_tokens": 5})]
    assert len(set(same)) == 1
    different = [key(evaluation={**EVAL, "calibration_samples": 2}),
                 key(quantizer={**QUANTIZERS[0], "group_size": 32}),
                 key(model={"path": str(tiny_llava_dir), "dtype": "bfloat16"})]
    assert len(set(different) | {same[0]}) == 4
    assert quantization_key(load_spec({**base, "quantizer": None}), 0) is None
    assert quantization_key(load_spec(base), 0) != quantization_key(load_spec(base), 1)


def test_order_groups_by_first_appearance_and_keeps_spec_order_within():
    rtn = {"name": "rtn", "scheme": "W4A4"}
    spec = load_spec({"model": {"path": "toy"}, "evaluation": {"seeds": [0, 1]}, "scorer": {"name": "l2norm"}, "sweep": [
        {"quantizer": [rtn], "pruner": [{"name": "topk", "retention": 0.5}]},
        {"quantizer": [None], "pruner": [{"name": "topk", "retention": 0.5}]},
        {"quantizer": [rtn], "pruner": [{"name": "topk", "retention": 0.25}]}]})
    runs = [(cfg, seed) for cfg in spec.expand() for seed in cfg.evaluation.seeds]
    label = lambda run: (run[0].quantizer.name if run[0].quantizer else "fp", run[0].pruner.retention, run[1])  # noqa: E731
    assert [label(r) for r in runs] == [("rtn", 0.5, 0), ("rtn", 0.5, 1), ("fp", 0.5, 0), ("fp", 0.5, 1),
                                        ("rtn", 0.25, 0), ("rtn", 0.25, 1)]
    assert [label(r) for r in order_by_quantization(runs)] == [
        ("rtn", 0.5, 0), ("rtn", 0.25, 0), ("rtn", 0.5, 1), ("rtn", 0.25, 1), ("fp", 0.5, 0), ("fp", 0.5, 1)]


@pytest.mark.parametrize("device_map", ["cpu"])
def test_a_dispatched_model_is_not_shared(tiny_llava_dir, device_map):
    spec = load_spec({"model": {"path": str(tiny_llava_dir), "device_map": device_map}, "quantizer": QUANTIZERS[1]})
    assert quantization_key(spec, 0) is None
