"""`run_spec` end to end on a tiny random LLaVA: sweeps, resume, failure isolation, reports, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qapframe.eval import runner as runner_module
from qapframe.eval.results import ResultsFile
from qapframe.eval.runner import run_spec

SMOKE = Path(__file__).resolve().parents[2] / "specs" / "smoke.yaml"
EVAL = {"num_samples": 8, "batch_size": 4, "max_new_tokens": 3, "calibration_samples": 4}


def smoke_on(model_dir, **evaluation) -> dict:
    """specs/smoke.yaml with the tiny model and a smaller evaluation set."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec["model"]["path"] = str(model_dir)
    spec["evaluation"].update(EVAL, **evaluation)
    return spec


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    spec = smoke_on(tiny_llava_dir, seeds=[0, 1])
    return spec, out, run_spec(spec, output_dir=out, progress=False)


def test_sweep_expands_to_every_configuration_and_seed(smoke_run):
    spec, out, summary = smoke_run
    records = lines(out)
    assert summary.ran == 4 and summary.failed == summary.skipped == 0 and len(records) == 4
    # Written as run: the two retentions under one seed share its quantization, so they run one after another.
    assert [(r["retention"], r["seed"]) for r in records] == [(0.5, 0), (0.25, 0), (0.5, 1), (0.25, 1)]
    assert [r["quantization"]["reused"] for r in records] == [False, True, False, True]
    assert [r["spec"]["pruner"]["retention"] for r in summary.records] == [0.5, 0.5, 0.25, 0.25]  # spec order
    for r in records:
        assert r["status"] == "ok" and r["quantizer"] == "rtn(scheme=W4A4)" and r["scorer"] == "hybrid"
        # the tiny model has 16 vision tokens per image; the adapter's selection is what is counted
        assert r["metrics"]["dense_tokens"] == 16
        assert r["metrics"]["retained_tokens"] == 16 * r["retention"]
        assert all(o["retained_tokens"] == 16 * r["retention"] for o in r["outcomes"])
        assert r["metrics"]["num_samples"] == 8 and r["metrics"]["prefill_ms_per_sample"] > 0
        assert r["metrics"]["accuracy"] == sum(o["correct"] for o in r["outcomes"]) / 8


