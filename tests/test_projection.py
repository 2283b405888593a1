"""Projections: scale_trace's mapping, expert sizes by dtype, the projected depth, assumptions."""

import dataclasses
import json
import random

import pytest

from tinymoe import TinyMoeError
from tinymoe.engine.config import ModelConfig
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.scheduler import throttle_depth
from tinymoe.simulate import main as simulate_main
from tinymoe.simulator.costs import (
    EXPERT_DTYPES,
    HARDWARE,
    Hardware,
    RooflineCosts,
    expert_bytes,
    projected_depth,
    scale_trace,
)
from tinymoe.simulator.record import LayerRecord, PassRecord, RoutingTrace

QWEN = ModelConfig.from_file("docs/configs/qwen3-30b-a3b.json")


def synthetic_trace(E: int, K: int, L: int = 4, steps: int = 300, seed: int = 0) -> RoutingTrace:
    """A recorded-looking trace: a 6-token prefill, then `steps` decode steps whose routing keeps
    each expert of the last step with probability 1/2 (temporal locality, as real routers show);
    the "router" guess for layer l + 1 is its routing (shuffled) two times in three."""
    rng = random.Random(seed)
    last = [rng.sample(range(E), K) for _ in range(L)]

    def step() -> list[list[int]]:
        for layer in range(L):
            keep = [e for e in last[layer] if rng.random() < 0.5]
            fresh = [e for e in rng.sample(range(E), E) if e not in keep][: K - len(keep)]
            last[layer] = keep + fresh
        return [list(r) for r in last]

    passes = []
    for p in range(1 + steps):
        tokens = [step() for _ in range(6 if p == 0 else 1)]  # [token][layer] -> K ids
        layers = []
        for layer in range(L):
            guesses = {}
            if layer + 1 < L:  # the last layer has no next layer to guess
                rows = []
                for t in tokens:
                    g = (
                        rng.sample(t[layer + 1], K)
                        if rng.random() < 2 / 3
                        else rng.sample(range(E), K)
                    )
                    rows.append(g)
                guesses["router"] = rows
            layers.append(LayerRecord([t[layer] for t in tokens], guesses))
        passes.append(PassRecord("prefill" if p == 0 else "decode", layers))
    model = {"model_type": "qwen3_moe", "num_layers": L, "num_experts": E, "top_k": K}
    machine = {"link": {"gbps": 10.0, "latency_us": 0.0}}
    return RoutingTrace({**model, "expert_bytes": 1000}, machine, 1, ["router"], passes)


def target(E: int, K: int) -> ModelConfig:
    return dataclasses.replace(QWEN, num_experts=E, top_k=K, num_layers=8)


@pytest.fixture(scope="module")
def demo_like():
    return synthetic_trace(32, 4)  # the demo's shape: 32 experts, top-4


def test_projection_onto_qwen3_uses_all_128_experts_per_layer(demo_like):
    scaled = scale_trace(demo_like, QWEN)
    assert scaled.model["num_layers"] == 48 and scaled.machine["scale_mapping"]["stay"] == 0.5
    for layer in range(48):
        used = {e for p in scaled.passes for row in p.layers[layer].experts for e in row}
        assert used == set(range(128)), f"layer {layer} uses {len(used)} of 128"
    # The old mapping's failure, for contrast: members fixed (stay 1) reach only half of them.
    fixed = scale_trace(demo_like, QWEN, stay=1.0)
    used = {e for p in fixed.passes for row in p.layers[0].experts for e in row}
    assert len(used) == 64


@pytest.mark.parametrize(
    "E_rec,K_rec,E,K",
    [(32, 4, 128, 8), (32, 4, 128, 6), (32, 4, 60, 7), (8, 2, 128, 8), (32, 4, 8, 2),
     (16, 4, 16, 3), (8, 2, 64, 5), (32, 4, 40, 40)],
)  # fmt: skip
def test_every_token_gets_exactly_k_distinct_target_experts(E_rec, K_rec, E, K):
    trace = synthetic_trace(E_rec, K_rec, steps=60)
    scaled = scale_trace(trace, target(E, K))
    used: set[int] = set()
    for p in scaled.passes:
        for rec in p.layers:
            for row in rec.experts:
                assert len(row) == len(set(row)) == K and all(0 <= e < E for e in row)
                used.update(row)
            for rows in rec.guesses.values():
                assert all(len(r) == len(set(r)) == K and max(r) < E for r in rows)
    if E_rec <= E:
        assert used == set(range(E))  # every target expert reachable


@pytest.mark.parametrize("E,K", [(128, 8), (128, 6), (60, 7), (8, 2)])
def test_a_guess_equal_to_the_routing_stays_equal(demo_like, E, K):
    """The guess made at layer l for layer l + 1 maps as that layer's routing of the same
    token: named in any order, the same recorded experts give the same target experts."""
    scaled = scale_trace(demo_like, target(E, K))
    L_rec, equal, wrong = demo_like.model["num_layers"], 0, 0
    for p, (rec_p, sc_p) in enumerate(zip(demo_like.passes, scaled.passes, strict=True)):
        for t in range(len(sc_p.layers) - 1):
            rec_guess = rec_p.layers[t % L_rec].guesses.get("router")
            if rec_guess is None:
                continue
            rec_truth = rec_p.layers[(t + 1) % L_rec].experts
            got, truth = sc_p.layers[t].guesses["router"], sc_p.layers[t + 1].experts
            for g, r, sg, st in zip(rec_guess, rec_truth, got, truth, strict=True):
                if set(g) == set(r):
                    assert set(sg) == set(st), (p, t)
                    equal += 1
                elif E >= 32:  # disjoint buckets: a wrong recorded guess stays wrong
                    wrong += set(sg) != set(st)
    assert equal > 100 and (wrong > 50 or E < 32)


