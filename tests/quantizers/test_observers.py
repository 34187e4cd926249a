"""Static activation range observers: minmax keeps the old numbers, percentile and mse ignore an outlier."""

import pytest
import torch

import qapframe
from qapframe.quantizers import QuantizedLinear
from qapframe.quantizers.config import ActSpec
from qapframe.quantizers.fake_quant import ActQuantizer
from qapframe.quantizers.observers import OBSERVERS
from tests.tiny_models import llava_inputs, tiny_llava


def _calibrated(observer, batches, bits=8, symmetric=False, full_range=False):
    quant = ActQuantizer(ActSpec(bits, -1, symmetric, dynamic=False, full_range=full_range), observer)
    for x in batches:
        quant.observe(x)
    quant.reduce_over_ranks()
    return quant.lo.item(), quant.hi.item()


def _with_outlier(seed=0, n=20000, outlier=1000.0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[n // 2] = outlier
    return [x[: n // 2].reshape(-1, 10), x[n // 2 :].reshape(-1, 10)]


def test_minmax_is_the_observed_range_exactly():
    batches = [torch.randn(7, 5, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(4)]
    lo, hi = _calibrated(OBSERVERS.get("minmax")(), batches)
    assert lo == torch.cat(batches).min().item() and hi == torch.cat(batches).max().item()
    assert (lo, hi) == _calibrated(None, batches)  # the default observer


@pytest.mark.parametrize("observer", [{"name": "percentile", "percentile": 99.9},
                                      {"name": "percentile", "percentile": 99.9, "absolute": True},
                                      {"name": "mse"}])
def test_one_outlier_does_not_set_the_range(observer):
    batches = _with_outlier()
    build = lambda spec: OBSERVERS.get(spec["name"])(**{k: v for k, v in spec.items() if k != "name"})
    assert _calibrated(build({"name": "minmax"}), batches)[1] == 1000.0
    if observer["name"] == "percentile":
        lo, hi = _calibrated(build(observer), batches)
        assert -6 < lo < -2 and 2 < hi < 6
    else:
        # MSE weighs the outlier's clipping error against everyone's rounding error. At 4 bits with a
        # symmetric grid, a 30-sigma outlier would leave every other value rounding to 0: clipping wins.
        batches = _with_outlier(outlier=30.0)
        assert _calibrated(build({"name": "minmax"}), batches, bits=4, symmetric=True)[1] == 30.0
        lo, hi = _calibrated(build(observer), batches, bits=4, symmetric=True)
        assert max(-lo, hi) < 10


def test_percentile_matches_the_empirical_quantile():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 3
    lo, hi = _calibrated(OBSERVERS.get("percentile")(percentile=99.0), [x])
    ref = torch.quantile(x.double(), torch.tensor([0.01, 0.99], dtype=torch.float64))
    assert lo == pytest.approx(ref[0].item(), rel=1e-6) and hi == pytest.approx(ref[1].item(), rel=1e-6)


@pytest.mark.parametrize("bits, symmetric, full_range", [(4, False, False), (8, True, False), (4, True, True)])
def test_mse_choice_minimises_the_error_over_its_grid(bits, symmetric, full_range):
    """Against a float64 brute force written independently of the observer."""
    batches = _with_outlier(seed=2, outlier=60.0)
    x = torch.cat([b.reshape(-1) for b in batches]).double()
    lo, hi = _calibrated(OBSERVERS.get("mse")(grid=40, max_shrink=0.9), batches, bits, symmetric, full_range)

    def error(a, b):
        if symmetric:
            scale = max(abs(a), abs(b)) / (2 ** (bits - 1) - (0.5 if full_range else 1))
            q = torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
        else:
            scale = (b - a) / (2**bits - 1)
            zero = round(-a / scale)
            q = (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale
        return float((q - x).pow(2).sum())

    lo0, hi0 = float(x.min()), float(x.max())
    errors = [error(r * lo0, r * hi0) for r in (1 - torch.arange(41).double() / 40 * 0.9).tolist()]
    assert error(lo, hi) == pytest.approx(min(errors), rel=1e-3)
    assert error(lo, hi) < error(lo0, hi0)  # clipping the outlier pays


def test_an_observer_that_cannot_be_told_the_grid_is_refused_for_the_full_one():
    class Legacy(OBSERVERS.get("minmax")):  # written before symmetric_grid existed
        def range(self, lo, hi, bits, symmetric):
            return lo, hi

    assert _calibrated(Legacy(), _with_outlier(), 4, True) == _calibrated(OBSERVERS.get("minmax")(), _with_outlier(), 4, True)
    quantizer = qapframe.QUANTIZERS.get("rtn")(scheme="W4A4", act_dynamic=False, act_symmetric=True,
                                               act_symmetric_grid="full")
    quantizer.config.act_observer.build = lambda: Legacy()
    with pytest.raises(ValueError, match="act_observer .*takes no full_range argument.*act_symmetric_grid: narrow"):
        quantizer.apply(tiny_llava(), [llava_inputs(1)])


def test_observer_from_the_spec_end_to_end():
    calibration = [llava_inputs(1, prompt_lengths=[4 + i % 3], seed=i) for i in range(4)]
    ranges = {}
    for observer in (None, {"name": "minmax"}, {"name": "mse", "grid": 20}):
        spec = {"name": "rtn", "scheme": "W8A8", "act_dynamic": False}
        if observer is not None:
            spec["act_observer"] = observer
        model = qapframe.quantize(tiny_llava(), spec, calibration)
        ranges[str(observer)] = {n: (m.act_quant.lo.item(), m.act_quant.hi.item())
                                 for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        assert model.qapframe_quantization["act_observer"]["name"] == (observer or {"name": "minmax"})["name"]
    assert ranges["None"] == ranges[str({"name": "minmax"})]  # the default is minmax, numbers unchanged
    mse = ranges[str({"name": "mse", "grid": 20})]
    # the first layer sees the same tokens in both runs (later ones see differently quantized outputs)
    first = {n: r for n, r in ranges["None"].items() if ".layers.0." in n}
    assert len(first) == 7 and all(lo <= mse[n][0] and mse[n][1] <= hi for n, (lo, hi) in first.items())
    assert any(mse[n] != r for n, r in first.items())


def test_unknown_observer_names_the_field():
    with pytest.raises(qapframe.SpecError, match="quantizer.act_observer.name"):
        qapframe.load_spec({"quantizer": {"name": "rtn", "act_observer": {"name": "minmux"}}})