def test_summary_table_and_plot_are_written(smoke_run):
    _, out, summary = smoke_run
    text = (out / "summary.md").read_text()
    table = text.split("## Plot key")[0]
    rows = [line for line in table.splitlines() if line.startswith("| A |")]
    assert len(rows) == 2  # one row per configuration, seeds aggregated; both on curve A of the plot
    records = lines(out)
    for row, retention in zip(rows, (0.5, 0.25)):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == ["rtn(scheme=W4A4)", "hybrid", "topk"]  # quantizer, scorer, pruner: no repeats
        assert cells[4] == f"{retention:g}" and cells[9] == "2" and cells[10] == "0"
        tokens = [r["metrics"]["retained_tokens"] for r in records if r["retention"] == retention]
        assert cells[6] == f"{sum(tokens) / 2:.1f} ± 0.0"
    assert "| A | rtn + hybrid | rtn(scheme=W4A4) | hybrid | topk | C0 | o |" in text  # the plot's key
    assert "reset at the start of each run" in text  # what the memory column measures
    png = summary.plot_path.read_bytes()
    assert summary.plot_path.name == "accuracy_vs_retention.png" and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_dense_predictions_match_a_direct_generate(tiny_llava_dir, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from qapframe.data import build_prompt, load_dataset

    summary = run_spec({"model": {"path": str(tiny_llava_dir)}, "evaluation": EVAL}, output_dir=tmp_path)
    (record,) = summary.records
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    data = load_dataset("synthetic", "test", num_samples=8)
    expected = []
    for sample in data:  # one at a time: no padding, an independent path from the runner's batches
        inputs = processor(images=[sample.image], text=[build_prompt(sample)], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        expected.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert [o["prediction"] for o in record["outcomes"]] == expected
    assert record["quantizer"] == "fp" and record["retention"] is None and record["metrics"]["retained_tokens"] == 16


def test_resume_skips_finished_runs_and_reruns_missing_ones(smoke_run, tiny_llava_dir, tmp_path):
    spec, out, _ = smoke_run
    before = (out / "results.jsonl").read_text()
    again = run_spec(spec, output_dir=out, progress=False)
    assert (again.ran, again.skipped) == (0, 4) and (out / "results.jsonl").read_text() == before
    # Drop the last finished run: only that one is redone, and it gives the same numbers (same seed).
    target = tmp_path / "resumed"
    target.mkdir()
    kept = before.splitlines()[:3]
    (target / "results.jsonl").write_text("\n".join(kept) + "\n")
    resumed = run_spec(spec, output_dir=target, progress=False)
    assert (resumed.ran, resumed.skipped) == (1, 3)
    old, new = lines(out)[3], lines(target)[3]
    assert new["key"] == old["key"] and new["outcomes"] == old["outcomes"] and new["metrics"]["accuracy"] == old["metrics"]["accuracy"]


def test_a_failing_configuration_is_recorded_and_the_rest_go_on(tiny_llava_dir, tmp_path):
    spec = {
        "model": {"path": str(tiny_llava_dir)},
        "evaluation": EVAL,
        "sweep": {"model.path": [str(tmp_path / "missing"), str(tiny_llava_dir)]},
    }
    summary = run_spec(spec, output_dir=tmp_path)
    assert (summary.ran, summary.failed) == (1, 1)
    failed, ok = lines(tmp_path)
    assert failed["status"] == "error" and "model.path" in failed["error"] and "Traceback" in failed["traceback"]
    assert ok["status"] == "ok" and ok["metrics"]["num_samples"] == 8
    assert "1 (QapframeError: model.path" in (tmp_path / "summary.md").read_text()
    retry = run_spec(spec, output_dir=tmp_path)  # errors are retried, successes skipped
    assert (retry.ran, retry.failed, retry.skipped) == (0, 1, 1)
    ok_again, again = lines(tmp_path)  # the retried run's new row replaced its old error row
    assert again["key"] == failed["key"] and again["status"] == "error" and ok_again == ok


def test_results_file_holds_complete_json_lines_after_each_run(tiny_llava_dir, tmp_path, monkeypatch):
    seen = []
    original = runner_module.evaluate_run

    def checking(*args, **kwargs):
        path = tmp_path / "results.jsonl"
        text = path.read_text() if path.exists() else ""
        assert text == "" or text.endswith("\n")
        seen.append([json.loads(line)["status"] for line in text.splitlines()])  # every line parses
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "evaluate_run", checking)
    spec = {"model": {"path": str(tiny_llava_dir)}, "evaluation": {**EVAL, "num_samples": 4, "seeds": [0, 1, 2]}}
    run_spec(spec, output_dir=tmp_path)
    assert seen == [[], ["ok"], ["ok", "ok"]]
    assert len(ResultsFile(tmp_path / "results.jsonl").records()) == 3


def test_same_spec_gives_the_same_numbers(smoke_run, tmp_path):
    spec, out, _ = smoke_run
    run_spec(spec, output_dir=tmp_path, progress=False)
    for a, b in zip(lines(out), lines(tmp_path)):
        assert a["key"] == b["key"] and a["outcomes"] == b["outcomes"]
        assert a["metrics"]["accuracy_by_type"] == b["metrics"]["accuracy_by_type"]


def test_calibration_records_vary_with_the_seed_only(smoke_run):
    from qapframe.spec import load_spec

    data = runner_module.DataCache()
    evaluation = load_spec(smoke_run[0]).evaluation
    ids = lambda seed: [r.id for r in data.calibration_records(evaluation, seed)]  # noqa: E731
    assert ids(0) == ids(0) != ids(1) and len(ids(0)) == EVAL["calibration_samples"]
    assert [r.id for r in data.evaluation_records(evaluation)] == [f"synthetic-0-test-{i}" for i in range(8)]


def test_labels_name_the_strategies_and_swept_fields():
    from qapframe.eval.labels import describe, varied_fields
    from qapframe.spec import load_spec

    spec = load_spec({
        "quantizer": {"name": "rtn", "scheme": "W4A4"},
        "scorer": {"name": "visionzip"},
        "pruner": {"name": "visionzip", "retention": 0.125},
        "sweep": {"evaluation.max_new_tokens": [2]},
    })
    (cfg,) = spec.expand()
    info = describe(cfg, varied_fields(spec))
    assert info["label"] == "rtn(scheme=W4A4) / visionzip + visionzip pruner / 12.5% [evaluation.max_new_tokens=2]"
    assert info["retention"] == 0.125
    assert describe(load_spec({}))["label"] == "fp / dense / dense"
    assert runner_module.describe is describe  # still importable from the runner


def test_smoke_spec_is_valid_and_small():
    from qapframe.spec import load_spec

    spec = load_spec(SMOKE)
    runs = [(c, s) for c in spec.expand() for s in c.evaluation.seeds]
    assert len(runs) == 2 and {c.pruner.config.retention for c, _ in runs} == {0.5, 0.25}
    assert spec.quantizer is not None and spec.evaluation.num_samples <= 64


def test_rerun_says_how_many_runs_it_skips_and_retries(tiny_llava_dir, tmp_path, capsys):
    spec = {"model": {"path": str(tiny_llava_dir)}, "evaluation": EVAL,
            "sweep": {"model.path": [str(tmp_path / "missing"), str(tiny_llava_dir)]}}
    run_spec(spec, output_dir=tmp_path, progress=False)
    assert "resuming" not in capsys.readouterr().err  # a first run has nothing to resume
    run_spec(spec, output_dir=tmp_path, progress=False)
    err = capsys.readouterr().err
    assert (f"resuming from {tmp_path / 'results.jsonl'}: skipping 1 of 2 runs already finished; "
            "retrying 1 failed run(s), whose new rows replace their error rows") in err


def test_ctrl_c_stops_with_the_recorded_runs_intact(tiny_llava_dir, tmp_path, monkeypatch):
    spec = smoke_on(tiny_llava_dir, seeds=[0, 1])
    real = runner_module.evaluate_run
    calls = []

    def interrupted_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "evaluate_run", interrupted_third)
    with pytest.raises(runner_module.RunInterrupted) as info:
        run_spec(spec, output_dir=tmp_path, progress=False)
    assert (info.value.recorded, info.value.total) == (2, 4) and len(lines(tmp_path)) == 2
    monkeypatch.setattr(runner_module, "evaluate_run", real)
    resumed = run_spec(spec, output_dir=tmp_path, progress=False)
    assert (resumed.skipped, resumed.ran) == (2, 2) and len({r["key"] for r in lines(tmp_path)}) == 4


