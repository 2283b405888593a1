"""A tiny progress bar for long loops (training, evaluation): count, rate, ETA, on stderr.

On a terminal it redraws one line with `\\r`; when stderr is a file (a `nohup` log) it writes a
full line at most every LOG_EVERY_S seconds instead, so the log stays readable.
"""

import sys
import time

LOG_EVERY_S = 30.0  # seconds between lines when stderr is not a terminal


class Progress:
    def __init__(self, total: int, desc: str = "", start: int = 0, unit: str = "it") -> None:
        self.total, self.desc, self.n, self.unit = total, desc, start, unit
        self.t0, self.n0 = time.perf_counter(), start  # rate counts only this session's work
        self.tty = sys.stderr.isatty()
        self.last_log = 0.0

    def update(self, n: int = 1, info: str = "") -> None:
        """Advance by n and redraw; `info` is extra text such as "loss 3.21 | 2100 tok/s"."""
        self.n += n
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self.n0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        line = (
            f"{self.desc} {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%) "
            f"| {rate:.2f} {self.unit}/s | elapsed {_hms(elapsed)} | ETA {_hms(eta)}"
            + (f" | {info}" if info else "")
        )
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif elapsed - self.last_log >= LOG_EVERY_S or self.n >= self.total:
            self.last_log = elapsed
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
