"""The offloading interface contract: run.py's flags and --json fields, and the bench's JSON."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import add_tokenizer, make_checkpoint

from tinymoe import TinyMoeError, bench

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_offload_cli", ROOT / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

LAYER_KEYS = {"compute_ms", "copy_ms", "stall_ms", "hits", "misses"}


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    return add_tokenizer(make_checkpoint(tmp_path_factory.mktemp("cli") / "baby"))


def run_json(capsys, *argv: str) -> dict:
    assert run.cli(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_run_offload_flags_and_json_fields(baby, capsys, tmp_path):
    base = ["--model", str(baby), "--prompt", "the cat sat on the mat", "--max-new-tokens", "5"]
    resident = run_json(capsys, *base, "--json")
    trace = tmp_path / "t.json"
    out = run_json(
        capsys,
        *base,
        "--json",
        "--offload-policy",
        "lru",
        "--expert-slots",
        "3",
        "--link-gbps",
        "50",
        "--link-latency-us",
        "1",
        "--trace",
        str(trace),
    )
    assert out["tokens"] == resident["tokens"]
    for key in ("tokens", "tpot_ms", "hit_rate", "bytes_copied", "stall_ms", "layers", "prefill"):
        assert key in out
    assert out["expert_slots"] == 3 and out["offload_policy"] == "lru"
    assert len(out["layers"]) == 3 and all(set(s) >= LAYER_KEYS for s in out["layers"])
    assert out["bytes_copied"] > 0 and out["prefill"]["bytes_copied"] > 0
    # resident without --trace runs the bare model: nothing copied, nothing metered per layer
    assert resident["hit_rate"] is None and resident["bytes_copied"] == 0
    assert resident["layers"] is None
    assert "traceEvents" in json.loads(trace.read_text())


def test_run_oracle_and_preset(baby, capsys):
    base = ["--model", str(baby), "--prompt", "the cat sat", "--max-new-tokens", "4", "--json"]
    want = run_json(capsys, *base)["tokens"]
    out = run_json(capsys, *base, "--offload-policy", "oracle", "--link-preset", "pcie5-x16")
    assert out["tokens"] == want and out["expert_slots"] == 4


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--offload-policy", "on-demand", "--expert-slots", "1"], "fewer than top-k"),
        (["--link-gbps", "3"], "need an offloading"),
        (["--offload-policy", "lru", "--link-gbps", "0"], "must be > 0"),
        (["--expert-slots", "4"], "need an offloading policy"),
    ],
)
def test_run_offload_mistakes_are_one_line(baby, capsys, flags, message):
    assert run.cli(["--model", str(baby), "--prompt", "the cat", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_bench_json_rows(baby, capsys):
    argv = ["--model", str(baby), "--policies", "on-demand,lru,oracle,resident"]
    argv += ["--copy-share", "0.5", "--max-new-tokens", "4", "--prompt-tokens", "6", "--json"]
    assert bench.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["link_gbps"] > 0
    assert 1 <= out["prefetch_depth"] <= 8  # auto: derived once, from the resident run
    rows = {r["policy"]: r for r in out["rows"]}
    assert list(rows) == ["on-demand", "lru", "oracle", "resident"]
    for r in rows.values():
        for key in ("tpot_ms", "ratio_vs_on_demand", "eq1_bound_ms", "hit_rate", "gb_copied"):
            assert isinstance(r[key], float)
        assert r["exact"] is True
    assert rows["on-demand"]["ratio_vs_on_demand"] == 1.0
    assert rows["resident"]["gb_copied"] == 0.0 and rows["on-demand"]["hit_rate"] == 0.0


def test_bench_prefetch_depth_flag(baby, capsys):
    argv = ["--model", str(baby), "--policies", "on-demand", "--max-new-tokens", "2"]
    assert bench.main([*argv, "--prefetch-depth", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prefetch_depth"] == 3
    with pytest.raises(SystemExit) as exit_:
        bench.cli([*argv, "--prefetch-depth", "0"])
    assert exit_.value.code == 2 and "--prefetch-depth" in capsys.readouterr().err


def test_bench_rejects_unknown_policy_before_running(baby):
    with pytest.raises(TinyMoeError, match="unknown offload policy"):
        bench.main(["--model", str(baby), "--policies", "on-demand,psychic"])


def test_run_cpu_miss_handler_gives_resident_tokens(baby, capsys):
    base = ["--model", str(baby), "--prompt", "the cat sat", "--max-new-tokens", "6", "--json"]
    resident = run_json(capsys, *base)
    for flags in (["on-demand"], ["lru", "--expert-slots", "3"]):
        out = run_json(capsys, *base, "--offload-policy", *flags, "--miss-handler", "cpu")
        assert out["tokens"] == resident["tokens"] and out["bytes_copied"] == 0


def test_run_records_a_routing_trace(baby, capsys, tmp_path):
    from tinymoe.simulator.record import RoutingTrace

    path = tmp_path / "run.trace.json"
    base = ["--model", str(baby), "--prompt", "the cat sat", "--max-new-tokens", "5", "--json"]
    run_json(capsys, *base, "--offload-policy", "lru", "--record", str(path))
    trace = RoutingTrace.load(path)
    assert trace.decode_steps == 4 and len(trace.passes[0].layers) == 3
