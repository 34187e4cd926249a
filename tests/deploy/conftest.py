"""Models quantized by qapframe, exported once per session, and read back by plain transformers.

The reading happens in one subprocess per model family that never imports qapframe (it asserts so), so
what it computes is what any transformers user gets from the directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qapframe
from tests.tiny_models import llava_inputs, tiny_llava

# Group sizes divide the tiny LLaVA's widths (64, 128); "g64" is one group per row (per channel) on the
# 64-wide Linears and two groups on down_proj (128 wide), so its export has two config groups.
LLAVA_CASES = {
    "rtn-w4a16-g32": {"name": "rtn", "scheme": "W4A16", "group_size": 32},
    "rtn-w4a16-g32-sym": {"name": "rtn", "scheme": "W4A16", "group_size": 32, "symmetric": True},
    "rtn-w4a16-g64-mixed": {"name": "rtn", "scheme": "W4A16", "group_size": 64, "symmetric": True},
    "gptq-w4a16-g32-actorder": {"name": "gptq", "scheme": "W4A16", "group_size": 32, "act_order": "static"},
    "gptq-w4a16-channel-sym": {"name": "gptq", "scheme": "W4A16", "group_size": -1, "symmetric": True},
    "rtn-w8a16-channel": {"name": "rtn", "weight_bits": 8, "act_bits": 16, "group_size": -1, "symmetric": True},
    "rtn-w8a8": {"name": "rtn", "scheme": "W8A8", "group_size": -1, "symmetric": True},
    "rtn-w8a8-default": {"name": "rtn", "scheme": "W8A8"},
    "rtn-w8a8-symacts": {"name": "rtn", "scheme": "W8A8", "group_size": -1, "symmetric": True, "act_symmetric": True},
    "gptq-w8a8-static": {"name": "gptq", "scheme": "W8A8", "group_size": 32, "act_dynamic": False},
    # the full symmetric grids are compressed-tensors' own: symmetric activations then match as asymmetric ones do
    "rtn-w8a8-symacts-full": {"name": "rtn", "scheme": "W8A8", "group_size": -1, "symmetric": True, "act_symmetric": True,
                              "symmetric_grid": "full", "act_symmetric_grid": "full"},
    "rtn-w4a4-full": {"name": "rtn", "scheme": "W4A4", "group_size": 32, "symmetric": True, "act_symmetric": True,
                      "symmetric_grid": "full", "act_symmetric_grid": "full"},
}
MINILM_CASES = {  # BERT widths 384 and 1536: group 128 divides both
    "rtn-w4a16-g128": {"name": "rtn", "scheme": "W4A16", "group_size": 128},
    "gptq-w4a16-g128-actorder": {"name": "gptq", "scheme": "W4A16", "group_size": 128, "act_order": "static"},
    "rtn-w8a8": {"name": "rtn", "scheme": "W8A8", "group_size": -1, "symmetric": True},
}

_READER = """
import json, sys, torch
import transformers
cls = getattr(transformers, sys.argv[1])
jobs = json.loads(sys.argv[2])
inputs = torch.load(sys.argv[3])
for directory, out in jobs:
    model = cls.from_pretrained(directory).eval()
    with torch.no_grad():
        result = model(**inputs)
    tensor = result.logits if hasattr(result, "logits") else result.last_hidden_state
    torch.save(tensor, out)
assert not any(m == "qapframe" or m.startswith("qapframe.") for m in sys.modules), "qapframe was imported"
"""


def read_with_plain_transformers(auto_class: str, directories: dict[str, Path], inputs: dict, work: Path) -> dict[str, torch.Tensor]:
    """Each directory loaded by ``transformers.<auto_class>.from_pretrained`` in a subprocess; outputs on ``inputs``."""
    torch.save(inputs, work / "inputs.pt")
    jobs = [(str(d), str(work / f"{case}.out.pt")) for case, d in directories.items()]
    done = subprocess.run([sys.executable, "-c", _READER, auto_class, json.dumps(jobs), str(work / "inputs.pt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {case: torch.load(work / f"{case}.out.pt") for case in directories}


class Exported:
    """Per case: the qapframe model, its export, its outputs, plain transformers' outputs; ``fp``: the unquantized outputs."""

    def __init__(self, models, directories, reference, plain, inputs, fp):
        self.models, self.directories, self.reference, self.plain = models, directories, reference, plain
        self.inputs, self.fp = inputs, fp


@pytest.fixture(scope="session")
def llava_calibration():
    return [llava_inputs(1, seed=i) for i in range(4)]


@pytest.fixture(scope="session")
def exported_llava(tmp_path_factory, llava_calibration):
    work = tmp_path_factory.mktemp("export-llava")
    inputs = llava_inputs(2, prompt_lengths=[3, 5], seed=7)
    models, directories, reference = {}, {}, {}
    for case, spec in LLAVA_CASES.items():
        model = qapframe.quantize(tiny_llava(seed=1), spec, llava_calibration)
        with torch.no_grad():
            reference[case] = model(**inputs).logits
        directories[case] = qapframe.export(model, work / case)
        models[case] = model
    plain = read_with_plain_transformers("AutoModelForImageTextToText", directories, inputs, work)
    with torch.no_grad():
        fp = tiny_llava(seed=1)(**inputs).logits
    return Exported(models, directories, reference, plain, inputs, fp)


@pytest.fixture(scope="session")
def exported_minilm(tmp_path_factory):
    from tests.quantizers.minilm import calibration_inputs, held_out_batch, load_minilm, model_path

    work = tmp_path_factory.mktemp("export-minilm")
    inputs = held_out_batch()
    models, directories, reference = {}, {}, {}
    for case, spec in MINILM_CASES.items():
        model = qapframe.quantize(load_minilm(), spec, calibration_inputs())
        with torch.no_grad():
            reference[case] = model(**inputs).last_hidden_state
        directories[case] = qapframe.export(model, work / case, source=model_path())
        models[case] = model
    plain = read_with_plain_transformers("AutoModel", directories, inputs, work)
    with torch.no_grad():
        fp = load_minilm()(**inputs).last_hidden_state
    return Exported(models, directories, reference, plain, inputs, fp)
