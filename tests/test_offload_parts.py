"""The offloading parts on their own: cache eviction, the simulated link, miss taxonomy, trace."""

import json
import threading
import time

import pytest
import torch
from conftest import make_checkpoint

from tinymoe import generate, load_model
from tinymoe.engine.moe import Routing
from tinymoe.offload.cache import ExpertCache
from tinymoe.offload.link import LinkSpec, SimulatedLink
from tinymoe.offload.meter import HostClock, classify_miss, eq1_bound_ms
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.offload.trace import PerfettoTrace


def make_cache(n: int, eviction: str = "lru") -> ExpertCache:
    return ExpertCache(n, 4, torch.device("cpu"), torch.float32, eviction)


def load(cache: ExpertCache, *keys) -> None:
    """Insert each key: held, unpinned, so evictable."""
    for key in keys:
        cache.insert(key)


# ---------------------------------------------------------------- the cache


def test_cache_never_evicts_pinned_slots():
    cache = make_cache(2)
    a, _ = cache.insert((0, 0))
    b, _ = cache.insert((0, 1))
    cache.pin(a)  # a layer is computing with both
    cache.pin(b)
    assert cache.insert((0, 2)) is None  # both pinned: no victim, never a forced eviction
    cache.unpin(b)
    assert cache.insert((0, 2)) == (b, (0, 1))
    assert cache.lookup((0, 0)) == a and cache.lookup((0, 1)) is None


def test_lru_evicts_least_recently_used():
    cache = make_cache(3)
    load(cache, (0, 0), (0, 1), (0, 2))
    cache.touch((0, 0))
    cache.touch((0, 2))
    _, evicted = cache.insert((1, 0))
    assert evicted == (0, 1)


def test_lfu_evicts_least_frequently_used_and_remembers_history():
    cache = make_cache(3, "lfu")
    load(cache, (0, 0), (0, 1), (0, 2))
    for key, n in (((0, 0), 3), ((0, 1), 1), ((0, 2), 2)):
        for _ in range(n):
            cache.touch(key)
    cache.touch((0, 1))  # most recent, but still the least frequent (2 < 3): LRU would keep it
    slot, evicted = cache.insert((1, 0))
    assert evicted == (0, 2)  # counts: (0,0) 3, (0,1) 2, (0,2) 2 -> tie broken by recency
    # (1,0) is new (0 uses): the next victim, although it is the most recent.
    assert cache.insert((1, 1))[1] == (1, 0)
    slot, evicted = cache.insert((0, 2))  # (0,2) comes back, in place of (1,1) (0 uses)
    assert evicted == (1, 1)
    # Counts survive eviction: (0,2) still has 2 uses, so the tie with (0,1) goes by recency
    # and (0,1) leaves. Had its count restarted at 0, (0,2) would be the victim.
    assert cache.insert((2, 0))[1] == (0, 1)


def test_reserved_slots_yield_only_to_demand():
    cache = make_cache(2)
    load(cache, (1, 0), (1, 1))
    cache.reserve(cache.lookup((1, 0)))
    cache.reserve(cache.lookup((1, 1)))
    assert cache.insert((1, 2), evict_reserved=False) is None  # one prefetch never undoes another
    slot, evicted = cache.insert((0, 5), evict_reserved=True)  # a demand miss may
    assert evicted in {(1, 0), (1, 1)} and not cache.reserved[slot]


# ---------------------------------------------------------------- the simulated link


def test_simulated_link_takes_the_modelled_time_first_in_first_out():
    spec = LinkSpec(gbps=1.0, latency_us=500.0)
    src = torch.arange(250_000, dtype=torch.float32)  # 1 MB: 1 ms + 0.5 ms latency
    dst = [torch.zeros_like(src) for _ in range(2)]
    link = SimulatedLink(spec)
    try:
        ts = [link.copy(d, src, i, f"copy {i}") for i, d in enumerate(dst)]
        for t in ts:
            t.compute_wait()
        assert all(torch.equal(d, src) for d in dst)  # the bytes really moved
        (s0, e0), (s1, _) = ts[0].stamps(), ts[1].stamps()
        assert e0 - s0 >= spec.seconds(1_000_000) - 1e-9  # (rounding of start + busy - start)
        assert s1 >= e0  # the second copy queued behind the first
        assert ts[1].done()
    finally:
        link.close()
    assert not link.worker.is_alive()


