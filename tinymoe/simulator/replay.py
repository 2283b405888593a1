"""Replay: a recorded run's routing, through the engine's own runtime code, on a virtual clock.

Nothing is computed and nothing is copied. Time is a number (`VirtualClock`) that the replay
advances by what each piece of work costs (a `Costs`: measured times from the trace, or a
roofline projection for other hardware, costs.py), and transfers are entries on a virtual
first-in-first-out link (`VirtualLink`). Everything that decides is the engine's own: the
runtime's `LayerDriver` with its `PredictionHook`, `Scheduler`, `ExpertCache` and `Meter`;
`simulate` only stands in for the model's forward pass, layer by layer. docs/simulator.md
("Replaying it") states the approximations.
"""

from types import SimpleNamespace
from typing import Protocol

import torch
from torch import Tensor

from tinymoe.engine.moe import Routing
from tinymoe.offload.cache import ExpertCache
from tinymoe.offload.link import LinkSpec, fifo
from tinymoe.offload.meter import HostClock, Meter
from tinymoe.offload.policy import parse_policy, resolve_slots
from tinymoe.offload.runtime import LayerDriver
from tinymoe.offload.scheduler import Scheduler, exact_depth
from tinymoe.offload.transfer import Transfer
from tinymoe.simulator.record import LayerRecord, RoutingTrace
from tinymoe.speculation.hook import PredictionHook
from tinymoe.speculation.oracle import OraclePredictor


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
        start, self.free_at = fifo(
            self.clock.now, self.free_at, self.spec.seconds(self.expert_bytes)
        )
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

    host_weights = expert  # (the CPU miss handler's source, HostExpertStore.host_weights)


class Costs(Protocol):
    """Seconds for each piece of work of pass p, layer l (see costs.py)."""

    link: LinkSpec
    expert_bytes: int
    host_parallel: bool  # the host is another processor (a GPU's): host experts run beside

    def layer_s(self, p: int, layer: int, rec: LayerRecord) -> float: ...  # attention + router
    def expert_s(self, p: int, layer: int, rec: LayerRecord) -> float: ...  # one, on the device
    def host_expert_s(self, p: int, layer: int, rec: LayerRecord) -> float: ...  # one, on host
    def host_copies_s(  # a layer's host experts' rows: inputs to the host, outputs back
        self, p: int, layer: int, rec: LayerRecord, rows_in: int, rows_out: int
    ) -> float: ...
    def guess_s(self, p: int, layer: int, rec: LayerRecord, predictor: str) -> float: ...
    def head_s(self, p: int) -> float: ...


def _host_chain_s(
    costs: Costs, p: int, layer: int, rec: LayerRecord, rows: list[list[int]], host: list[int]
) -> float:
    """A layer's host experts as the engine runs them beside the device's (experts.py, "Host
    experts"): one copy of their inputs to the host (one token in a decode step, however many
    experts read it), the host computes them in turn, one copy of their outputs back. rows: the
    routing the layer ran (N lists of K ids)."""
    rows_out = sum(e in row for row in rows for e in host)  # (token, expert) pairs
    rows_in = 1 if len(rows) == 1 else rows_out
    copies = costs.host_copies_s(p, layer, rec, rows_in, rows_out)
    return copies + len(host) * costs.host_expert_s(p, layer, rec)


def _routing(rows: list[list[int]]) -> Routing:
    """Recorded expert ids (N lists of K) as a Routing; the replay never uses the weights."""
    ids = torch.tensor(rows)
    return Routing(ids, torch.ones(ids.shape), host_ids=rows)


class TracePredictor:
    """Replays the guesses the trace recorded for predictor `name`, and charges the clock what
    each guess cost (Costs.guess_s), as the runtime's predictor would take its time."""

    def __init__(self, trace: RoutingTrace, name: str, clock: "VirtualClock", costs: Costs):
        self.trace, self.name, self.clock, self.costs = trace, name, clock, costs
        self.lookahead, self.step = trace.lookahead, -1

    def reset(self) -> None:
        self.step = -1

    def observe(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> Routing | None:
        self.step += layer == 0
        rec = self.trace.passes[self.step].layers[layer]
        self.clock.now += self.costs.guess_s(self.step, layer, rec, self.name)
        rows = rec.guesses.get(self.name)
        return None if rows is None else _routing(rows)


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
    L, E, d = m["num_layers"], m["num_experts"], trace.lookahead
    clock = VirtualClock()
    meter = Meter(L, clock)
    predictor = None
    if policy.predictor == "oracle":  # the truth, crossing into the next pass as the real one
        truth = [[_routing(rec.experts) for rec in p.layers] for p in trace.passes]
        predictor = OraclePredictor(truth, d)
    elif policy.predictor is not None:
        predictor = TracePredictor(trace, policy.predictor, clock, costs)
    hook = PredictionHook(predictor, policy.speculate)
    n_slots, sched, store = 0, None, _NoStore(costs.expert_bytes)
    host_row = store.row  # what the scheduler yields for a miss computed on the host
    if policy.offload:
        shape = SimpleNamespace(**m)  # top_k, num_layers, num_experts: as ModelConfig names them
        n_slots = resolve_slots(policy, shape, costs.expert_bytes, max(d, 1), slots)
        cache = ExpertCache(n_slots, 1, torch.device("cpu"), torch.float32, policy.eviction)
        sched = Scheduler(
            cache,
            store,
            VirtualLink(costs.link, costs.expert_bytes, clock),
            meter,
            L,
            pipeline=policy.pipeline,
            depth=exact_depth(prefetch_depth, policy.speculate, hook.crosses_tokens),
            miss_handler=miss_handler,
        )
    driver = LayerDriver(hook, meter, sched, lambda layer: torch.zeros(E, 1))
    for p, rec_pass in enumerate(trace.passes):
        driver.forward_start(rec_pass.phase, p == 0, rec_pass.phase)
        for layer, rec in enumerate(rec_pass.layers):
            clock.now += costs.layer_s(p, layer, rec)
            u = torch.zeros(len(rec.experts), 1)  # (N, 1): the tokens, no state
            routing = driver.route(layer, u, u, lambda _, rec=rec: _routing(rec.experts))
            ids = sorted({e for row in routing.ids_on_host() for e in row})
            start, host = clock.now, []
            for e, w in driver.experts(layer, ids):
                if w is not host_row:
                    clock.now += costs.expert_s(p, layer, rec)
                elif costs.host_parallel:
                    host.append(e)  # computed beside the device's experts, below
                else:  # host and device are one processor: in turn (and nothing is copied)
                    clock.now += costs.host_expert_s(p, layer, rec)
            if host:
                chain = _host_chain_s(costs, p, layer, rec, routing.ids_on_host(), host)
                clock.now = max(clock.now, start + chain)
        clock.now += costs.head_s(p)
        driver.forward_end()
    meter.fold(block=True)
    dec = meter.stats["decode"].summary()
    return {"policy": policy_name, "expert_slots": n_slots, "tpot_ms": dec["ms_per_step"], **dec}