def test_plot_entries_have_short_labels_and_styles_no_two_share():
    from qapframe.eval.report import ConfigurationRow, plot_entries

    def row(q, s, p, retention, accuracy):
        r = ConfigurationRow(f"{q}{s}{p}{retention}", "", q, s, p, retention)
        r.ok = [{"metrics": {"accuracy": accuracy}}, {"metrics": {"accuracy": accuracy + 0.02}}]
        return r

    scorers = [f"hybrid(alpha={a / 10}, quant_error_weight=0.5, outlier_weight=0)" for a in range(12)]
    rows = [row("rtn(scheme=W4A4, act_dynamic=False)", s, "topk", r, 0.5) for s in scorers for r in (0.5, 0.25)]
    rows += [row("fp", "dense", "", None, 0.9), row("rtn(scheme=W4A4, act_dynamic=False)", "dense", "", None, 0.85)]
    entries = plot_entries(rows)
    curves = [e for e in entries if not e.dense]
    baselines = [e for e in entries if e.dense]
    assert len(curves) == 12 and [e.key for e in baselines] == ["D1", "D2"]
    assert len({(e.color, e.marker) for e in curves}) == 12  # no two curves look alike
    assert not {e.color for e in baselines} & {e.color for e in curves}  # baselines never take a curve's colour
    assert all(len(e.label) <= 32 for e in entries) and curves[0].label == "A  rtn + hybrid"
    assert baselines[0].label == "D1  fp dense" and baselines[0].points == [(1.0, 0.91, pytest.approx(0.0141, abs=1e-4))]


def test_no_plot_and_a_clear_summary_when_every_run_failed(tmp_path):
    from qapframe.eval.report import PLOT_FILE, write_reports

    (tmp_path / PLOT_FILE).write_bytes(b"stale")
    record = {"key": "k", "configuration_id": "c", "label": "fp / dense / dense", "quantizer": "fp",
              "scorer": "dense", "pruner": "", "retention": None, "status": "error", "error": "boom"}
    summary, plot = write_reports([record], tmp_path)
    assert plot is None and not (tmp_path / PLOT_FILE).exists()
    assert "No run succeeded, so no plot was written." in summary.read_text()
