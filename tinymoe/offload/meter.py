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
"""

import contextlib
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass, field
from typing import NamedTuple

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


class CudaClock:
    """Stamps are CUDA events on the current (compute) stream; read back once completed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)  # SYNC: once, at setup: a common origin for the events
        self.base.record(torch.cuda.current_stream(device))
        self.base.synchronize()  # SYNC: once, at setup
        self.base_s = now()

    def stamp(self) -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))  # not a sync: queued with the kernels
        return ev

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


def format_layers(summary: dict) -> str:
    """A per-layer table of a PhaseStats.summary(), for people."""
    lines = [
        f"{'layer':>5} {'compute ms':>10} {'copy ms':>8} {'stall ms':>8} {'hits':>6} {'misses':>6}"
    ]
    for i, s in enumerate(summary["layers"]):
        lines.append(
            f"{i:>5} {s['compute_ms']:>10.3f} {s['copy_ms']:>8.3f} {s['stall_ms']:>8.3f} "
            f"{s['hits']:>6} {s['misses']:>6}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- the meter


class _Span(NamedTuple):
    """A compute-track span as raw stamps; folded into `stats.field` once `end` is readable."""

    stats: LayerStats | PhaseStats
    field: str  # compute_s | stall_s | wall_s (PhaseStats: the pass from `since` to `end`)
    name: str
    start: object
    end: object
    args: dict
    since: object = None


class Meter:
    """Counts and times one runtime's forward passes; `stats[phase].layers[l]` are the totals.

    The runtime calls, per forward pass: forward_start, then per layer route_start, route_end,
    (stall_start, stall_end around each wait for a copy), experts_end; then forward_end. Spans
    are kept as raw stamps and folded into the totals once their stamps can be read.
    """

    def __init__(self, num_layers: int, clock: HostClock | CudaClock, trace: bool = False) -> None:
        self.num_layers, self.clock = num_layers, clock
        self.trace = PerfettoTrace() if trace else None
        self.stats: dict[str, PhaseStats] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything measured so far (spans not yet folded included)."""
        L = self.num_layers
        # "compile": a decode step that compiled the step first (generate(compile=True)), kept
        # apart as GenerationResult keeps it out of TPOT; its tokens and copies are real
        self.stats = {"prefill": PhaseStats(L), "decode": PhaseStats(L), "compile": PhaseStats(L)}
        self.phase = "prefill"
        self._spans: list[_Span] = []  # recorded, not yet folded
        self._copies: list[tuple[Transfer, LayerStats]] = []  # copies whose times are unread
        # The latest marks (set here too, so a layer driven without a forward pass has them).
        self._t_forward = self._t_segment = self._t_route = self._t_experts = self.clock.stamp()
        if self.trace is not None:
            self.trace = PerfettoTrace()

    def layer(self, layer: int, phase: str | None = None) -> LayerStats:
        return self.stats[phase or self.phase].layers[layer]

    # ---- the compute side's marks

    def forward_start(self, phase: str) -> None:
        self.fold()  # the previous pass ended with the sampled token's sync: its stamps are ready
        self.phase = phase
        self._t_forward = self._t_segment = self.clock.stamp()
        self.stats[phase].steps += 1

    def route_start(self, layer: int) -> None:
        self._t_route = self.clock.stamp()
        self._span(f"L{layer} attention", self._t_segment, self._t_route, layer)

    def route_end(self, layer: int) -> None:
        self._t_experts = self.clock.stamp()
        self._span(f"L{layer} router", self._t_route, self._t_experts, layer)

    def stall_start(self) -> object:
        return self.clock.stamp()

    def stall_end(self, layer: int, start: object, waited_for: Transfer) -> None:
        end = self.clock.stamp()
        self._span("stall", start, end, layer, "stall_s", copy=str(waited_for.tag))

    def experts_end(self, layer: int, experts: int) -> None:
        t = self.clock.stamp()
        self._span(f"L{layer} experts", self._t_experts, t, layer, experts=experts)
        self._t_segment = t

    def forward_end(self) -> None:
        t = self.clock.stamp()
        self._spans.append(
            _Span(self.stats[self.phase], "wall_s", "norm + lm_head", self._t_segment, t, {},
                  since=self._t_forward)
        )  # fmt: skip

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

    def _span(
        self, name: str, start: object, end: object, layer: int,
        field: str = "compute_s", **args: object,
    ) -> None:  # fmt: skip
        self._spans.append(_Span(self.layer(layer), field, name, start, end, args))

    def fold(self, block: bool = False) -> None:
        """Add every span and copy whose stamps are readable to the totals (and the trace).
        block=True waits for all of them (SYNC on CUDA: report() only)."""
        clock, trace = self.clock, self.trace
        n = 0
        for sp in self._spans:
            if not clock.ready(sp.end):
                if not block:
                    break  # stamps complete in order: the rest are not ready either
                clock.wait(sp.end)
            a, b = clock.seconds(sp.start), clock.seconds(sp.end)
            st = sp.stats
            if sp.field == "wall_s":  # the pass's last span closes the whole pass
                st.wall_s += b - clock.seconds(sp.since)
            else:
                setattr(st, sp.field, getattr(st, sp.field) + (b - a))
                if sp.field == "stall_s":  # stalls sit inside the experts span: not compute
                    st.compute_s -= b - a
            if trace is not None:
                trace.span("compute", sp.name, a, b, **sp.args)
            n += 1
        del self._spans[:n]
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
