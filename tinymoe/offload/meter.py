"""The meter: where each millisecond goes, per layer, measured beside the scheduler.

The scheduler (scheduler.py) decides from state alone; the meter only watches. It counts what the
scheduler reports (hits, misses, bytes) as it happens, and it takes timestamps with a clock:

    HostClock   the host's wall clock. On the CPU compute runs on the calling thread, so "now"
                after a layer means "that layer's compute is done".
    CudaClock   CUDA events recorded on the compute stream. A host timestamp would only say when
                kernels were *queued*; an event says when the GPU reached that point. Recording
                is not a sync: the events are read back once they have completed, at the start
                of the next forward pass (after the sampled token's one sync) or at report().

Per layer, kept separately for prefill and decode:
    compute_s   time in attention + router + experts, stalls excluded
    stall_s     time the compute side sat waiting for this layer's copies
    copy_s      time the link was busy copying this layer's experts (demand and prefetch)
    bytes       bytes copied for this layer
    hits        expert uses served from a slot whose copy had already landed
    misses      every other use, by kind (the miss taxonomy, first matching rule wins):
        late          its copy was still in flight when the layer needed it (a prefetch too late)
        mispredicted  the layer had a prediction, and the prediction did not include it
        compulsory    never loaded before: any cache misses it (first use)
        capacity      loaded before, then evicted (or its prefetch found no free slot)
    wasted prefetch bytes: prefetched experts evicted before anyone used them.

A stall is the time between two compute-side stamps around the wait for a copy (on CUDA, how
long the GPU sat waiting for the copy stream). Whether a use was a hit or "late" is asked of the
copy without blocking (an event query): measurement only, no decision depends on it.

The compute side pays one stamp per layer and two per pass, stored in place; spans are worked
out, and named, only when a pass is folded (and named only for a trace). CUDA events come from
a pool: an event is recorded again once it has been read.
"""

import contextlib
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field

import torch

from tinymoe.engine.timing import now
from tinymoe.offload.trace import PerfettoTrace
from tinymoe.offload.transfer import Transfer

MISS_KINDS = ("compulsory", "capacity", "late", "mispredicted")


def classify_miss(predicted: Container[int] | None, expert: int, seen: bool) -> str:
    """The kind of a miss that found nothing in a slot (see the module docstring; "late" is
    decided where the slot is found). predicted: None when the layer had no prediction."""
    if predicted is not None and expert not in predicted:
        return "mispredicted"
    return "capacity" if seen else "compulsory"


# ---------------------------------------------------------------- clocks


class HostClock:
    """Stamps are host seconds (timing.now()), ready at once."""

    def stamp(self) -> float:
        return now()

    def ready(self, stamp: object) -> bool:
        return True

    def wait(self, stamp: object) -> None:
        pass

    def seconds(self, stamp: object) -> float:
        return stamp  # type: ignore[return-value]

    def recycle(self, stamp: object) -> None:
        pass


