"""Replay: a recorded run's routing, through the engine's own scheduler, on a virtual clock.

Nothing is computed and nothing is copied. Time is a number (`VirtualClock`) that the replay
advances by what each piece of work costs (a `Costs`: measured times from the trace, or a
roofline projection for other hardware, costs.py), and transfers are entries on a virtual
first-in-first-out link (`VirtualLink`) that land when the link model says. Everything that
decides (what to copy, into which slot, when to stall, what to evict) is the real
`offload.scheduler.Scheduler`, `offload.cache.ExpertCache` and `offload.meter.Meter`: the
replay only stands in for the model's forward pass, layer by layer:

    attention + router  -> clock += costs        (+ the predictor's guess, if the policy has one)
    run_layer(...)      -> for each expert the scheduler yields: clock += that expert's cost
                           (waiting for a copy moves the clock to the copy's end: a stall)
    norm + LM head      -> clock += costs

Approximations, stated: the trace is an exact run, so a speculative policy is replayed on the
exact run's states (a real speculative run drifts from it); a host-computed miss (miss handler
"cpu") runs beside the device's experts on a GPU (`Costs.host_parallel`), after them on a CPU.
"""

from typing import Protocol

import torch

from tinymoe.offload.cache import ExpertCache
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.meter import HostClock, Meter
from tinymoe.offload.policy import parse_policy, resolve_slots
from tinymoe.offload.scheduler import Prefetch, Scheduler
from tinymoe.offload.transfer import Transfer
from tinymoe.simulator.record import LayerRecord, RoutingTrace


class VirtualClock(HostClock):
    """Simulated seconds; the meter's clock too (its stamps are the time, ready at once)."""

    def __init__(self) -> None:
        self.now = 0.0

    def stamp(self) -> float:
        return self.now


class VirtualTransfer(Transfer):
    """A copy that exists only as its start and end on the virtual link (no bytes move)."""

    def __init__(self, tag: object, nbytes: int, start: float, end: float, clock: VirtualClock):
        self.tag, self.nbytes, self.error = tag, nbytes, None
        self.start, self.end, self.clock = start, end, clock

    def done(self) -> bool:
        return self.clock.now >= self.end

    def compute_wait(self) -> None:
        self.clock.now = max(self.clock.now, self.end)  # the stall, if the copy is not there yet

    host_wait = compute_wait

    def stamps(self) -> tuple[object, object]:
        return self.start, self.end


