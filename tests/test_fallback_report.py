"""Fail-safe speculation in the figures: the runtime's report and bench's "fell back" column."""

import math

import pytest
import torch
from conftest import make_checkpoint

from tinymoe import load_model
from tinymoe.bench import FAST_LINK, run_policy
from tinymoe.bench_table import format_table
from tinymoe.calibrate import CalibrationSettings, calibrate
from tinymoe.speculation.calibration import save_speculation

SETTINGS = CalibrationSettings(lookaheads=(1,), steps=10, batch_size=32, val_fraction=0.25)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("fb") / "m", num_layers=4)
    model = load_model(path)
    ids = torch.randint(
        1, model.cfg.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0)
    )
    cal = calibrate(model, ids, SETTINGS)
    save_speculation(cal, path)
    return model, cal


def row(model, cal, name, threshold):
    for (kind, _), est in cal.estimators.items():
        if kind == "context":
            est.threshold.fill_(threshold)
    return run_policy(model, name, [5, 6, 7, 8], 6, FAST_LINK, [], calibration=cal)


def test_bench_reports_the_share_that_fell_back(calibrated):
    model, cal = calibrated
    unsure = row(model, cal, "speculative+context", math.inf)
    sure = row(model, cal, "speculative+context", -math.inf)
    assert unsure["fallback_share"] == 1.0  # every guess unsure: routed exactly
    assert sure["fallback_share"] == 0.0
    exact = row(model, cal, "prefetch+context", math.inf)  # exact prefetch never falls back
    assert exact["fallback_share"] is None
    # Decode only: the share counts the decode steps' guesses (prefill never speculates), and
    # every fallback is exact, so the all-unsure run generates the resident tokens.
    assert unsure["tokens"] == exact["tokens"]


def test_table_shows_the_column_only_when_some_row_speculated_fail_safe():
    base = dict(
        expert_slots=4, tpot_ms=1.0, ratio_vs_on_demand=1.0, tokens_per_s=1.0, hit_rate=0.0,
        gb_copied=0.0, stall_share=0.0, copy_share=0.0, achieved_gbps=None, eq1_bound_ms=1.0,
        eq1_saving_share=None, exact=True, over_resident_us_per_layer=None,
    )  # fmt: skip
    result = dict(
        rows=[dict(base, policy="on-demand", fallback_share=None)],
        link_gbps=1.0, link_latency_us=0, prompt_tokens=4, new_tokens=2, prefetch_depth=1,
        threads=1,
    )  # fmt: skip
    assert "fell back" not in format_table(result)
    result["rows"].append(dict(base, policy="speculative+context", fallback_share=0.448))
    table = format_table(result)
    assert "fell back" in table.splitlines()[1]
    assert table.splitlines()[-1].rstrip().endswith("44.8%")
    assert table.splitlines()[-2].rstrip().endswith("-")
