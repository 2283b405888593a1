"""The Perfetto trace: every layer's compute and every copy on a timeline anyone can open.

Chrome trace-event JSON (open it in ui.perfetto.dev or chrome://tracing): a "compute" track with
each layer's attention, router and experts, and the stalls nested inside the experts; and a
"copy" track with every transfer on the link. Where the two tracks overlap, copying is hidden
behind compute; a stall is a copy the compute had to wait for. The meter (meter.py) fills it.
"""

import json
from pathlib import Path

from tinymoe.engine.timing import now


class PerfettoTrace:
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
            for name, args in (
                ("thread_name", {"name": track}),
                ("thread_sort_index", {"sort_index": tid}),
            ):
                meta.append({"name": name, "ph": "M", "pid": 1, "tid": tid, "args": args})
        events = sorted(self.events, key=lambda e: (e["tid"], e["ts"]))
        return {"traceEvents": meta + events, "displayTimeUnit": "ms"}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))