class VirtualLink:
    """A first-in-first-out link of the given speed on the virtual clock (as link.py's)."""

    before_copy = None

    def __init__(self, spec: LinkSpec, expert_bytes: int, clock: VirtualClock) -> None:
        self.spec, self.expert_bytes, self.clock = spec, expert_bytes, clock
        self.free_at = 0.0

    def copy(self, dst, src, slot: int, tag: object) -> Transfer:
        start = max(self.clock.now, self.free_at)
        self.free_at = start + self.spec.seconds(self.expert_bytes)
        return VirtualTransfer(tag, self.expert_bytes, start, self.free_at, self.clock)

    def release(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


class _NoStore:
    """The scheduler asks the store for a copy's source; the replay copies nothing."""

    def __init__(self, expert_bytes: int) -> None:
        self.expert_bytes = expert_bytes
        self.row = torch.zeros(1)

    def expert(self, layer: int, expert: int) -> torch.Tensor:
        return self.row  # what the scheduler yields for a host-computed miss, too


class Costs(Protocol):
    """Seconds for each piece of work of pass p, layer l (see costs.py)."""

    link: LinkSpec
    expert_bytes: int
    host_parallel: bool  # host-computed misses overlap the device's experts (a GPU) or not

    def layer_s(self, p: int, layer: int, rec: LayerRecord) -> float: ...  # attention + router
    def expert_s(self, p: int, layer: int, rec: LayerRecord) -> float: ...  # one, on the device
    def host_expert_s(self, p: int, layer: int, rec: LayerRecord) -> float: ...  # one, on host
    def guess_s(self, p: int, layer: int, rec: LayerRecord, predictor: str) -> float: ...
    def head_s(self, p: int) -> float: ...


def _distinct(rows: list[list[int]]) -> list[int]:
    return list(dict.fromkeys(e for row in rows for e in row))


def _guess(trace: RoutingTrace, p: int, layer: int, predictor: str) -> list[list[int]] | None:
    """The guess made at (pass p, layer) for layer + lookahead; the oracle's is the truth, and
    crosses into the next pass for targets past the last layer."""
    L, d = trace.model["num_layers"], trace.lookahead
    target = layer + d
    if predictor != "oracle":
        return trace.passes[p].layers[layer].guesses.get(predictor)
    if target < L:
        return trace.passes[p].layers[target].experts
    if p + 1 < len(trace.passes):
        return trace.passes[p + 1].layers[target - L].experts
    return None


def simulate(
    trace: RoutingTrace,
    policy_name: str,
    costs: Costs,
    slots: int | None = None,
    prefetch_depth: int = 1,
    miss_handler: str = "copy",
) -> dict:
    """Replay `trace` under `policy_name`; the meter's decode summary plus TPOT and slots."""
    policy = parse_policy(policy_name)
    m = trace.model
    L, d = m["num_layers"], trace.lookahead
    clock = VirtualClock()
    meter = Meter(L, clock)
    predictor = policy.predictor
    n_slots = 0
    sched = None
    if policy.offload:
        shape = _Shape(m)
        n_slots = resolve_slots(policy, shape, costs.expert_bytes, max(d, 1), slots)
        cache = ExpertCache(n_slots, 1, torch.device("cpu"), torch.float32, policy.eviction)
        exact = not policy.speculate and predictor != "oracle"
        sched = Scheduler(
            cache,
            _NoStore(costs.expert_bytes),
            VirtualLink(costs.link, costs.expert_bytes, clock),
            meter,
            L,
            pipeline=policy.pipeline,
            depth=prefetch_depth if exact else None,
            miss_handler=miss_handler,
        )
    pending: dict[int, list[list[int]]] = {}  # target layer (>= L: the next pass) -> guess
    for p, rec_pass in enumerate(trace.passes):
        decode = rec_pass.phase == "decode"
        meter.forward_start(rec_pass.phase)
        if p == 0 and sched is not None:
            sched.new_sequence()
        pending = {t - L: g for t, g in pending.items() if t >= L and predictor == "oracle"}
        for layer, rec in enumerate(rec_pass.layers):
            clock.now += costs.layer_s(p, layer, rec)
            meter.route_start(layer)
            guess_here = pending.pop(layer, None)
            rows = rec.experts
            if policy.speculate and decode and guess_here is not None and layer >= d:
                rows = guess_here  # speculating: the layer runs the guess (router skipped)
            nxt = None
            if predictor is not None:
                if predictor != "oracle":
                    clock.now += costs.guess_s(p, layer, rec, predictor)
                nxt = _guess(trace, p, layer, predictor)
                if nxt is not None:
                    pending[layer + d] = nxt
            meter.route_end(layer)
            ids = sorted(_distinct(rows))
            if sched is None:  # resident
                for _ in ids:
                    meter.hit(meter.layer(layer))
                clock.now += len(ids) * costs.expert_s(p, layer, rec)
            else:
                guessed = None if guess_here is None else set(_distinct(guess_here))
                prefetch = None if nxt is None else Prefetch(layer + d, _distinct(nxt))
                _run_experts(sched, clock, costs, p, layer, rec, ids, guessed, prefetch)
            meter.experts_end(layer, len(ids))
        clock.now += costs.head_s(p)
        meter.forward_end()
        if sched is not None:
            sched.end_forward()
    meter.fold(block=True)
    dec = meter.stats["decode"].summary()
    return {"policy": policy_name, "expert_slots": n_slots, "tpot_ms": dec["ms_per_step"], **dec}


def _run_experts(
    sched: Scheduler,
    clock: VirtualClock,
    costs: Costs,
    p: int,
    layer: int,
    rec: LayerRecord,
    ids: list[int],
    guessed: set[int] | None,
    prefetch: Prefetch | None,
) -> None:
    """Drive the scheduler through one layer: device experts in turn, host misses beside them."""
    start, host_s = clock.now, 0.0
    host_row = sched.store.row  # type: ignore[attr-defined]
    for _, w in sched.run_layer(layer, ids, guessed, prefetch):
        if w is host_row:  # a miss computed on the host (miss handler "cpu")
            host_s += costs.host_expert_s(p, layer, rec)
            if not costs.host_parallel:
                clock.now += costs.host_expert_s(p, layer, rec)
        else:
            clock.now += costs.expert_s(p, layer, rec)
    if costs.host_parallel and host_s:
        clock.now = max(clock.now, start + host_s)


class _Shape:
    """The few ModelConfig fields resolve_slots reads, from a trace's model entry."""

    def __init__(self, m: dict) -> None:
        self.top_k, self.num_layers, self.num_experts = (
            m["top_k"],
            m["num_layers"],
            m["num_experts"],
        )
