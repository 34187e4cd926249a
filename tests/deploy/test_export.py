"""`export` refuses what it cannot write, writes atomically and in shards, and `qapframe.load` restores the pipeline."""

import json
import os

import pytest
import torch

import qapframe
from qapframe.cli import main
from qapframe.deploy import ExportError, PIPELINE_FILE
from qapframe.deploy import writer as writer_module
from qapframe.quantizers import QuantizedLinear
from tests.deploy.conftest import read_with_plain_transformers
from tests.tiny_models import llava_inputs, tiny_llava

W4 = {"name": "rtn", "scheme": "W4A16", "group_size": 32}


@pytest.fixture(scope="module")
def w4_model():
    return qapframe.quantize(tiny_llava(seed=1), W4)


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(ExportError, match="no quantized Linear layers; quantize it first"):
        qapframe.export(tiny_llava(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, message", [
    ({"name": "gptq", "scheme": "W4A16", "group_size": 32, "act_order": "group"}, "act_order: static"),
    ({"name": "rtn", "scheme": "W4A4", "group_size": 32, "act_symmetric": True}, "act_symmetric_grid: full, act_symmetric: false, or 8-bit"),
    ({"name": "rtn", "scheme": "W4A16", "group_size": 48}, "group_size dividing 64"),
    ({"name": "rtn", "scheme": "W4A16", "group_size": 32, "rotation": {"name": "hadamard"}}, "online_down_proj: false"),
    ({"name": "rtn", "scheme": "W4A8", "group_size": 32}, "symmetric: true, or weight-only"),
    ({"name": "rtn", "scheme": "W4A16", "group_size": 64}, "more than one compressed-tensors scheme"),
])
def test_inexpressible_settings_are_refused_by_name(tmp_path, spec, message):
    calibration = [llava_inputs(1, seed=i) for i in range(2)]
    model = qapframe.quantize(tiny_llava(seed=1), spec, calibration)
    with pytest.raises(ExportError, match="export: ") as info:
        qapframe.export(model, tmp_path / "out")
    assert message in str(info.value)
    assert not (tmp_path / "out").exists() and not _siblings(tmp_path / "out")


def test_unfolded_smoothing_divisors_are_refused_by_module(tmp_path):
    model = qapframe.quantize(tiny_llava(seed=1), W4)
    name = "model.language_model.layers.1.self_attn.o_proj"
    module = model.get_submodule(name)
    module.smooth = torch.rand(module.in_features) + 0.5  # what SmoothQuant/AWQ leave when no producer absorbs them
    with pytest.raises(ExportError, match=f"module '{name}': it divides its input by SmoothQuant/AWQ scales") as info:
        qapframe.export(model, tmp_path / "out")
    assert "unfused_scales: false" in str(info.value)


@pytest.mark.parametrize("rotation, grid", [({"name": "hadamard"}, "narrow"), ({"name": "spinquant", "steps": 3}, "narrow"),
                                           ({"name": "hadamard"}, "full")])
def test_rotation_without_online_hadamard_exports_exactly(tmp_path, rotation, grid):
    spec = {**W4, "symmetric": True, "symmetric_grid": grid, "rotation": {**rotation, "online_down_proj": False}}
    model = qapframe.quantize(tiny_llava(seed=1), spec, [llava_inputs(1, seed=i) for i in range(2)])
    inputs = llava_inputs(2, prompt_lengths=[3, 5], seed=7)
    with torch.no_grad():
        reference = model(**inputs).logits
    out = qapframe.export(model, tmp_path / "rotated")
    plain = read_with_plain_transformers("AutoModelForImageTextToText", {"rotated": out}, inputs, tmp_path)["rotated"]
    assert float((plain - reference).norm() / reference.norm()) <= 1e-4


