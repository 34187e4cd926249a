"""The linear probes of benchmarks/toy_probes.py: they find what is linearly there and nothing else."""

import importlib.util
from pathlib import Path

import torch

_SPEC = importlib.util.spec_from_file_location(
    "toy_probes", Path(__file__).resolve().parents[2] / "benchmarks" / "toy_probes.py"
)
toy_probes = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(toy_probes)


def test_probe_reads_a_linear_label_and_stays_at_the_prior_on_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)
    linear = (x @ torch.randn(16, 3, generator=g)).argmax(-1)  # 3 classes, linearly separable
    accuracy, _ = toy_probes.fit_probe(x[:400], linear[:400], x[400:], linear[400:], seed=0)
    assert accuracy > 0.93
    noise = torch.randint(0, 3, (600,), generator=g)
    accuracy, prior = toy_probes.fit_probe(x[:400], noise[:400], x[400:], noise[400:], seed=0)
    assert abs(accuracy - prior) < 0.12 and 0.2 < prior < 0.5


def test_shipped_toy_tokens_know_their_cell_and_the_mean_token_knows_colour_counts():
    from qapframe.toy import load_toy

    torch.manual_seed(0)
    model, processor = load_toy()
    rows = {r["probe"]: r for r in toy_probes.run_probes(model, processor, n_train=120, n_test=60)}
    assert rows["one token -> its cell"]["accuracy"] > 0.95  # stage 0's per-patch cell target
    red = rows["mean token -> number of red objects"]
    assert red["accuracy"] > red["prior"] + 0.15
    assert all(0.0 <= r["prior"] <= 1.0 for r in rows.values())
