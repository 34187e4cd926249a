"""benchmarks/token_selection.py: its measures against hand-computed cases, and its selections on the real toy."""

import importlib.util
from pathlib import Path

import pytest
import torch

from qapframe.data.synthetic import POSITIONS, make_record
from qapframe.data.synthetic import patch_cells

_SPEC = importlib.util.spec_from_file_location(
    "token_selection", Path(__file__).resolve().parents[2] / "benchmarks" / "token_selection.py"
)
token_selection = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(token_selection)


def test_object_auc_is_the_pairwise_win_rate_with_ties_half():
    occupied = torch.tensor([[True, True, False, False]])
    assert token_selection.object_auc(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), occupied) == 1.0
    assert token_selection.object_auc(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), occupied) == 0.0
    assert token_selection.object_auc(torch.ones(1, 4), occupied) == 0.5
    # pairs (3 vs 2, 3 vs 1, 1 vs 2, 1 vs 1): win, win, loss, tie -> 2.5 / 4; a second image averages in
    scores = torch.tensor([[3.0, 1.0, 2.0, 1.0], [0.0, 5.0, 1.0, 2.0]])
    occupied2 = torch.tensor([[True, True, False, False], [False, True, True, True]])  # 5>0, 1>0, 2>0 -> 1.0
    assert token_selection.object_auc(scores, occupied2) == pytest.approx((2.5 / 4 + 1.0) / 2)


def test_coverage_counts_objects_with_a_kept_token_in_their_cell():
    records = [make_record(0, "test", i) for i in range(3)]
    cells = patch_cells(8)
    keep = []
    for record in records:
        first_cell = POSITIONS.index(record.meta["objects"][0][2])
        keep.append((cells == first_cell).nonzero().squeeze(-1))  # every token of the first object's cell
    covered, share = token_selection.coverage(keep, records)
    objects = sum(len(r.meta["objects"]) for r in records)
    assert covered == pytest.approx(3 / objects) and share == 1.0
    occupied = token_selection.occupied_tokens(records)
    empty = [(~occupied[i]).nonzero().squeeze(-1)[:1] for i in range(3)]  # one background token each
    assert token_selection.coverage(empty, records) == (0.0, 0.0)


def test_selections_on_the_toy_are_the_top_scored_tokens_of_the_spec_pipeline():
    from qapframe.eval.loading import ModelSource
    from qapframe.eval.runner import DataCache
    from qapframe.spec import load_spec

    spec = load_spec("qapruner")
    data = DataCache()
    records = data.evaluation_records(spec.evaluation)[:4]
    keep, scores = token_selection.selections(
        spec, {"name": "visionzip"}, 0.125, 0, ModelSource(spec.model), data, records
    )
    assert scores.shape == (4, 64) and [k.numel() for k in keep] == [8] * 4
    for kept, s in zip(keep, scores):
        assert torch.equal(kept, s.topk(8).indices.sort().values)
    # [CLS] attention finds the objects on the toy (0.98 over 200 records)
    assert token_selection.object_auc(scores, token_selection.occupied_tokens(records)) > 0.85


def test_shared_is_the_share_of_kept_tokens_the_reference_also_keeps():
    keep = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5])]
    reference = [torch.tensor([2, 3, 8, 9]), torch.tensor([4, 5])]
    assert token_selection.shared(keep, reference) == pytest.approx((0.5 + 1.0) / 2)


def test_rank_correlation_and_outlier_tokens_on_hand_cases():
    peaks = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0, 0.5, 0.1, 0.2, 0.3, 9.0]])
    assert token_selection.rank_correlation(peaks, peaks) == pytest.approx(1.0)
    assert token_selection.rank_correlation(-peaks, peaks) == pytest.approx(-1.0)
    assert [t.tolist() for t in token_selection.outlier_tokens(peaks)] == [[9]]  # top 10 % of 10 tokens
    assert token_selection.shared(token_selection.outlier_tokens(peaks), [torch.tensor([1, 9])]) == 1.0


def test_activation_peaks_are_each_tokens_largest_relative_magnitude_on_the_toy():
    from qapframe.eval.inputs import model_inputs
    from qapframe.eval.loading import ModelSource
    from qapframe.eval.runner import DataCache
    from qapframe.spec import load_spec

    spec = load_spec("qapruner")
    source, records = ModelSource(spec.model), DataCache().evaluation_records(spec.evaluation)[:2]
    peaks = token_selection.activation_peaks(source, records, batch_size=1)  # one record a batch: no padding
    assert peaks.shape == (2, 64)
    model = source.fresh()
    for i, record in enumerate(records):  # direct, float64: max over layers of max |h| / median |h|
        inputs = model_inputs(source.processor, [record], model)
        with torch.no_grad():
            hidden = [h[0].double().abs() for h in model(**inputs, output_hidden_states=True).hidden_states[1:]]
        vision = inputs["input_ids"][0] == model.config.image_token_id
        expected = torch.stack([h.amax(-1) / h.flatten().median() for h in hidden]).amax(0)[vision]
        torch.testing.assert_close(peaks[i].double(), expected, rtol=1e-5, atol=0)
