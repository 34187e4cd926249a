"""Metrics from per-record outcomes, mean/std, and the prefill timer."""

from __future__ import annotations

import math
import random
import statistics
import time

import pytest
import torch

from qapframe.eval.metrics import PrefillTimer, RecordOutcome, mean_std, record_metrics


def _outcomes(n: int, seed: int) -> list[RecordOutcome]:
    rng = random.Random(seed)
    return [
        RecordOutcome(i, f"r{i}", rng.choice(["colour", "count"]), "x", rng.random() < 0.6, rng.choice([4.0, 8.0]))
        for i in range(n)
    ]


def test_metrics_do_not_depend_on_how_records_were_sharded():
    outcomes = _outcomes(37, seed=1)
    whole = record_metrics(outcomes)
    shards = [outcomes[r::3] for r in range(3)]
    assert record_metrics([o for s in shards for o in s]) == whole
    # independent computation
    assert whole["accuracy"] == sum(o.correct for o in outcomes) / 37
    colour = [o for o in outcomes if o.type == "colour"]
    assert whole["accuracy_by_type"]["colour"] == sum(o.correct for o in colour) / len(colour)
    assert whole["retained_tokens"] == sum(o.retained_tokens for o in outcomes) / 37


def test_mean_std_is_the_sample_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.1, 0.4, 0.7])
    assert math.isclose(mean, 0.4) and math.isclose(std, statistics.stdev([0.1, 0.4, 0.7]))
    assert all(math.isnan(v) for v in mean_std([]))


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + 1


def test_prefill_timer_times_from_arming_to_the_end_of_the_first_forward():
    model = _Counting()
    timer = PrefillTimer(model)
    for _ in range(2):
        timer.arm()
        time.sleep(0.02)  # e.g. vision encoding and token selection before the LLM's first forward
        for _ in range(3):  # prefill, then two decoding steps
            model(torch.zeros(2))
    assert model.calls == 6 and len(timer.seconds) == 2 and all(0.02 <= s < 1.0 for s in timer.seconds)
    timer.remove()
    timer.arm()
    model(torch.zeros(2))
    assert len(timer.seconds) == 2


def test_cpu_peak_memory_is_reset_per_run_not_a_process_lifetime_maximum():
    import torch

    from qapframe.eval.metrics import PeakMemory

    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    if memory.kind != "cpu_peak_rss_per_run":
        pytest.skip("this system cannot reset the resident-set peak (not Linux >= 4.0)")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    del big
    first = memory.peak_mib()
    memory.start()  # the next run
    second = memory.peak_mib()
    assert first - second > 200
