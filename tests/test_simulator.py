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


class SplitCosts:
    """Costs that count what the replay asks for, per (pass, layer): a device expert X, a host
    expert H, a layer's two host copies C together; nothing else costs, the link is instant."""

    X, H, C = 1e-3, 0.4e-3, 0.3e-3

    def __init__(self, trace, host_parallel: bool) -> None:
        self.link, self.expert_bytes = LinkSpec(1e9, 0.0), trace.model["expert_bytes"]
        self.host_parallel = host_parallel
        self.device: dict = {}  # (p, layer) -> device experts
        self.host: dict = {}  # (p, layer) -> host_expert_s calls (in turn: one per expert)
        self.copies: dict = {}  # (p, layer) -> [(rows_in, rows_out)] per host_copies_s call

    def layer_s(self, p, layer, rec):
        return 0.0

    def expert_s(self, p, layer, rec):
        self.device[p, layer] = self.device.get((p, layer), 0) + 1
        return self.X

    def host_expert_s(self, p, layer, rec):
        self.host[p, layer] = self.host.get((p, layer), 0) + 1
        return self.H

    def host_copies_s(self, p, layer, rec, rows_in, rows_out):
        self.copies.setdefault((p, layer), []).append((rows_in, rows_out))
        return self.C

    def guess_s(self, p, layer, rec, predictor):
        return 0.0

    def head_s(self, p):
        return 0.0


def test_host_experts_run_beside_the_device_experts_with_one_copy_each_way(trace):
    """On a GPU (host_parallel) a layer's host experts cost one copy each way, not one per
    expert, and run beside its device experts: the layer takes max(device experts, copies + host
    experts). On a CPU (the host is the device) they run in turn and nothing is copied."""
    decode = [p for p, ps in enumerate(trace.passes) if ps.phase == "decode"]
    L = trace.model["num_layers"]
    gpu = SplitCosts(trace, host_parallel=True)
    sim = simulate(trace, "oracle", gpu, slots=3, miss_handler="cpu")
    X, H, C = SplitCosts.X, SplitCosts.H, SplitCosts.C
    step_s, host_experts, mixed = [], 0, 0
    for p in decode:
        t = 0.0
        for layer in range(L):
            d, copies = gpu.device.get((p, layer), 0), gpu.copies.get((p, layer), [])
            assert len(copies) <= 1  # one pair of copies per layer, however many host experts
            if copies:
                ((rows_in, h),) = copies
                assert rows_in == 1  # a decode step copies its one token once
                host_experts, mixed = host_experts + h, mixed + (d > 0)
                t += max(d * X, C + h * H)
            else:
                t += d * X
        step_s.append(t)
    assert sim["host_computed"] == host_experts > 0  # the decode's, all counted in the copies
    assert mixed > 0  # layers where the two really ran side by side
    assert sim["tpot_ms"] == pytest.approx(1e3 * sum(step_s) / len(decode), rel=1e-6)

    cpu = SplitCosts(trace, host_parallel=False)
    serial = simulate(trace, "oracle", cpu, slots=3, miss_handler="cpu")
    assert not cpu.copies
    want = [sum(cpu.device.get((p, l), 0) * X + cpu.host.get((p, l), 0) * H for l in range(L))
            for p in decode]  # fmt: skip
    assert serial["tpot_ms"] == pytest.approx(1e3 * sum(want) / len(decode), rel=1e-6)
    # The same decisions (the scheduler reads no clock), only costed in turn.
    assert cpu.device == gpu.device and serial["host_computed"] == sim["host_computed"]


def test_roofline_host_miss_costs_two_copies_per_layer(trace):
    """On-demand with the CPU handler computes every expert on the host: a decode step costs, per
    layer, its attention, K host experts, and two copies (one token in, K rows out)."""
    cfg = ModelConfig.from_file("docs/configs/qwen3-30b-a3b.json")
    scaled = scale_trace(trace, cfg)
    costs = RooflineCosts(HARDWARE["a6000"], cfg, context=2048)
    got = simulate(scaled, "on-demand", costs, miss_handler="cpu")
    K, rec = cfg.top_k, scaled.passes[1].layers[0]
    per_layer = (
        costs.layer_s(1, 0, rec) + costs.host_copies_s(1, 0, rec, 1, K)
        + K * costs.host_expert_s(1, 0, rec)
    )  # fmt: skip
    assert got["host_computed"] > 0 and got["bytes_copied"] == 0
    want_ms = 1e3 * (cfg.num_layers * per_layer + costs.head_s(1))
    assert got["tpot_ms"] == pytest.approx(want_ms, rel=1e-9)
    # Two latencies per layer, not one (or two) per host expert.
    assert costs.host_copies_s(1, 0, rec, 1, K) < 3 * costs.link.latency_us * 1e-6
