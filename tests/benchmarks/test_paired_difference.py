"""benchmarks/paired_difference.py: the paired statistic against closed forms, and its label matching."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "paired_difference", Path(__file__).resolve().parents[2] / "benchmarks" / "paired_difference.py"
)
paired = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(paired)


def answers(correct_by_seed: dict[int, list[bool]]) -> dict[int, dict[int, bool]]:
    return {seed: dict(enumerate(row)) for seed, row in correct_by_seed.items()}


def test_identical_configurations_differ_by_exactly_nothing():
    same = answers({0: [True, False, True, True], 1: [False, False, True, True]})
    result = paired.paired_difference(same, same, resamples=200)
    assert result["mean"] == 0 and result["std_over_seeds"] == 0 and result["interval_95"] == [0, 0]
    assert result["only_candidate_right"] == result["only_baseline_right"] == 0


def test_difference_spread_and_discordant_counts_in_closed_form():
    # seed 0: the candidate answers questions 0-5 right, the baseline 0-3 (+20 points on 10 questions);
    # seed 1: the candidate 0-2, the baseline 0-3 (-10 points). Mean +5, sample std of (20, -10) = 21.21.
    candidate = answers({0: [q < 6 for q in range(10)], 1: [q < 3 for q in range(10)]})
    baseline = answers({0: [q < 4 for q in range(10)], 1: [q < 4 for q in range(10)]})
    result = paired.paired_difference(candidate, baseline, resamples=500)
    assert result["mean"] == pytest.approx(5.0) and result["std_over_seeds"] == pytest.approx(np.std([20, -10], ddof=1))
    assert (result["only_candidate_right"], result["only_baseline_right"]) == (2, 1)
    assert result["candidate_accuracy"] == pytest.approx(45.0) and result["baseline_accuracy"] == pytest.approx(40.0)


def test_bootstrap_interval_matches_the_normal_interval_of_the_paired_mean():
    rng = np.random.default_rng(1)
    a = rng.random((3, 400)) < 0.6
    b = np.where(rng.random((3, 400)) < 0.7, a, rng.random((3, 400)) < 0.5)  # correlated, as paired runs are
    result = paired.paired_difference(answers({s: list(a[s]) for s in range(3)}),
                                      answers({s: list(b[s]) for s in range(3)}), resamples=20_000)
    d = 100 * (a.astype(float) - b.astype(float)).mean(axis=0)  # per question, over seeds
    half = 1.96 * d.std() / np.sqrt(len(d))
    low, high = result["interval_95"]
    assert low < result["mean"] < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)


def test_only_shared_seeds_and_questions_are_compared():
    candidate = {0: {0: True, 1: True, 2: False}, 5: {0: True}}
    baseline = {0: {1: False, 2: False, 3: True}}
    result = paired.paired_difference(candidate, baseline, resamples=100)
    assert result["seeds"] == [0] and result["questions"] == 2 and result["mean"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="no seed"):
        paired.paired_difference({1: {0: True}}, baseline)


def test_a_pair_names_one_configuration_and_the_script_writes_its_table(tmp_path, capsys):
    def record(label, seed, correct):
        return {"status": "ok", "label": label, "seed": seed,
                "outcomes": [{"index": i, "correct": c} for i, c in enumerate(correct)]}

    lines = [record("gptq / hybrid / 12.5%", 0, [1, 1, 0, 0]), record("gptq / cdpruner / 12.5%", 0, [1, 0, 0, 0]),
             record("gptq / cdpruner / 25%", 0, [1, 1, 1, 0]), {"status": "error", "label": "x", "seed": 0}]
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "paired.json"
    assert paired.main([str(results), "--pair", "hybrid", "cdpruner / 12.5", "--resamples", "50", "--out", str(out)]) == 0
    assert "+25.0" in capsys.readouterr().out
    assert json.loads(out.read_text())["pairs"][0]["mean"] == pytest.approx(25.0)
    with pytest.raises(SystemExit, match="2 configurations match"):
        paired.main([str(results), "--pair", "hybrid", "cdpruner"])