def test_reuse_keeps_its_members_with_probability_stay(demo_like):
    """Same sparsity (K/E as recorded): a relabelling, every reuse kept. Qwen3-30B-A3B from
    32/top-4: a recorded expert reused in the next step keeps its targets about half the time."""
    same = scale_trace(demo_like, target(128, 16))
    assert same.machine["scale_mapping"]["stay"] == 1.0
    half = scale_trace(demo_like, target(128, 8))
    kept = moved = 0
    for p in range(2, len(demo_like.passes)):
        for layer in range(4):
            prev, now = (demo_like.passes[q].layers[layer].experts[0] for q in (p - 1, p))
            for sc, count in ((same, None), (half, True)):
                a, b = (set(sc.passes[q].layers[layer].experts[0]) for q in (p - 1, p))
                for e in set(prev) & set(now):
                    lo, hi = e * 128 // 32, (e + 1) * 128 // 32
                    ta, tb = {x for x in a if lo <= x < hi}, {x for x in b if lo <= x < hi}
                    if count is None:
                        assert ta == tb == set(range(lo, hi))
                    elif ta & tb:
                        kept += 1
                    else:
                        moved += 1
    assert kept + moved > 500 and 0.4 < kept / (kept + moved) < 0.6
    assert scale_trace(demo_like, QWEN).passes == scale_trace(demo_like, QWEN).passes  # fixed


def test_expert_bytes_follow_the_dtype():
    numel = 3 * 768 * 2048
    assert expert_bytes(QWEN) == expert_bytes(QWEN, "float16") == numel * 2
    assert expert_bytes(QWEN, "float32") == numel * 4
    assert expert_bytes(QWEN, "int8") == numel + numel // 64  # + one fp16 scale per 128
    assert expert_bytes(QWEN, "int4") == numel // 2 + numel * 5 // 256  # + scale, int4 zero
    assert expert_bytes(QWEN, "q4_0") == numel // 32 * 18
    assert all(source for _, source in EXPERT_DTYPES.values())
    with pytest.raises(TinyMoeError, match="expected one of"):
        expert_bytes(QWEN, "int3")
    bf16 = RooflineCosts(HARDWARE["a6000"], QWEN, 2048)
    int4 = RooflineCosts(HARDWARE["a6000"], QWEN, 2048, expert_dtype="int4")
    ratio = int4.expert_bytes / bf16.expert_bytes
    rec = LayerRecord([[0]])
    assert int4.expert_s(0, 0, rec) == pytest.approx(ratio * bf16.expert_s(0, 0, rec))
    assert int4.host_expert_s(0, 0, rec) == pytest.approx(ratio * bf16.host_expert_s(0, 0, rec))
    assert int4.layer_s(0, 0, rec) == bf16.layer_s(0, 0, rec)  # activations stay bf16
    assert scale_trace(synthetic_trace(32, 4, steps=2), QWEN, "int4").model["expert_bytes"] == (
        int4.expert_bytes
    )


def test_host_gemv_efficiency_is_a_named_assumption():
    hw = HARDWARE["a6000"]
    costs = RooflineCosts(hw, QWEN, 2048)
    want = costs.expert_bytes / (hw.host_peak_gbps * 1e9 * RooflineCosts.host_efficiency)
    assert costs.host_expert_s(0, 0, LayerRecord([[0]])) == pytest.approx(want)

    class Faster(RooflineCosts):
        host_efficiency = 0.9

    assert Faster(hw, QWEN, 2048).host_expert_s(0, 0, LayerRecord([[0]])) < want


def test_projected_depth_comes_from_the_projected_costs(demo_like):
    scaled = scale_trace(synthetic_trace(32, 4, steps=5), QWEN)
    for link_gbps in (25.0, 2000.0, 20000.0):
        hw = Hardware("test", 2000.0, LinkSpec(link_gbps, 0.0), 300.0, "a test host")
        costs = RooflineCosts(hw, QWEN, 2048)
        rec = scaled.passes[1].layers[0]
        layer_s = costs.layer_s(1, 0, rec) + 8 * costs.expert_s(1, 0, rec) + costs.head_s(1) / 48
        want = throttle_depth(layer_s, costs.link.seconds(costs.expert_bytes), 128)
        assert projected_depth(costs, scaled) == want
    assert want > 2 and projected_depth(RooflineCosts(HARDWARE["a6000"], QWEN, 2048), scaled) == 1


def test_every_assumption_is_in_the_projection_and_its_json(demo_like, tmp_path, capsys):
    path = tmp_path / "t.json"
    synthetic_trace(32, 4, steps=6).save(path)
    argv = ["--trace", str(path), "--hardware", "h100-pcie", "--scale-to",
            "docs/configs/qwen3-30b-a3b.json", "--policies", "on-demand,lru", "--json"]  # fmt: skip
    assert simulate_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    a = out["assumptions"]
    keys = ["device_efficiency", "layer_overhead_us", "kv_context_tokens", "link_latency_us"]
    keys += ["host_efficiency", "expert_bytes_per_param", "routing", "host_experts"]
    for key in keys:
        assert a[key]["source"], key
    assert a["routing"]["value"] == "bucket-rotation" and a["expert_dtype"]["value"] == "bfloat16"
    costs = RooflineCosts(HARDWARE["h100-pcie"], QWEN, 2048)
    trace = scale_trace(RoutingTrace.load(path), QWEN)
    assert out["prefetch_depth"] == projected_depth(costs, trace)
    assert simulate_main([*argv, "--prefetch-depth", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["prefetch_depth"] == 3  # given: kept