def test_closed_link_fails_queued_copies_instead_of_hanging():
    link = SimulatedLink(LinkSpec(100.0))
    started, gate = threading.Event(), threading.Event()
    link.before_copy = lambda t: started.set() or gate.wait(5)
    src = torch.ones(16)
    first = link.copy(torch.zeros(16), src, 0, "first")
    second = link.copy(torch.zeros(16), src, 1, "second")
    assert started.wait(5)  # the worker is inside the first copy
    closer = threading.Thread(target=link.close)
    closer.start()
    gate.set()
    closer.join(10)
    first.compute_wait()  # already running when close came: it completes
    with pytest.raises(Exception, match="closed"):
        second.compute_wait()


# ---------------------------------------------------------------- the miss taxonomy


def test_classify_miss_rules():
    assert classify_miss({1}, 2, False) == "mispredicted"
    assert classify_miss({1}, 2, True) == "mispredicted"  # a wrong guess beats the history
    assert classify_miss({2}, 2, False) == "compulsory"
    assert classify_miss(None, 2, True) == "capacity"


class Scripted:
    """A predictor that never predicts by itself: the test writes the hook's predictions."""

    lookahead = 1

    def reset(self) -> None:
        pass

    def observe(self, layer, resid, u, routing):
        return None


def routing(*ids: int) -> Routing:
    return Routing(torch.tensor([list(ids)]), torch.ones(1, len(ids)))


def test_miss_taxonomy_on_a_hand_made_sequence(tmp_path):
    from conftest import make_checkpoint

    model = load_model(make_checkpoint(tmp_path / "m"))
    gate = threading.Event()
    rt = OffloadRuntime(
        model,
        "prefetch+scripted",
        predictor=Scripted(),
        slots=3,
        link=LinkSpec(100.0),
        prefetch_depth=None,  # unthrottled: both prefetches of B go on the link at once
    )
    # Prefetch copies wait at this gate, so they are certainly in flight when first needed.
    rt.engine.before_copy = lambda t: t.tag.kind == "prefetch" and gate.wait(10)
    hook = rt.hook
    try:
        list(rt.layers.experts(0, [0, 1]))  # A: first uses, no prediction -> 2 compulsory
        hook.last_prediction[1] = routing(5, 6)
        hook.pending[2] = routing(3, 4)
        list(
            rt.layers.experts(1, [0])
        )  # B: predicted {5, 6} -> mispredicted; prefetches (2,3), (2,4)
        hook.last_prediction[2] = routing(3, 4)
        threading.Timer(0.2, gate.set).start()
        list(
            rt.layers.experts(2, [3, 5])
        )  # C: (2,3) in flight -> late; 5 not predicted -> mispredicted
        del hook.last_prediction[1]
        list(
            rt.layers.experts(0, [0])
        )  # D: (0,0) was evicted at B -> capacity; evicts unused (2,4)
        list(rt.layers.experts(2, [3]))  # E: a hit
        layers = rt.report()["prefill"]["layers"]
        kinds = [dict(+s.miss_kinds) for s in rt.stats["prefill"].layers]
    finally:
        rt.close()
    assert kinds == [
        {"compulsory": 2, "capacity": 1},
        {"mispredicted": 1},
        {"late": 1, "mispredicted": 1},
    ]
    assert [s["hits"] for s in layers] == [0, 0, 1]
    assert rt.stats["prefill"].layers[2].wasted_bytes == rt.store.expert_bytes  # (2,4), unused
    assert rt.stats["prefill"].layers[2].prefetch_bytes == 2 * rt.store.expert_bytes


# ---------------------------------------------------------------- instruments


