"""The pipeline spec: validation with field paths, file errors, YAML round trip, sweeps."""

import json
from pathlib import Path

import pytest
import yaml

from qapframe import PipelineSpec, SpecError, load_spec
from qapframe.spec import ScorerSpec


def problems_of(data_or_path):
    with pytest.raises(SpecError) as info:
        load_spec(data_or_path)
    return dict(info.value.problems), info.value


def test_strategy_params_are_validated_by_the_strategy_config():
    spec = load_spec({"scorer": {"name": "l2norm"}, "pruner": {"name": "topk", "retention": 0.25}})
    assert spec.pruner.config.retention == 0.25
    assert type(spec.pruner.build()).__name__ == "TopKPruner"


def test_errors_name_the_field_path_and_what_is_valid():
    problems, _ = problems_of({"scorer": {"name": "l2norm"}, "pruner": {"name": "topk", "retention": 1.5}})
    assert "less than or equal to 1" in problems["pruner.retention"]
    problems, _ = problems_of({"scorer": {"name": "fastvv"}})
    assert "known scorers" in problems["scorer.name"]


def test_unknown_keys_are_rejected_at_every_level():
    problems, _ = problems_of(
        {"modle": {}, "evaluation": {"sedes": [1]}, "scorer": {"name": "l2norm", "alpha": 1}}
    )
    assert set(problems) == {"modle", "evaluation.sedes", "scorer.alpha"}


