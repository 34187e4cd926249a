"""Multi-process evaluation with gloo on CPU: collective helpers, and torchrun giving single-process results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from qapframe import distributed as qdist

ROOT = Path(__file__).resolve().parents[2]


def test_single_process_helpers_are_no_ops():
    t = torch.tensor([1.0, -2.0])
    assert qdist.all_reduce_(t, "max") is t and t.tolist() == [1.0, -2.0]
    assert qdist.all_gather_objects({"a": 1}) == [{"a": 1}] and qdist.broadcast_object(3) == 3
    assert (qdist.rank(), qdist.world_size(), qdist.is_distributed()) == (0, 1, False)
    with pytest.raises(ValueError, match="op must be one of"):
        qdist.all_reduce_(t, "mean")


def test_shards_are_disjoint_and_cover_everything():
    items = list(range(11))
    shards = [qdist.shard(items, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == items and shards[1] == [1, 4, 7, 10]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert qdist.init_from_env("cpu")
    # Hessian-like sums and activation maxima, as the quantizers collect them per rank
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    h = qdist.all_reduce_sum(x.T @ x)
    amax = qdist.all_reduce_(x.abs().amax(dim=0), "max")
    amin = qdist.all_reduce_(x.amin(dim=0), "min")
    gathered = qdist.all_gather_objects((rank, x.tolist()))
    token = qdist.broadcast_object({"from": rank})
    Path(out_dir, f"{rank}.json").write_text(json.dumps(
        {"h": h.tolist(), "amax": amax.tolist(), "amin": amin.tolist(), "gathered": gathered, "token": token}
    ))
    qdist.destroy()


def test_statistics_all_reduce_over_two_gloo_processes(tmp_path):
    mp.start_processes(_collectives_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    xs = [torch.randn(5, 3, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(2)]
    full = torch.cat(xs)  # what one process holding all the data would compute
    for res in results:
        assert torch.allclose(torch.tensor(res["h"], dtype=torch.float64), full.T @ full, rtol=1e-12, atol=1e-12)
        assert torch.equal(torch.tensor(res["amax"], dtype=torch.float64), full.abs().amax(dim=0))
        assert torch.equal(torch.tensor(res["amin"], dtype=torch.float64), full.amin(dim=0))
        assert [r for r, _ in res["gathered"]] == [0, 1] and res["token"] == {"from": 0}
        assert torch.equal(torch.tensor(res["gathered"][1][1], dtype=torch.float64), xs[1])


CALIBRATION_CASES = {
    "gptq": {"name": "gptq", "scheme": "W4A16", "group_size": 32, "act_order": True},
    "smoothquant-static": {"name": "smoothquant", "scheme": "W8A8", "act_dynamic": False},
    "awq": {"name": "awq", "scheme": "W4A16", "group_size": 32, "grid_size": 4, "clip": False},
    "awq-clip": {"name": "awq", "scheme": "W4A16", "group_size": 32, "grid_size": 4, "clip_grid": 4},
    "spinquant": {"name": "rtn", "scheme": "W4A4", "group_size": 32, "rotation": {"name": "spinquant", "steps": 3}},
}


def _calibration_set():
    from tests.tiny_models import llava_inputs

    return [llava_inputs(1, prompt_lengths=[4 + i % 3], seed=i) for i in range(6)]


def _quantized_state(case: str, calibration) -> dict[str, torch.Tensor]:
    import qapframe
    from tests.tiny_models import tiny_llava

    torch.set_num_threads(1)
    model = qapframe.quantize(tiny_llava(), CALIBRATION_CASES[case], calibration)
    return {k: v.clone() for k, v in model.state_dict().items() if ".language_model." in k}


def _calibration_worker(rank: int, world: int, port: int, out_dir: str, case: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert qdist.init_from_env("cpu")
    state = _quantized_state(case, qdist.shard(_calibration_set()))  # this rank's half of the samples
    torch.save(state, Path(out_dir, f"{case}-{rank}.pt"))
    qdist.destroy()


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_sharded_calibration_quantizes_every_rank_identically(case, tmp_path):
    """Each rank sees half the calibration samples; all-reduced statistics make the ranks agree, and
    (where no sub-sampling is involved) agree with one process that saw every sample."""
    mp.start_processes(_calibration_worker, args=(2, _free_port(), str(tmp_path), case), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"{case}-{r}.pt") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.endswith(".qweight") for k in ranks[0])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    single = _quantized_state(case, _calibration_set())
    if case in ("awq-clip", "spinquant"):
        # Clipping searches a per-rank token sub-sample, and SpinQuant's steps each draw samples from the rank's
        # own shard (their gradients averaged): ranks agree, a single process draws other tokens.
        return
    for key, value in single.items():
        if key.endswith(".qweight") or key.endswith(".g_idx"):
            assert torch.equal(ranks[0][key], value), key
        else:
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-7, msg=key)


def _run_spec_worker(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    from qapframe.eval.runner import run_spec

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert qdist.init_from_env("cpu")
    run_spec(spec, output_dir=out_dir, progress=False)
    qdist.destroy()


def test_fewer_calibration_records_than_ranks_fails_that_run_clearly(tiny_llava_dir, tmp_path):
    spec = {"model": {"path": str(tiny_llava_dir)}, "quantizer": {"name": "gptq", "scheme": "W4A16"},
            "evaluation": {"num_samples": 2, "calibration_samples": 1, "max_new_tokens": 2}}
    mp.start_processes(_run_spec_worker, args=(2, _free_port(), spec, str(tmp_path)), nprocs=2, start_method="spawn")
    (record,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "error"
    assert "evaluation.calibration_samples" in record["error"] and "2 processes" in record["error"]


def test_torchrun_two_processes_match_one_process(tmp_path):
    """On the embedded toy LLaVA, as a user would run it."""
    from qapframe.eval.runner import run_spec

    spec = {
        "model": {"path": "toy"},
        "quantizer": {"name": "rtn", "scheme": "W4A4"},
        "scorer": {"name": "hybrid"},
        "pruner": {"name": "topk", "retention": 0.5},
        # 10 records in batches of 3: rank 0 gets batches 0 and 2, rank 1 batches 1 and 3 (uneven shards)
        "evaluation": {"num_samples": 10, "batch_size": 3, "max_new_tokens": 3, "calibration_samples": 4, "seeds": [0, 1]},
        "sweep": [
            {"quantizer": [None], "scorer": [None], "pruner": [None]},
            {"pruner.retention": [0.5, 0.25]},
            # calibrated on sharded records, Hessians all-reduced: the same weights as one process
            {"quantizer": [{"name": "gptq", "scheme": "W4A8", "group_size": 32}], "scorer": [None], "pruner": [None]},
        ],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    single = run_spec(path, output_dir=tmp_path / "single", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "qapframe", "run", str(path), "--output", str(tmp_path / "multi")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    written = [json.loads(line) for line in (tmp_path / "multi" / "results.jsonl").read_text().splitlines()]
    multi = {r["key"]: r for r in written}  # written as run: runs sharing a quantization one after another
    assert len(written) == len(multi) == len(single.records) == 8
    for one in single.records:
        two = multi[one["key"]]
        assert two["status"] == one["status"] == "ok" and two["world_size"] == 2 and one["world_size"] == 1
        assert two["label"] == one["label"]
        assert (two["quantization"] or {}).get("reused") == (one["quantization"] or {}).get("reused")
        assert two["outcomes"] == one["outcomes"]  # every prediction, in dataset order
        for metric in ("accuracy", "accuracy_by_type", "retained_tokens", "num_samples"):
            assert two["metrics"][metric] == one["metrics"][metric], metric
    summary = (tmp_path / "multi" / "summary.md").read_text()
    assert all(f"| rtn(scheme=W4A4) | hybrid | topk | {r} |" in summary for r in (0.5, 0.25)) and (tmp_path / "multi" / "accuracy_vs_retention.png").is_file()
