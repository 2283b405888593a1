"""The simulated host-to-device link: the copy stream of a machine without a GPU.

A worker thread plays the copy stream. It really copies the bytes into the slot, and stamps each
transfer with the time a link of `gbps` bandwidth and `latency_us` per-transfer latency would
finish it, first in, first out (`fifo`); the transfer counts as landed, for everyone, only from
that moment. Because the bytes are real, a wrong slot or a missing wait shows up as wrong
numbers, not as a silently optimistic timing.

Time is what this module simulates, so it is the one place (with the meter) that reads a clock:
the worker stamps, and a waiting compute side sleeps until the stamp. Nothing that decides what
to copy reads these clocks (scheduler.py).
"""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from tinymoe.engine.timing import now
from tinymoe.errors import TinyMoeError
from tinymoe.offload.transfer import Transfer, copy_expert


@dataclass(frozen=True)
class LinkSpec:
    """A host-to-device link: bandwidth in GB/s (1e9 bytes/s) and a fixed cost per transfer."""

    gbps: float
    latency_us: float = 0.0
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.gbps > 0:
            raise TinyMoeError(f"link bandwidth (--link-gbps) must be > 0, got {self.gbps}")
        if self.latency_us < 0:
            raise TinyMoeError(
                f"link latency (--link-latency-us) must be >= 0, got {self.latency_us}"
            )

    def seconds(self, nbytes: int) -> float:
        """How long this link takes to move nbytes in one transfer."""
        return self.latency_us * 1e-6 + nbytes / (self.gbps * 1e9)


def fifo(issued_s: float, link_free_s: float, busy_s: float) -> tuple[float, float]:
    """When a copy issued at `issued_s` runs on a first-in-first-out link that finishes its
    previous copy at `link_free_s`, if it keeps the link busy `busy_s`: (start, end)."""
    start = max(issued_s, link_free_s)
    return start, start + busy_s


# Peak host-to-device bandwidth of common links, one direction. Real pinned copies reach roughly
# 80-90% of these. The 10 us per transfer is an assumption (the usual order of a
# cudaMemcpyAsync's launch and DMA setup), not a spec figure: measure yours.
PRESETS = {
    # PCI-SIG, PCI Express Base Specification 4.0: 16 GT/s per lane with 128b/130b encoding,
    # 16 lanes: 16e9 * 16 * 128/130 / 8 = 31.5 GB/s per direction.
    "pcie4-x16": LinkSpec(31.5, 10.0, "PCIe 4.0 x16"),
    # PCI Express Base Specification 5.0: 32 GT/s per lane, same encoding: 63.0 GB/s.
    "pcie5-x16": LinkSpec(63.0, 10.0, "PCIe 5.0 x16"),
    # NVIDIA Grace Hopper Superchip Architecture whitepaper (2023): NVLink-C2C, 900 GB/s in
    # total, 450 GB/s per direction between Grace's LPDDR5X and the Hopper GPU.
    "nvlink-c2c": LinkSpec(450.0, 10.0, "NVLink-C2C (GH200)"),
}
DEFAULT_LINK = "pcie4-x16"  # the simulated link when none is named


class SimulatedTransfer(Transfer):
    def __init__(self, dst: Tensor, src: Tensor, tag: object, worker: threading.Thread) -> None:
        super().__init__(dst, src, tag)
        self.worker = worker
        self.issued_s = float("nan")  # when copy() handed it over (the link's queue time)
        self.handed_over = threading.Event()  # set once copy() has returned: issued_s is final
        self.copied = threading.Event()  # set by the worker once the bytes are in place (or failed)
        self.start_s = self.end_s = float("nan")  # when the modelled link starts / finishes it

    def done(self) -> bool:
        return self.copied.is_set() and (self.error is not None or now() >= self.end_s)

    def compute_wait(self, poll_s: float = 0.05) -> None:
        # WAIT: the compute side blocks until the bytes are in the slot AND the modelled link has
        # finished. Poll, so Ctrl-C gets through and a dead worker is noticed instead of a hang.
        while not self.copied.wait(poll_s):
            if not self.worker.is_alive():
                raise TinyMoeError(f"copy of {self.tag}: the link worker has stopped")
        self.raise_if_failed()
        # The bytes may be in place early (a real memcpy beats the modelled link); the expert
        # still only counts as arrived at end_s. Sleep most of the gap and spin the last 0.2 ms,
        # because sleep() oversleeps by ~0.1 ms, which would add a fake stall to every wait.
        gap = self.end_s - now()
        if gap > 2e-4:
            time.sleep(gap - 2e-4)
        while now() < self.end_s:
            pass

    def host_wait(self) -> None:
        self.compute_wait()  # on the CPU the host *is* the compute side

    def stamps(self) -> tuple[object, object]:
        return self.start_s, self.end_s


class SimulatedLink:
    """The copy stream, played by a worker thread over a link of the given speed (see top)."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        # Test hook: called in the worker with each transfer before it is copied; raise to fail it.
        self.before_copy: Callable[[Transfer], None] | None = None
        self._jobs: queue.SimpleQueue[SimulatedTransfer | None] = queue.SimpleQueue()
        self._closed = False
        self._link_free_s = 0.0  # when the modelled link finished its last transfer
        self.worker = threading.Thread(target=self._run, name="tinymoe-link", daemon=True)
        self.worker.start()

    def copy(self, dst: Tensor, src: Tensor, slot: int, tag: object) -> Transfer:
        if self._closed:
            raise TinyMoeError(f"copy of {tag}: the transfer engine is closed")
        t = SimulatedTransfer(dst, src, tag, self.worker)
        self._jobs.put(t)  # wakes the worker: a thread switch, tens of us on a busy CPU
        # The copy counts as issued when this call returns, as a cudaMemcpyAsync is: the cost
        # of handing it over is the host's, not the link's.
        t.issued_s = now()
        t.handed_over.set()
        return t

    def release(self, slot: int) -> None:
        # Nothing to do: CPU compute runs on the calling thread, so when the runtime releases a
        # slot the read has already finished, and the worker may overwrite it at once.
        pass

    def _run(self) -> None:
        while (t := self._jobs.get()) is not None:
            try:
                if self._closed:
                    raise TinyMoeError("the transfer engine was closed before this copy ran")
                if self.before_copy is not None:
                    self.before_copy(t)
                t.handed_over.wait(1.0)  # (a bound only against a host interrupted mid-call)
                t0 = now()
                copy_expert(t.dst, t.src)  # the real bytes (quantized: read back into the slot)
                # The link takes its modelled time, or the real memcpy's if that is slower. Not
                # "until now": a worker the OS scheduled late is not a slow link (and waiters
                # still wait for `copied`, so nobody sees the bytes before they are there).
                busy = max(self.spec.seconds(t.nbytes), now() - t0)
                t.start_s, t.end_s = fifo(t.issued_s, self._link_free_s, busy)
                self._link_free_s = t.end_s
            except Exception as e:  # any failure must reach the waiter, never kill the worker
                t.error = e
            finally:
                t.copied.set()

    def close(self) -> None:
        """Stop the worker: queued copies fail with "closed" (their waiters raise), then join."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self.worker.join(timeout=10)
