"""compressed-tensors' own decompression of every exported tensor gives back qapframe's codes and weights."""

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationScheme

from qapframe.deploy.writer import read_tensors
from qapframe.quantizers import QuantizedLinear
from tests.deploy.conftest import LLAVA_CASES, MINILM_CASES


def _check(exported, case):
    directory = exported.directories[case]
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    tensors = read_tensors(directory)
    model = exported.models[case]
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        group = next(g for g in config["config_groups"].values() if g["targets"] == ["Linear"] or name in g["targets"])
        scheme = QuantizationScheme.model_validate(group)
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        bits, half = module.weight_spec.bits, 2 ** (module.weight_spec.bits - 1)
        signed = module.codes.long() - (0 if module.weight_spec.symmetric else half)  # compressed-tensors' codes
        if "weight_packed" in local:
            shape = torch.Size(local["weight_shape"].tolist())
            assert torch.equal(unpack_from_int32(local["weight_packed"], bits, shape).long(), signed), name
            if not module.weight_spec.symmetric:
                zp = unpack_from_int32(local["weight_zero_point"], bits, module.zeros.shape, packed_dim=0)
                assert torch.equal(zp.float() + half, module.zeros), name
        else:
            assert local["weight"].dtype == torch.int8 and torch.equal(local["weight"].long(), signed), name
        dense = BaseCompressor.get_value_from_registry(group["format"]).decompress(local, scheme)["weight"]
        assert torch.equal(dense.float(), module.weight.float()), name
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_decompression_equals_qapframe(exported_llava, case):
    _check(exported_llava, case)


@pytest.mark.parametrize("case", list(MINILM_CASES))
def test_minilm_decompression_equals_qapframe(exported_minilm, case):
    _check(exported_minilm, case)
