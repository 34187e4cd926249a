"""The torch reference against an independent per-group numpy computation and closed forms."""

import numpy as np
import pytest
import torch

from qapframe.kernels.reference import (
    fake_quantize_groups,
    hybrid_sensitivity_reference,
    sensitivity_score_reference,
)
from qapframe.strategies.normalization import fuse


def numpy_sensitivity(x: np.ndarray, bits: int, group: int, symmetric: bool):
    """Scalar float32 quantize-dequantize per group (np.rint = round-half-even), float64 norm."""
    b, n, d = x.shape
    g = d if group == -1 else group
    err = np.zeros((b, n))
    for i in range(b):
        for j in range(n):
            total = 0.0
            for s in range(0, d, g):
                seg = x[i, j, s : s + g].astype(np.float32)
                if symmetric:
                    qmax = np.float32(2 ** (bits - 1) - 1)
                    scale = np.float32(np.abs(seg).max() / qmax)
                    deq = np.clip(np.rint(seg / scale), -qmax - 1, qmax) * scale if scale > 0 else seg
                else:
                    qmax = np.float32(2**bits - 1)
                    scale = np.float32((seg.max() - seg.min()) / qmax)
                    if scale > 0:
                        zero = np.rint(-seg.min() / scale)
                        deq = (np.clip(np.rint(seg / scale) + zero, 0, qmax) - zero) * scale
                    else:
                        deq = seg
                total += float(((seg - deq.astype(np.float32)).astype(np.float64) ** 2).sum())
            err[i, j] = np.sqrt(total)
    return err, (x.max(-1).astype(np.float64) - x.min(-1))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [-1, 8, 13])
def test_reference_matches_numpy_loop(symmetric, group):
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(3)) * 2
    x[0, 0] = torch.arange(40) % 7 / 2  # exact .5 ties
    error, spread = hybrid_sensitivity_reference(x, 3, group, symmetric)
    ref_error, ref_spread = numpy_sensitivity(x.numpy(), 3, group, symmetric)
    np.testing.assert_allclose(error.numpy(), ref_error, rtol=1e-6)
    np.testing.assert_array_equal(spread.numpy(), ref_spread.astype(np.float32))


def test_values_on_the_grid_have_zero_error():
    # Integers 0..15 with both ends present: scale 1, zero 0, so 4-bit asymmetric RTN is exact.
    x = torch.randint(0, 16, (2, 3, 64), generator=torch.Generator().manual_seed(0)).float()
    x[..., 0], x[..., 1] = 0.0, 15.0
    error, spread = hybrid_sensitivity_reference(x, 4, -1, False)
    assert torch.equal(error, torch.zeros(2, 3)) and torch.equal(spread, torch.full((2, 3), 15.0))


def test_round_half_even_closed_form():
    # Asymmetric 2-bit on [0, 3]: scale 1, zero 0; the ties 0.5, 1.5, 2.5 round to even 0, 2, 2.
    x = torch.tensor([[[0.0, 0.5, 1.5, 2.5, 3.0]]])
    deq = fake_quantize_groups(x, 2, -1, False)
    assert deq.tolist() == [[[0.0, 0.0, 2.0, 2.0, 3.0]]]
    error, _ = hybrid_sensitivity_reference(x, 2, -1, False)
    assert error.item() == pytest.approx(np.sqrt(0.75), rel=1e-7)


def test_score_reference_equals_normalization_fuse():
    x = torch.randn(3, 17, 50, generator=torch.Generator().manual_seed(1))
    x[1] = 0.25  # an image of constant tokens: both halves 0.5
    error, spread, score = sensitivity_score_reference(x, 4, 16, False)
    assert torch.equal(score, fuse([error, spread], [0.5, 0.5], "minmax"))
    assert torch.equal(score[1], torch.full((17,), 0.5))


def test_zero_channels_rejected():
    with pytest.raises(ValueError, match="D >= 1"):
        hybrid_sensitivity_reference(torch.zeros(1, 2, 0), 4, 128, False)
