"""The what-if simulator: its replay makes the engine's decisions; traces, scaling, the CLI."""

import json

import pytest
from conftest import make_checkpoint

from tinymoe import TinyMoeError, bench, load_model
from tinymoe import simulate as simulate_tool
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.generate import generate
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.simulate import main as simulate_main
from tinymoe.simulator.costs import HARDWARE, MeasuredCosts, RooflineCosts, scale_trace
from tinymoe.simulator.record import RoutingTrace, record_run
from tinymoe.simulator.replay import simulate
from tinymoe.speculation.predictors import make_predictor

PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]
LINK = LinkSpec(100.0, 0.0)


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sim") / "baby", num_layers=4)


@pytest.fixture(scope="module")
def trace(baby):
    model = load_model(baby)
    return record_run(model, PROMPT, 6, LINK, ["oracle", "router-nodefault"], str(baby), 1)


@pytest.mark.parametrize(
    "policy,slots",
    [("on-demand", None), ("lru", 3), ("lfu", 5), ("prefetch+router-nodefault+lru", 6)],
)
def test_replay_copies_what_the_engine_copies(baby, trace, policy, slots):
    """The replay drives the engine's own scheduler, and the scheduler decides from state alone:
    so the simulated run copies exactly the bytes the real one does, for the same uses."""
    model = load_model(baby)
    predictor = None
    if "router" in policy:
        predictor = make_predictor("router-nodefault", model, None, 1)
    with OffloadRuntime(model, policy, predictor=predictor, slots=slots, link=LINK) as rt:
        generate(model, PROMPT, 6, eos_ids=())
        real = rt.report()
    sim = simulate(trace, policy, MeasuredCosts(trace, LINK), slots)
    for key in ("bytes_copied", "prefetch_bytes", "wasted_prefetch_bytes"):
        assert sim[key] == real["decode"][key], key
    assert sim["hits"] + sim["misses"] == real["decode"]["hits"] + real["decode"]["misses"]
    assert sim["steps"] == real["decode"]["steps"] == 5


def test_replay_times_follow_the_cost_model(trace):
    """Resident: the recorded compute and nothing else; on-demand over a slow link: the copies
    on top, each layer's copies waited for in full (the paper's baseline)."""
    fast = simulate(trace, "resident", MeasuredCosts(trace, LINK))
    decode = [p for p in trace.passes if p.phase == "decode"]
    want = sum(
        sum(r.attention_s + r.router_s + len(set(r.experts[0])) * r.expert_s for r in p.layers)
        + p.head_s
        for p in decode
    ) / len(decode)
    assert fast["tpot_ms"] == pytest.approx(1e3 * want, rel=1e-9)
    slow = LinkSpec(0.01, 0.0)  # 1e7 B/s
    od = simulate(trace, "on-demand", MeasuredCosts(trace, slow))
    per_copy_ms = 1e3 * slow.seconds(trace.model["expert_bytes"])
    copies = od["bytes_copied"] / trace.model["expert_bytes"] / od["steps"]
    assert od["tpot_ms"] == pytest.approx(fast["tpot_ms"] + copies * per_copy_ms, rel=0.02)
    oracle = simulate(trace, "oracle", MeasuredCosts(trace, slow))
    assert oracle["tpot_ms"] < od["tpot_ms"]  # copies overlap compute


def test_trace_file_round_trip_and_version(trace, tmp_path):
    path = tmp_path / "t.json"
    trace.save(path)
    back = RoutingTrace.load(path)
    assert back.passes[1].layers[2].experts == trace.passes[1].layers[2].experts
    assert back.passes[0].layers[0].guesses == trace.passes[0].layers[0].guesses
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(TinyMoeError, match="version 1"):
        RoutingTrace.load(path)


def test_scale_to_a_published_shape(trace):
    cfg = ModelConfig.from_file("docs/configs/qwen3-30b-a3b.json")
    scaled = scale_trace(trace, cfg)
    assert scaled.model["num_layers"] == 48 and scaled.model["expert_bytes"] == 3 * 768 * 2048 * 2
    rows = [r for p in scaled.passes for layer in p.layers for r in layer.experts]
    assert all(len(r) == len(set(r)) == 8 and max(r) < 128 for r in rows)
    costs = RooflineCosts(HARDWARE["a6000"], cfg, context=2048)
    resident = simulate(scaled, "resident", costs)
    od = simulate(scaled, "on-demand", costs)
    cpu = simulate(scaled, "on-demand", costs, miss_handler="cpu")
    assert resident["tpot_ms"] < cpu["tpot_ms"] < od["tpot_ms"]  # PCIe 4.0 vs 8-channel DDR4
    assert cpu["bytes_copied"] == 0 and cpu["host_computed"] > 0


def test_validate_prints_simulated_beside_measured(baby, capsys):
    argv = ["--model", str(baby), "--validate", "--policies", "on-demand,lru,oracle"]
    argv += ["--link-gbps", "0.05", "--max-new-tokens", "4", "--repeat", "1", "--json"]
    assert simulate_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["policy"]: r for r in out["rows"]}
    assert list(rows) == ["on-demand", "lru", "oracle"]
    for r in rows.values():
        assert r["simulated_tpot_ms"] > 0 and r["measured_tpot_ms"] > 0


def test_mistakes_are_one_line(baby):
    with pytest.raises(TinyMoeError, match="--trace"):
        simulate_main(["--policies", "lru"])
    with pytest.raises(TinyMoeError, match="--hardware"):
        simulate_main(["--model", str(baby), "--scale-to", "docs/configs/mixtral-8x7b.json"])
    with pytest.raises(TinyMoeError, match="miss-handlers"):
        simulate_main(["--model", str(baby), "--miss-handlers", "gpu"])


@pytest.mark.parametrize(
    "flag, value",
    [("--max-new-tokens", "0"), ("--max-new-tokens", "1"), ("--copy-share", "2"),
     ("--prompt-tokens", "-1"), ("--repeat", "0"), ("--expert-slots", "0"),
     ("--prefetch-depth", "0"), ("--lookahead", "x"), ("--seed", "x"), ("--threads", "0")],
)  # fmt: skip
def test_bad_run_flags_are_the_same_one_line_in_simulate_and_bench(baby, capsys, flag, value):
    """The flags the two tools share are declared once (bench.add_run_flags), with one type."""
    errors = []
    for tool in (simulate_tool, bench):
        with pytest.raises(SystemExit) as exit:
            tool.cli(["--model", str(baby), flag, value])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.startswith(f"error: {flag}: ")
        errors.append(err)
    assert errors[0] == errors[1]
