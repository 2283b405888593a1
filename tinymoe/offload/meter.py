"""Instruments: where each millisecond goes, per layer, and a trace anyone can open.

Per layer, kept separately for prefill and decode (offload.py fills them in):
    compute_s   wall time in attention + router + experts, stalls excluded
    stall_s     time the compute side sat waiting for this layer's copies
    copy_s      time the link was busy copying this layer's experts (demand and prefetch)
    bytes       bytes copied for this layer
    hits        expert uses served from a slot whose copy had already finished
    misses      every other use, by kind (the miss taxonomy, first matching rule wins):
        late          a copy of it was in flight when the layer needed it (a prefetch too late)
        mispredicted  the layer had a prediction, and the prediction did not include it
        compulsory    never loaded before: any cache misses it (first use)
        capacity      loaded before, then evicted (or its prefetch found no free slot)
    wasted prefetch bytes: prefetched experts evicted before anyone used them.

`Trace` writes Chrome trace-event JSON (open it in ui.perfetto.dev or chrome://tracing): a
"compute" track with each layer's attention, router and experts, and the stalls nested inside
the experts; and a "copy" track with every transfer on the link. Where the two tracks overlap,
copying is hidden behind compute; a stall is a copy the compute had to wait for.
"""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tinymoe.engine.timing import now

MISS_KINDS = ("compulsory", "capacity", "late", "mispredicted")


def classify_miss(in_flight: bool, predicted: set[int] | None, expert: int, seen: bool) -> str:
    """The kind of a miss (see the module docstring). predicted: None when there was no guess."""
    if in_flight:
        return "late"
    if predicted is not None and expert not in predicted:
        return "mispredicted"
    return "capacity" if seen else "compulsory"


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
    """The paper's Eq. 1 applied to an on-demand run: the best TPOT any prefetcher can reach.

    Prefetching can at most hide each layer's copy behind that layer's compute, so it saves at
    most sum over layers of min(t_copy, t_compute). `layers` is PhaseStats.summary()["layers"].
    """
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


class Trace:
    """Collects spans on two tracks and writes them as Chrome trace-event JSON."""

    TRACKS = {"compute": 1, "copy": 2}

    def __init__(self) -> None:
        self.t0 = now()
        self.events: list[dict] = []

    def span(self, track: str, name: str, start_s: float, end_s: float, **args: object) -> None:
        self.events.append(
            {
                "name": name,
                "ph": "X",  # a complete event: start and duration
                "pid": 1,
                "tid": self.TRACKS[track],
                "ts": (start_s - self.t0) * 1e6,  # microseconds, as the format wants
                "dur": max(end_s - start_s, 0.0) * 1e6,
                "args": args,
            }
        )

    def to_json(self) -> dict:
        meta = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "tinymoe"}}]
        for track, tid in self.TRACKS.items():
            meta.append(
                {"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": track}}
            )
            meta.append(
                {
                    "name": "thread_sort_index",
                    "ph": "M",
                    "pid": 1,
                    "tid": tid,
                    "args": {"sort_index": tid},
                }
            )
        events = sorted(self.events, key=lambda e: (e["tid"], e["ts"]))
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))
