"""`qapframe run` on a tiny random LLaVA: exit status, the failure line, Ctrl-C."""

from __future__ import annotations

import json

import yaml

from qapframe.cli import main
from qapframe.eval import runner as runner_module

EVAL = {"num_samples": 4, "batch_size": 4, "max_new_tokens": 2, "calibration_samples": 2}


def write_spec(tmp_path, model_dir, **extra) -> str:
    spec = {"model": {"path": str(model_dir)}, "evaluation": EVAL, "output": {"dir": str(tmp_path / "out")}, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_run_exits_0_when_every_run_succeeded(tiny_llava_dir, tmp_path, capsys):
    assert main(["run", write_spec(tmp_path, tiny_llava_dir)]) == 0
    out = capsys.readouterr()
    assert "failed" not in out.err
    lines = out.out.strip().splitlines()
    out_dir = tmp_path / "out"
    assert lines[0].split() == ["configuration", "accuracy", "(%)", "tokens", "seeds"]
    assert len(lines) == 3 and lines[1].split()[-1] == "1"  # one configuration, one seed
    assert lines[2] == (f"qapframe: results {out_dir / 'results.jsonl'}, summary {out_dir / 'summary.md'}, "
                        f"plot {out_dir / 'accuracy_vs_retention.png'}")


def test_report_rerenders_summary_and_plot_from_results(tiny_llava_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, tiny_llava_dir, sweep={"evaluation.max_new_tokens": [1, 2]})
    assert main(["run", spec]) == 0
    out_dir = tmp_path / "out"
    summary = (out_dir / "summary.md").read_text()
    (out_dir / "summary.md").unlink()
    (out_dir / "accuracy_vs_retention.png").unlink()
    capsys.readouterr()
    assert main(["report", str(out_dir)]) == 0
    assert (out_dir / "summary.md").read_text() == summary and (out_dir / "accuracy_vs_retention.png").is_file()
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # header, two configurations, where they went


def test_report_of_a_directory_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"qapframe: error: {tmp_path}: no results.jsonl here; "
                                               "give the output directory of a `qapframe run`")


def test_run_exits_1_with_a_count_and_where_the_errors_are(tiny_llava_dir, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"  # fails inside the run, not at validation
    spec = write_spec(tmp_path, tiny_llava_dir, sweep={"evaluation.dataset": [str(missing), "synthetic"]})
    assert main(["run", spec]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    out = tmp_path / "out"
    assert last == (f"qapframe: 1 of 2 runs failed; their errors are in {out / 'results.jsonl'} "
                    f'(rows with "status": "error") and in the errors column of {out / "summary.md"}')
    assert main(["run", spec]) == 1  # the retry fails again: still one error row, not two
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["error", "ok"]


def test_ctrl_c_prints_one_line_and_exits_130(tiny_llava_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "evaluate_run", interrupted)
    spec = write_spec(tmp_path, tiny_llava_dir, sweep={"evaluation.max_new_tokens": [1, 2]})
    assert main(["run", spec]) == 130
    err = capsys.readouterr().err
    assert err == "qapframe: interrupted after 0 of 2 runs; rerun the same command to resume\n"