def test_trace_json_has_a_compute_and_a_copy_track(tmp_path):
    from conftest import make_checkpoint

    from tinymoe import generate

    model = load_model(make_checkpoint(tmp_path / "m"))
    with OffloadRuntime(model, "on-demand", link=LinkSpec(100.0), trace=True) as rt:
        generate(model, [1, 2, 3, 4], 3, eos_ids=())
        rt.write_trace(tmp_path / "t.json")
    trace = json.loads((tmp_path / "t.json").read_text())
    events = trace["traceEvents"]
    names = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    assert set(names) == {"compute", "copy"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all({"name", "ts", "dur", "pid", "tid"} <= e.keys() and e["dur"] >= 0 for e in spans)
    compute = [e for e in spans if e["tid"] == names["compute"]]
    copies = [e for e in spans if e["tid"] == names["copy"]]
    assert {"L0 attention", "L0 router", "L0 experts", "norm + lm_head"} <= {
        e["name"] for e in compute
    }
    assert copies and all(e["name"].startswith("L") and e["args"]["kind"] for e in copies)
    # Every stall sits inside an experts span (so the viewer nests it there).
    experts = [e for e in compute if e["name"].endswith("experts")]
    for s in (e for e in compute if e["name"] == "stall"):
        assert any(x["ts"] <= s["ts"] and s["ts"] + s["dur"] <= x["ts"] + x["dur"] for x in experts)
    # The link is one queue: copies never overlap each other.
    copies.sort(key=lambda e: e["ts"])
    assert all(
        a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(copies, copies[1:], strict=False)
    )


def test_trace_span_units_are_microseconds():
    tr = PerfettoTrace()
    tr.span("copy", "x", tr.t0 + 1.0, tr.t0 + 1.5)
    (ev,) = [e for e in tr.to_json()["traceEvents"] if e["ph"] == "X"]
    assert ev["ts"] == pytest.approx(1e6) and ev["dur"] == pytest.approx(5e5)


def test_eq1_bound():
    layers = [{"copy_ms": 8.0, "compute_ms": 2.0}, {"copy_ms": 1.0, "compute_ms": 3.0}]
    assert eq1_bound_ms(20.0, layers) == pytest.approx(20.0 - 2.0 - 1.0)


class AlwaysWrong:
    """Predicts, for layer l + 1, every expert that layer does NOT route to (from a recording)."""

    lookahead = 1

    def __init__(self, forwards, num_experts: int) -> None:
        self.forwards, self.num_experts, self.step = forwards, num_experts, -1

    def reset(self) -> None:
        self.step = -1

    def observe(self, layer, resid, u, routing):
        self.step += layer == 0
        layers = self.forwards[self.step]
        if layer + 1 >= len(layers):
            return None
        wrong = sorted(set(range(self.num_experts)) - set(layers[layer + 1].ids.flatten().tolist()))
        if not wrong:
            return None
        ids = torch.tensor([wrong] * u.shape[0])
        return Routing(ids, torch.ones(ids.shape))


@pytest.mark.parametrize("depth", [1, None])
def test_throttled_exact_prefetch_wastes_at_most_depth_copies_per_layer(tmp_path, depth):
    """On a slow link, a predictor that is always wrong puts at most `depth` useless copies on
    the link per layer (unthrottled: all of them), and the output stays exact."""
    from conftest import make_checkpoint

    from tinymoe.engine.generate import generate
    from tinymoe.speculation.oracle import record_routing

    model = load_model(make_checkpoint(tmp_path / "m"))
    prompt, n = [1, 2, 3, 4, 5], 4
    resident, forwards = record_routing(model, prompt, n)
    predictor = AlwaysWrong(forwards, model.cfg.num_experts)
    link = LinkSpec(0.001)  # ~ms per expert: far slower than a layer of this model computes
    with OffloadRuntime(
        model, "prefetch+wrong+lru", predictor=predictor, link=link, prefetch_depth=depth
    ) as rt:
        out = generate(model, prompt, n)
        decode = rt.report()["decode"]
        expert_bytes = rt.store.expert_bytes
    assert out.tokens == resident.tokens
    per_step = (model.cfg.num_layers - 1) * expert_bytes  # layers 1.. are prefetched
    if depth is None:
        assert decode["prefetch_bytes"] > decode["steps"] * per_step
    else:
        assert 0 < decode["prefetch_bytes"] <= decode["steps"] * per_step


def test_throttle_depth_counts_the_copies_one_layer_hides():
    from tinymoe.offload.scheduler import throttle_depth

    assert throttle_depth(layer_s=1e-3, copy_s=2e-3, limit=8) == 1  # copies slower than a layer
    assert throttle_depth(layer_s=1e-3, copy_s=0.3e-3, limit=8) == 4  # 3 land during the layer
    assert throttle_depth(layer_s=1e-3, copy_s=1e-9, limit=8) == 8  # a free link: every guess
    assert throttle_depth(layer_s=1e-3, copy_s=0.0, limit=8) == 8


def test_an_error_while_issuing_copies_leaves_no_slot_pinned(tmp_path):
    """A layer with a hit (pinned) whose miss cannot even be issued: the error propagates, the
    hit's pin is undone, and the missing expert is not left mapped to a slot it never reached."""
    from conftest import make_checkpoint

    from tinymoe.errors import TinyMoeError

    model = load_model(make_checkpoint(tmp_path / "m"))
    with OffloadRuntime(model, "lru", slots=4, link=LinkSpec(100.0)) as rt:
        list(rt.layers.experts(0, [0]))  # expert 0 is now held
        issue = rt.engine.copy

        def refuse(*args, **kwargs):
            raise TinyMoeError("injected: the link refused the copy")

        rt.engine.copy = refuse
        with pytest.raises(TinyMoeError, match="injected"):
            list(rt.layers.experts(0, [0, 1]))  # 0: a hit, pinned first; 1: a miss, refused
        assert rt.cache.pins == [0] * rt.num_slots
        assert rt.cache.lookup((0, 1)) is None
        rt.engine.copy = issue
        assert [e for e, _ in rt.layers.experts(0, [0, 1])] == [0, 1]  # usable again


PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]


