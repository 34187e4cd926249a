"""The linear probes of research/toy/probes.py: they find what is linearly there and nothing else."""

import torch

import research.toy.probes as toy_probes
from qapframe.data.synthetic import COLOURS, SHAPES, make_record


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
    assert all(0.0 <= r["prior"] <= 1.0 for r in rows.values() if "prior" in r)
    assert 0.0 < rows["token variance explained by place + colour + shape"]["r2"] < 1.0


def test_additive_fit_is_one_on_ideal_tokens_and_near_zero_on_noise():
    """Ideal symbolic tokens (a vector per cell + per colour + per shape, summed) are reproduced exactly;
    tokens of pure noise, independent of the labels, keep almost none of their variance."""
    generator = torch.Generator().manual_seed(0)

    def table(images, tokens_of):
        cell = torch.arange(9).expand(images, -1)
        colour = torch.randint(0, 7, (images, 9), generator=generator)
        shape = torch.randint(0, 4, (images, 9), generator=generator)
        return {"cell": cell, "colour": colour, "shape": shape, "tokens": tokens_of(cell, colour, shape)}

    place, hue, form = (torch.randn(n, 16, generator=generator) for n in (9, 7, 4))
    ideal = lambda cell, colour, shape: place[cell] + hue[colour] + form[shape]  # noqa: E731
    assert toy_probes.additive_r2(table(200, ideal), table(50, ideal)) > 1 - 1e-9
    noise = lambda cell, colour, shape: torch.randn(*cell.shape, 16, generator=generator)  # noqa: E731
    assert abs(toy_probes.additive_r2(table(200, noise), table(50, noise))) < 0.05


def test_scene_counts_are_the_objects_of_each_colour_then_each_shape():
    records = [make_record(0, "train", i) for i in range(30)]
    counts = toy_probes.scene_counts(records)
    assert counts.shape == (30, len(COLOURS) + len(SHAPES))
    for row, record in zip(counts.tolist(), records):
        objects = record.meta["objects"]
        assert row[: len(COLOURS)] == [[o[0] for o in objects].count(c) for c in COLOURS]
        assert row[len(COLOURS):] == [[o[1] for o in objects].count(s) for s in SHAPES]
        # every object has one colour and one shape
        assert sum(row[: len(COLOURS)]) == sum(row[len(COLOURS):]) == len(objects)