def test_non_empty_directory_needs_overwrite(tmp_path, w4_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; choose another --out or pass --overwrite"):
        qapframe.export(w4_model, out)
    assert (out / "keep.txt").read_text() == "mine"
    qapframe.export(w4_model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file() and not _siblings(out)


def test_an_empty_directory_is_used(tmp_path, w4_model):
    (tmp_path / "out").mkdir()
    qapframe.export(w4_model, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert oct((tmp_path / "out").stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path, w4_model, monkeypatch):
    calls = []
    real = writer_module.save_file

    def disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "save_file", disk_full)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        qapframe.export(w4_model, out, max_shard_bytes=200_000)
    assert not out.exists() and not _siblings(out)
    # An existing export survives a failed --overwrite untouched.
    monkeypatch.setattr(writer_module, "save_file", real)
    qapframe.export(w4_model, out)
    before = sorted(p.name for p in out.iterdir())
    calls.clear()
    monkeypatch.setattr(writer_module, "save_file", disk_full)
    with pytest.raises(OSError):
        qapframe.export(w4_model, out, overwrite=True, max_shard_bytes=200_000)
    assert sorted(p.name for p in out.iterdir()) == before and not _siblings(out)


def test_sharded_export_loads_in_plain_transformers(tmp_path, w4_model):
    out = qapframe.export(w4_model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards) and not (out / "model.safetensors").exists()
    # A module's tensors stay together in one shard.
    name = "model.language_model.layers.0.mlp.down_proj"
    assert len({index["weight_map"][f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point")}) == 1
    inputs = llava_inputs(1, seed=3)
    with torch.no_grad():
        reference = w4_model(**inputs).logits
    plain = read_with_plain_transformers("AutoModelForImageTextToText", {"s": out}, inputs, tmp_path)["s"]
    assert float((plain - reference).norm() / reference.norm()) <= 1e-4
    loaded = qapframe.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, reference)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_export_writes_every_floating_tensor_in_it(tmp_path, w4_model, dtype):
    """Vision tower, projector, lm_head and scales in fp16/bf16; plain transformers builds the model in that dtype
    and its logits follow the float32 fake-quantized model to half precision."""
    from safetensors import safe_open

    out = qapframe.export(w4_model, tmp_path / dtype, dtype=dtype)
    want = getattr(torch, dtype)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    floating = {k for k, v in tensors.items() if v.is_floating_point()}
    assert all(tensors[k].dtype == want for k in floating)
    assert any(k.startswith("model.vision_tower.") for k in floating) and "lm_head.weight" in floating
    assert tensors["model.language_model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    inputs = llava_inputs(1, seed=3)
    with torch.no_grad():
        reference = w4_model(**inputs).logits
    half = {k: v.to(want) if v.is_floating_point() else v for k, v in inputs.items()}
    plain = read_with_plain_transformers("AutoModelForImageTextToText", {"h": out}, half, tmp_path)["h"]
    assert plain.dtype == want
    assert float((plain.float() - reference).norm() / reference.norm()) <= 2e-2
    loaded = qapframe.load(out)  # qapframe's own reading of the directory: the same half-precision model
    with torch.no_grad():
        mine = loaded(**half).logits
    assert mine.dtype == want and float((mine.float() - plain.float()).norm() / plain.float().norm()) <= 1e-2


def test_unknown_export_dtype_is_refused(tmp_path, w4_model):
    with pytest.raises(ExportError, match=r"dtype 'int8' is not one of float16, bfloat16, float32"):
        qapframe.export(w4_model, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


def test_load_restores_quantization_and_pruning(tmp_path):
    calibration = [llava_inputs(1, seed=i) for i in range(2)]
    pipeline = qapframe.Pipeline(
        quantizer={"name": "gptq", "scheme": "W8A8", "group_size": 32, "act_dynamic": False},
        scorer={"name": "hybrid"}, pruner={"name": "topk", "retention": 0.5}, seed=3,
    )
    model = pipeline.apply(tiny_llava(seed=1), calibration)
    inputs = llava_inputs(2, prompt_lengths=[3, 5], seed=7)
    with torch.no_grad():
        reference = model(**inputs).logits
    kept = model.qapframe_last_selection
    out = qapframe.export(model, tmp_path / "pipeline")
    manifest = json.loads((out / PIPELINE_FILE).read_text())
    assert manifest["qapframe_version"] == qapframe.__version__
    assert manifest["pruning"]["scorer"]["name"] == "hybrid" and manifest["pruning"]["pruner"]["retention"] == 0.5
    assert manifest["pruning"]["seed"] == 3 and manifest["pruning"]["quant"]["bits"] == 8

    loaded = qapframe.load(out)
    assert loaded.qapframe_quantization == model.qapframe_quantization
    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 21 and all(m.quantized and m.act_quant.enabled for m in quantized.values())
    with torch.no_grad():
        logits = loaded(**inputs).logits
    assert torch.equal(logits, reference)  # same codes, same static ranges, same pruning
    assert str(loaded.qapframe_last_selection) == str(kept)


def test_load_names_the_version_that_wrote_an_unreadable_directory(tmp_path, w4_model):
    out = qapframe.export(w4_model, tmp_path / "future")
    manifest = json.loads((out / PIPELINE_FILE).read_text())
    manifest.update(format=99, qapframe_version="9.0.0")
    (out / PIPELINE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"written by qapframe 9\.0\.0 in pipeline format 99; qapframe 0\.1\.0 reads format 1"):
        qapframe.load(out)
    os.remove(out / PIPELINE_FILE)
    with pytest.raises(ExportError, match="not written by `qapframe export`"):
        qapframe.load(out)


def test_cli_exports_a_spec_and_refuses_a_non_empty_directory(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {path: toy}\n"
        "quantizer: {name: rtn, scheme: W4A16, group_size: 32, symmetric: true}\n"
        "scorer: {name: hybrid}\npruner: {name: topk, retention: 0.5}\n"
        "evaluation: {dataset: synthetic, split: test, num_samples: 2, calibration_samples: 0, seeds: [0]}\n"
    )
    out = tmp_path / "toy-w4"
    assert main(["export", str(spec), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "qapframe_pipeline.json", "tokenizer_config.json"} <= files
    assert main(["export", str(spec), "--out", str(out)]) == 2
    assert "not empty; choose another --out or pass --overwrite" in capsys.readouterr().err
    swept = tmp_path / "sweep.yaml"
    swept.write_text(spec.read_text() + "sweep:\n  pruner.retention: [0.5, 0.25]\n")
    assert main(["export", str(swept), "--out", str(tmp_path / "other")]) == 2
    assert "makes 2 configurations" in capsys.readouterr().err