def test_nested_scorer_errors_carry_the_nested_path():
    problems, _ = problems_of(
        {"scorer": {"name": "fused", "scorers": [{"scorer": {"name": "l2norm"}}, {"scorer": {"name": "nope"}}]}}
    )
    assert "scorer.scorers[1].scorer.name" in problems


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruner: {name: topk, retention: 0}\nscorer: {name: random}\n")
    problems, error = problems_of(bad)
    assert error.source == str(bad) and str(bad) in str(error)
    assert "greater than 0" in problems["pruner.retention"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("scorer: [unclosed\n")
    problems, _ = problems_of(broken)
    assert "(syntax)" in problems
    problems, _ = problems_of(tmp_path / "missing.yaml")
    assert problems["(file)"].startswith("no such file") and "qapruner" in problems["(file)"]


def test_shipped_specs_load_by_name_and_by_repository_path():
    from qapframe.spec import builtin_spec_names

    assert {"qapruner", "smoke"} <= set(builtin_spec_names())
    by_name = load_spec("qapruner")
    by_path = load_spec(Path(__file__).resolve().parents[1] / "specs" / "qapruner.yaml")
    assert by_name.to_dict() == by_path.to_dict() and by_name.model.path == "toy"
    problems, _ = problems_of("qaprunr")
    assert "built-in: " in problems["(file)"]


def test_main_spec_quantizes_activations_with_static_ranges_and_the_per_token_spec_is_its_grid():
    main, per_token = load_spec("qapruner").expand(), load_spec("qapruner_per_token_w4a4").expand()

    def activations(run):
        q = run.to_dict()["quantizer"]
        return None if q is None else (q["act_dynamic"], q["act_symmetric"])

    # every W4A4 run of the main spec uses static symmetric per-tensor ranges, but one dense per-token reference
    static = [r for r in main if activations(r) == (False, True)]
    reference = [r for r in main if activations(r) == (True, False)]
    assert len(static) + len(reference) + 1 == len(main)  # + fp dense
    assert len(reference) == 1 and reference[0].scorer is None and reference[0].quantizer.name == "rtn"
    assert {r.quantizer.name for r in static if r.scorer is None} == {"rtn", "gptq"}
    assert all(activations(r) == (True, False) for r in per_token if r.quantizer is not None)

    def grid(runs):  # the configurations with the activation-range choice left out
        def key(run):
            d = run.to_dict()
            q = d["quantizer"] and {k: v for k, v in d["quantizer"].items() if not k.startswith("act_")}
            return repr((q, d["scorer"], d["pruner"]))
        return {key(r) for r in runs}

    assert grid(main) == grid(per_token) and len(per_token) == len(main) - 1
    ablation = {r.scorer.model_dump_json() for r in main if r.scorer is not None and r.scorer.name == "hybrid"}
    assert len(ablation) == 4  # full, quantization error only, outlier range only, semantic score only


def test_yaml_round_trip_is_lossless(tmp_path):
    spec = load_spec(
        {
            "quantizer": None,
            "scorer": {"name": "fused", "scorers": [{"scorer": {"name": "l2norm"}, "weight": 0.3}]},
            "pruner": {"name": "topk", "num_tokens": 16},
            "evaluation": {"seeds": [0, 1, 2]},
        }
    )
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    again = load_spec(path)
    assert again.to_dict() == spec.to_dict()
    json_path = tmp_path / "spec.json"
    json_path.write_text(json.dumps(spec.to_dict()))
    assert load_spec(json_path).to_dict() == spec.to_dict()


def test_scorer_without_pruner_gets_topk_and_pruner_without_scorer_is_an_error():
    assert load_spec({"scorer": {"name": "random"}}).pruner.name == "topk"
    problems, _ = problems_of({"pruner": {"name": "topk"}})
    assert "scorer" in " ".join(problems.values())


def test_a_scorer_and_pruner_that_cannot_run_together_are_reported_before_any_model_loads():
    problems, _ = problems_of({"scorer": {"name": "fastv", "k": 2}, "pruner": {"name": "tome"}})
    assert "works only before the LLM" in problems["pruner"] and "'fastv'" in problems["pruner"]
    problems, _ = problems_of({"scorer": {"name": "l2norm"}, "pruner": {"name": "sparsevlm"}})
    assert "needs context from inside the LLM" in problems["pruner"]
    problems, _ = problems_of({"scorer": {"name": "l2norm"}, "pruner": {"name": "tome"},
                               "sweep": {"scorer": [{"name": "visionzip"}, {"name": "pyramiddrop"}]}})
    assert [path for path in problems] == ["sweep[0] {'scorer': {'name': 'pyramiddrop'}}: pruner"]
    assert load_spec({"scorer": {"name": "l2norm"}, "pruner": {"name": "tome"}}).pruner.name == "tome"


def test_sweep_expands_to_the_union_of_grid_products():
    spec = load_spec(
        {
            "scorer": {"name": "random"},
            "sweep": [
                {"pruner.retention": [0.5, 0.25], "scorer": [{"name": "random"}, {"name": "l2norm"}]},
                {"scorer": [None], "pruner": [None]},
                {"pruner.retention": [0.5]},  # already covered by the first grid: run once
            ],
        }
    )
    runs = [(s.scorer.name if s.scorer else None, s.pruner.config.retention if s.pruner else None) for s in spec.expand()]
    assert runs == [("random", 0.5), ("l2norm", 0.5), ("random", 0.25), ("l2norm", 0.25), (None, None)]
    assert all(not s.sweep for s in spec.expand())


def test_sweep_errors_name_the_grid_and_the_value():
    problems, _ = problems_of({"scorer": {"name": "random"}, "sweep": {"pruner.retention": [0.5, 2.0]}})
    assert any(path.startswith("sweep[0]") and "2.0" in path for path in problems)
    problems, _ = problems_of({"sweep": {"pruner.retention": 0.5}})
    assert problems["sweep[0].pruner.retention"] == "must be a non-empty list of values"


def test_strategy_spec_serializes_with_defaults_filled_in():
    dumped = ScorerSpec(name="fused", scorers=[{"scorer": {"name": "random"}}]).model_dump()
    assert dumped == {"name": "fused", "scorers": [{"scorer": {"name": "random"}, "weight": 1.0}], "normalization": "minmax"}
    assert yaml.safe_load(PipelineSpec().to_yaml())["model"]["path"] == "toy"


# -- messages a user sees (issue 32, item 7) -----------------------------------------------------


def test_nan_is_reported_as_not_a_finite_number_wherever_it_is():
    assert problems_of({"scorer": {"name": "random"}, "pruner": {"name": "topk", "retention": float("nan")}})[0] == {
        "pruner.retention": "must be a finite number, got nan"
    }
    swept = problems_of({"scorer": {"name": "random"}, "sweep": {"pruner.retention": [0.5, float("nan")]}})[0]
    assert swept == {"sweep": "pruner.retention in grid 0: nan is not a finite number"}


def test_unknown_section_or_field_suggests_the_closest_and_lists_the_valid_ones():
    (message,) = problems_of({"quantiser": {"name": "rtn"}})[0].values()
    assert "unknown section 'quantiser' (did you mean 'quantizer'?)" in message
    assert "valid sections: model, quantizer, scorer, pruner, evaluation, output, sweep" in message
    nested = problems_of({"scorer": {"name": "hybrid", "semantic": {"name": "fastv", "kk": 2}}})[0]
    assert nested == {"scorer.semantic.kk": "unknown field 'kk' of scorer 'fastv' (did you mean 'k'?); "
                      "valid fields: name, k"}
    (message,) = problems_of({"evaluation": {"seed": [0]}})[0].values()
    assert "(did you mean 'seeds'?)" in message and "num_samples" in message


def test_empty_file_and_comment_only_file_say_so(tmp_path):
    for text, what in (("", "the file is empty"), ("# nothing yet\n", "the file is only comments")):
        path = tmp_path / "spec.yaml"
        path.write_text(text)
        with pytest.raises(SpecError) as info:
            load_spec(path)
        assert info.value.problems == [("(file)", f"{what}; a spec is a mapping of sections: model, quantizer, "
                                        "scorer, pruner, evaluation, output, sweep")]


def test_yaml_and_json_syntax_errors_give_line_column_and_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: toy\nscorer: name: random\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    ((where, message),) = info.value.problems
    assert where == "(syntax)"
    assert message.splitlines() == [
        "line 3, column 13: mapping values are not allowed here",
        "    3 | scorer: name: random",
        "      |             ^",
    ]
    path = tmp_path / "bad.json"
    path.write_text('{"model": {"path": "toy",}}')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.problems[0][1].startswith("line 1, column 26: Expecting property name")


# -- one calibration count -----------------------------------------------------------------------


def test_the_quantizer_follows_evaluation_calibration_samples_unless_it_disagrees():
    spec = load_spec({"quantizer": {"name": "rtn"}, "evaluation": {"calibration_samples": 64}})
    assert spec.quantizer.config.calibration_samples is None  # uses every record the runner builds
    same = load_spec({"quantizer": {"name": "gptq", "calibration_samples": 64}, "evaluation": {"calibration_samples": 64}})
    assert same.quantizer.config.calibration_samples == 64
    problems = problems_of({"quantizer": {"name": "rtn", "calibration_samples": 16}})[0]
    assert list(problems) == ["quantizer.calibration_samples"]
    assert "16 disagrees with evaluation.calibration_samples (32)" in problems["quantizer.calibration_samples"]
