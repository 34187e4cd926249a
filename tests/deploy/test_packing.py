"""qapframe's int32 packing is compressed-tensors' layout: its own pack/unpack agree with ours exactly."""

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from hypothesis import given, settings, strategies as st

from qapframe.quantizers.packing import pack_codes, packed_width, unpack_codes


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_packing_is_compressed_tensors_layout(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    unsigned = torch.randint(0, 2**bits, (rows, cols), generator=g)
    signed = (unsigned - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors' codes
    ours = pack_codes(unsigned, bits)
    assert ours.dtype == torch.int32 and ours.shape == (rows, packed_width(cols, bits))
    assert torch.equal(ours, pack_to_int32(signed, bits))
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size([rows, cols])), signed)
    assert torch.equal(unpack_codes(ours, bits, cols).long(), unsigned)


def test_out_of_range_codes_are_refused():
    import pytest

    with pytest.raises(ValueError, match="0..15"):
        pack_codes(torch.tensor([[16]]), 4)