class CudaClock:
    """Stamps are CUDA events on the current (compute) stream; read back once completed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)  # SYNC: once, at setup: a common origin for the events
        self.base.record(torch.cuda.current_stream(device))
        self.base.synchronize()  # SYNC: once, at setup
        self.base_s = now()
        self._pool: list[torch.cuda.Event] = []  # events read back, ready to be recorded again

    def stamp(self) -> torch.cuda.Event:
        # From the pool: creating an event per stamp costs host time on every layer.
        ev = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))  # not a sync: queued with the kernels
        return ev

    def recycle(self, stamp: object) -> None:
        """A stamp that has been read goes back to the pool (it completed: free to re-record)."""
        self._pool.append(stamp)  # type: ignore[arg-type]

    def ready(self, stamp: object) -> bool:
        return stamp.query()  # type: ignore[attr-defined]

    def wait(self, stamp: object) -> None:
        stamp.synchronize()  # type: ignore[attr-defined]  # SYNC: report() only

    def seconds(self, stamp: object) -> float:
        return self.base_s + self.base.elapsed_time(stamp) / 1e3  # type: ignore[arg-type]


def clock_for(device: torch.device) -> HostClock | CudaClock:
    return CudaClock(device) if device.type == "cuda" else HostClock()


@dataclass
class LayerStats:
    compute_s: float = 0.0
    stall_s: float = 0.0
    copy_s: float = 0.0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    miss_kinds: Counter = field(default_factory=Counter)
    prefetch_bytes: int = 0  # part of `bytes` that a prefetch (not a demand miss) copied
    wasted_bytes: int = 0  # prefetched, then evicted unused
    host_computed: int = 0  # misses computed on the host (miss handler "cpu"), not copied


@dataclass
class PhaseStats:
    """Everything measured in one phase (prefill or decode), summed over its forward passes."""

    num_layers: int
    layers: list[LayerStats] = field(default_factory=list)
    steps: int = 0  # forward passes
    wall_s: float = 0.0  # time inside those forward passes

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [LayerStats() for _ in range(self.num_layers)]

    def summary(self) -> dict:
        """Times in ms per step (mean over forward passes); counts and bytes summed over steps."""
        n = max(self.steps, 1)
        ls = self.layers
        hits, misses = sum(s.hits for s in ls), sum(s.misses for s in ls)
        kinds = sum((s.miss_kinds for s in ls), Counter())
        return {
            "steps": self.steps,
            "ms_per_step": 1e3 * self.wall_s / n,
            "compute_ms": 1e3 * sum(s.compute_s for s in ls) / n,
            "stall_ms": 1e3 * sum(s.stall_s for s in ls) / n,
            "copy_ms": 1e3 * sum(s.copy_s for s in ls) / n,
            "bytes_copied": sum(s.bytes for s in ls),
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
            "miss_kinds": {k: kinds[k] for k in MISS_KINDS},
            "prefetch_bytes": sum(s.prefetch_bytes for s in ls),
            "host_computed": sum(s.host_computed for s in ls),
            "wasted_prefetch_bytes": sum(s.wasted_bytes for s in ls),
            "layers": [
                {
                    "compute_ms": 1e3 * s.compute_s / n,
                    "copy_ms": 1e3 * s.copy_s / n,
                    "stall_ms": 1e3 * s.stall_s / n,
                    "hits": s.hits,
                    "misses": s.misses,
                    "bytes": s.bytes,
                }
                for s in ls
            ],
        }


def eq1_bound_ms(tpot_ms: float, layers: list[dict]) -> float:
    """The paper's Eq. 1 applied to an on-demand run: the best TPOT (ms) any prefetcher can reach.

    tpot_ms: the on-demand run's time per output token. layers: its decode figures per layer,
    PhaseStats.summary()["layers"]: "copy_ms", how long the link spent copying the layer's
    experts, and "compute_ms", how long the layer computed (stalls excluded), per decode step.
    """
    # Prefetching can at most hide each layer's copy behind that layer's compute, so it saves
    # at most sum over layers of min(t_copy, t_compute).
    return tpot_ms - sum(min(s["copy_ms"], s["compute_ms"]) for s in layers)


# ---------------------------------------------------------------- the meter


class _Pass:
    """One forward pass's stamps, read once they are readable (CUDA: a pass later).

    marks[0] is the pass's start, marks[-1] its end (None until forward_end). Layer l's compute
    ends at marks[3l + 3]; with a trace, marks[3l + 1] and marks[3l + 2] also split it into
    attention | router | experts. A layer that did not run (an interrupted pass) has None there.
    """

    __slots__ = ("stats", "marks", "stalls", "experts")

    def __init__(self, stats: PhaseStats, start: object) -> None:
        L = stats.num_layers
        self.stats = stats
        self.marks: list[object] = [None] * (3 * L + 2)
        self.marks[0] = start
        self.stalls: list[tuple[int, object, object, object]] = []  # (layer, start, end, tag)
        self.experts = [0] * L  # experts each layer ran (the trace's span argument)


class Meter:
    """Counts and times one runtime's forward passes; `stats[phase].layers[l]` are the totals.

    The runtime calls, per forward pass: forward_start, then per layer route_start and route_end
    (only when `tracing`: they split the layer for the trace), stall_start/stall_end around each
    wait for a copy, experts_end; then forward_end. Times are worked out in `fold`.
    """

    def __init__(self, num_layers: int, clock: HostClock | CudaClock, trace: bool = False) -> None:
        self.num_layers, self.clock = num_layers, clock
        self.tracing = trace
        self.trace = PerfettoTrace() if trace else None
        self.stats: dict[str, PhaseStats] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything measured so far (passes not yet folded included)."""
        L = self.num_layers
        # "compile": a decode step that compiled the step first (generate(compile=True)), kept
        # apart as GenerationResult keeps it out of TPOT; its tokens and copies are real
        self.stats = {"prefill": PhaseStats(L), "decode": PhaseStats(L), "compile": PhaseStats(L)}
        self.phase = "prefill"
        self._pass: _Pass | None = None  # the pass being recorded
        self._passes: list[_Pass] = []  # ended (or interrupted), not folded yet
        self._stalls: list[tuple[LayerStats, object, object]] = []  # stalls outside any pass
        self._copies: list[tuple[Transfer, LayerStats]] = []  # copies whose times are unread
        if self.trace is not None:
            self.trace = PerfettoTrace()

    def layer(self, layer: int, phase: str | None = None) -> LayerStats:
        return self.stats[phase or self.phase].layers[layer]

    # ---- the compute side's marks

    def forward_start(self, phase: str) -> None:
        self._close_pass()  # a pass that never reached forward_end (it raised) is kept as is
        self.fold()  # the previous pass ended with the sampled token's sync: its stamps are ready
        self.phase = phase
        st = self.stats[phase]
        st.steps += 1
        self._pass = _Pass(st, self.clock.stamp())

    def route_start(self, layer: int) -> None:
        """(Tracing only.) Attention ends, the router starts."""
        if self._pass is not None:
            self._pass.marks[3 * layer + 1] = self.clock.stamp()

    def route_end(self, layer: int) -> None:
        """(Tracing only.) The router ends, the experts start."""
        if self._pass is not None:
            self._pass.marks[3 * layer + 2] = self.clock.stamp()

    def stall_start(self) -> object:
        return self.clock.stamp()

    def stall_end(self, layer: int, start: object, waited_for: Transfer) -> None:
        end = self.clock.stamp()
        if self._pass is not None:
            self._pass.stalls.append((layer, start, end, waited_for.tag))
        else:  # a layer driven on its own (tests, exercises): still a stall of that layer
            self._stalls.append((self.layer(layer), start, end))

    def experts_end(self, layer: int, experts: int) -> None:
        if self._pass is not None:
            self._pass.marks[3 * layer + 3] = self.clock.stamp()
            self._pass.experts[layer] = experts

    def forward_end(self) -> None:
        if self._pass is not None:
            self._pass.marks[-1] = self.clock.stamp()
            self._close_pass()  # folded at the next forward_start, or by report()

    def _close_pass(self) -> None:
        if self._pass is not None:
            self._passes.append(self._pass)
            self._pass = None

    # ---- what the scheduler reports

    def hit(self, st: LayerStats) -> None:
        st.hits += 1

    def miss(self, st: LayerStats, kind: str) -> None:
        st.misses += 1
        st.miss_kinds[kind] += 1

    def host_computed(self, st: LayerStats) -> None:
        st.host_computed += 1

    def copied(self, st: LayerStats, t: Transfer, prefetch: bool) -> None:
        st.bytes += t.nbytes
        if prefetch:
            st.prefetch_bytes += t.nbytes
        self._copies.append((t, st))

    def wasted(self, layer: int, nbytes: int) -> None:
        self.layer(layer).wasted_bytes += nbytes

    # ---- reading the stamps

    def fold(self, block: bool = False) -> None:
        """Add every pass, stall and copy whose stamps are readable to the totals (and the
        trace); block=True also closes a pass in progress and waits for all of them (SYNC on
        CUDA: report() only)."""
        clock = self.clock
        if block:
            self._close_pass()
        n = 0
        for p in self._passes:
            last = next(m for m in reversed(p.marks) if m is not None)
            if not clock.ready(last):
                if not block:
                    break  # stamps complete in order: later passes are not ready either
                clock.wait(last)
            self._fold_pass(p)
            n += 1
        del self._passes[:n]
        n = 0
        for st, start, end in self._stalls:
            if not clock.ready(end):
                if not block:
                    break
                clock.wait(end)
            a, b = clock.seconds(start), clock.seconds(end)
            st.stall_s += b - a
            st.compute_s -= b - a
            clock.recycle(start)
            clock.recycle(end)
            n += 1
        del self._stalls[:n]
        self._fold_copies(block)

    def _fold_pass(self, p: _Pass) -> None:
        """One pass's layer times: layer l computed from the previous layer's end (the pass's
        start for layer 0) to its own, stalls excluded; the head after the last layer."""
        sec, trace, marks, layers = self.clock.seconds, self.trace, p.marks, p.stats.layers
        stalls: dict[int, list[tuple[float, float, object]]] = {}
        for layer, a, b, tag in p.stalls:
            stalls.setdefault(layer, []).append((sec(a), sec(b), tag))
        t0 = prev = sec(marks[0])
        for layer, st in enumerate(layers):
            end = marks[3 * layer + 3]
            if end is None:
                continue  # the layer did not run in this pass (it was interrupted)
            t = sec(end)
            st.compute_s += t - prev
            for a, b, _ in stalls.get(layer, ()):
                st.stall_s += b - a
                st.compute_s -= b - a  # stalls sit inside the experts span: not compute
            if trace is not None:
                r0, r1 = (
                    prev if m is None else sec(m) for m in marks[3 * layer + 1 : 3 * layer + 3]
                )
                trace.span("compute", f"L{layer} attention", prev, r0)
                trace.span("compute", f"L{layer} router", r0, r1)
                for a, b, tag in stalls.get(layer, ()):
                    trace.span("compute", "stall", a, b, copy=str(tag))
                trace.span("compute", f"L{layer} experts", r1, t, experts=p.experts[layer])
            prev = t
        if marks[-1] is not None:
            end = sec(marks[-1])
            p.stats.wall_s += end - t0
            if trace is not None:
                trace.span("compute", "norm + lm_head", prev, end)
        for m in marks:
            if m is not None:
                self.clock.recycle(m)
        for _, a, b, _ in p.stalls:
            self.clock.recycle(a)
            self.clock.recycle(b)

    def _fold_copies(self, block: bool) -> None:
        clock, trace = self.clock, self.trace
        n = 0
        for t, st in self._copies:
            if t.error is None and not t.done():
                if not block:
                    break
                # A failed copy has no time on the link (whoever used it has raised already).
                with contextlib.suppress(Exception):
                    t.host_wait()
            if t.error is None:
                start, end = (clock.seconds(s) for s in t.stamps())
                st.copy_s += end - start
                if trace is not None:
                    tag = t.tag
                    trace.span("copy", f"L{tag.layer} e{tag.expert}", start, end,
                               kind=tag.kind, bytes=t.nbytes)  # fmt: skip
            n += 1
        del self._copies[:n]