class PooledClock(HostClock):
    """A host clock whose stamps are objects from a pool, like CudaClock's events: counts how
    many it ever made, and fails if the meter reads a stamp it has already given back."""

    def __init__(self) -> None:
        self.pool: list[list[float]] = []
        self.made = 0

    def stamp(self) -> list[float]:
        if not self.pool:
            self.made += 1
        s = self.pool.pop() if self.pool else [0.0]
        s[0] = time.perf_counter()
        return s

    def seconds(self, stamp: object) -> float:
        if isinstance(stamp, float):  # a copy's, from the simulated link's clock
            return stamp
        assert not any(s is stamp for s in self.pool), "a stamp read after it went back"
        return stamp[0]  # type: ignore[index]

    def recycle(self, stamp: object) -> None:
        self.pool.append(stamp)  # type: ignore[arg-type]


@pytest.mark.parametrize("trace", [False, True])
def test_meter_stamps_come_back_to_the_pool(tmp_path, trace):
    """The meter gives every stamp back once read: a second generation makes no new stamps (on
    CUDA, no new events), and the figures are those of a plain host clock's run."""
    model = load_model(make_checkpoint(tmp_path / "m", num_layers=3))
    with OffloadRuntime(model, "lru", slots=4, link=LinkSpec(100.0, 0.0), trace=trace) as rt:
        clock = rt.meter.clock = PooledClock()
        generate(model, PROMPT, 5, eos_ids=())
        rt.report()
        made = clock.made
        generate(model, PROMPT, 5, eos_ids=())
        report = rt.report()
    assert made > 0 and clock.made == made  # (stalls vary in number: <= a pass's worth more)
    assert len(clock.pool) == clock.made  # every stamp is back
    assert report["decode"]["steps"] == 8 and report["decode"]["compute_ms"] > 0


def test_meter_stamps_one_mark_per_layer_without_a_trace(tmp_path):
    """Without a trace a layer costs the compute side one stamp (where its experts end), plus
    two per forward pass; a trace adds the router's start and end."""
    model = load_model(make_checkpoint(tmp_path / "m", num_layers=3))
    counts = {}
    for trace in (False, True):
        with OffloadRuntime(model, "lru", slots=24, link=LinkSpec(100.0, 0.0), trace=trace) as rt:
            generate(model, PROMPT, 2, eos_ids=())  # every expert the next run uses is loaded
            clock = rt.meter.clock = PooledClock()
            rt.reset_stats()
            generate(model, PROMPT[:1], 1, eos_ids=())  # one forward pass, no copies: no stalls
            counts[trace] = clock.made
            assert rt.report()["prefill"]["misses"] == 0
    L = model.cfg.num_layers
    assert counts == {False: L + 2, True: 3 * L + 2}
