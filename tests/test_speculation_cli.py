"""The speculation flags of run.py and the bench: --prefetch, --lookahead, --speculate."""

import importlib.util
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
from conftest import add_tokenizer, make_checkpoint

from tinymoe import bench

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_speculation_cli", ROOT / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    """A baby checkpoint with a tokenizer and no calibration files (router runs with d_l = 0)."""
    return add_tokenizer(make_checkpoint(tmp_path_factory.mktemp("spec") / "baby", num_layers=4))


FAST_LINK = ["--link-gbps", "100", "--link-latency-us", "0"]
BASE = ["--prompt", "the cat sat on the mat", "--max-new-tokens", "6", "--json"]


def run_json(capsys, *argv: str) -> dict:
    assert run.cli(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("predictor", ["router", "router-nodefault", "previous-token", "oracle"])
@pytest.mark.parametrize("lookahead", ["1", "2"])
def test_exact_prefetch_keeps_resident_tokens(baby, capsys, predictor, lookahead):
    resident = run_json(capsys, "--model", str(baby), *BASE)
    out = run_json(
        capsys,
        "--model",
        str(baby),
        *BASE,
        "--prefetch",
        predictor,
        "--lookahead",
        lookahead,
        "--offload-policy",
        "lru",
        *FAST_LINK,
    )
    assert out["tokens"] == resident["tokens"]
    assert out["offload_policy"] == f"prefetch+{predictor}+lru"


def test_speculative_with_the_oracle_is_exact_and_never_misses_after_layer_0(baby, capsys):
    resident = run_json(capsys, "--model", str(baby), *BASE)
    out = run_json(
        capsys,
        "--model",
        str(baby),
        *BASE,
        "--prefetch",
        "oracle",
        "--speculate",
        *FAST_LINK,
    )
    assert out["offload_policy"] == "speculative+oracle"
    assert out["tokens"] == resident["tokens"]
    # Speculating, layers >= 1 run exactly the experts prefetched for them: their only misses
    # can be copies still in flight when needed ("late"), never a wrong guess.
    assert out["miss_kinds"]["mispredicted"] == 0
    assert sum(layer["misses"] for layer in out["layers"][1:]) <= out["miss_kinds"]["late"]
    assert out["layers"][0]["misses"] > 0  # layer 0 has nothing to predict from


def test_router_without_calibration_warns(baby, capsys):
    assert run.cli(["--model", str(baby), *BASE, "--prefetch", "router", "--speculate"]) == 0
    err = capsys.readouterr().err
    assert "d_l = 0" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--speculate"], "--speculate needs a predictor"),
        (["--prefetch", "router", "--offload-policy", "oracle"], "combines with"),
        (["--prefetch", "router", "--offload-policy", "resident"], "combines with"),
        (["--prefetch", "estimator"], "calibrate"),
        (["--prefetch", "nonsense"], "invalid choice"),
        (["--prefetch", "oracle", "--lookahead", "99"], "lookahead must be between 1 and 3"),
        (["--prefetch", "router", "--lookahead", "4"], "lookahead must be between 1 and 3"),
    ],
)
def test_bad_combinations_are_one_line_errors(baby, capsys, flags, message):
    with pytest.raises(SystemExit) if "nonsense" in flags else nullcontext():
        code = run.cli(["--model", str(baby), *BASE, *flags])
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_bench_rows_for_the_paper_comparison(baby, capsys):
    policies = "on-demand,lru,prefetch+router+lru,speculative+router,speculative+oracle,oracle"
    code = bench.cli(
        [
            "--model",
            str(baby),
            "--policies",
            policies,
            "--prompt-tokens",
            "8",
            "--max-new-tokens",
            "4",
            "--link-gbps",
            "100",
            "--link-latency-us",
            "0",
            "--json",
        ]
    )
    assert code == 0
    rows = {r["policy"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(policies.split(",")) <= set(rows)
    for name in ("lru", "prefetch+router+lru", "speculative+oracle", "oracle"):
        assert rows[name]["exact"], name  # lossless policies reproduce resident's tokens
    assert rows["on-demand"]["ratio_vs_on_demand"] == 1.0
