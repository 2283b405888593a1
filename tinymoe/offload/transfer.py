"""The transfer engine: copies experts from the host store into device slots, beside the compute.

One interface, two back ends:

- `CudaCopyEngine` (a GPU): a dedicated copy stream next to the compute stream. Each copy is
  issued on the copy stream with `non_blocking=True` from pinned memory and followed by an
  event; the compute stream waits on that event only right before it uses the expert. Before
  overwriting a slot, the copy stream waits on the event the compute stream recorded after it
  last read that slot ("done reading"), so a slot is never overwritten under a running kernel.

- `SimulatedLink` (no GPU, or tests): a background thread plays the copy stream. It really
  copies the bytes into the slot, and stamps each transfer with the time a link of
  `gbps` bandwidth and `latency_us` per-transfer latency would finish it; the transfer counts
  as done, for everyone, only from that moment. Transfers queue first in, first out, like a
  DMA engine: transfer i starts when transfer i-1 finished (or when it was issued, if later).
  Because the bytes are real, a wrong slot or a missing wait shows up as wrong numbers, not as a
  silently optimistic timing.

A copy that fails (an exception in the worker, a CUDA error at issue) is kept on its transfer and
re-raised by `Transfer.wait()`, where the expert is about to be used; nothing ever hangs on it.
The worker is a daemon thread, stopped by `close()` (also on `with` exit and on Ctrl-C).
"""

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from tinymoe.engine.timing import now
from tinymoe.errors import TinyMoeError


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


class Transfer:
    """One expert copy. `done()` asks without blocking; `wait()` makes the compute side wait."""

    def __init__(self, dst: Tensor, src: Tensor, tag: object) -> None:
        self.dst, self.src, self.tag = dst, src, tag  # tag: what the caller wants back (opaque)
        self.nbytes = src.numel() * src.element_size()
        self.issued_s = now()
        self.error: BaseException | None = None

    def done(self) -> bool:
        raise NotImplementedError

    def wait(self) -> None:
        """Make the compute side wait for this copy; raises TinyMoeError if the copy failed."""
        raise NotImplementedError

    def sync(self) -> None:
        """Block the host until the copy has landed (bookkeeping, not the compute path)."""
        raise NotImplementedError

    def interval(self) -> tuple[float, float]:
        """(start, end) of the copy on the link, in `timing.now()` seconds; valid once done."""
        raise NotImplementedError

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise TinyMoeError(f"copy of {self.tag} failed: {self.error!r}") from self.error


class TransferEngine(Protocol):
    def copy(self, dst: Tensor, src: Tensor, slot: int, tag: object) -> Transfer:
        """Start copying src (host) into dst (the device slot `slot`); returns at once."""
        ...

    def release(self, slot: int) -> None:
        """The compute side has issued its last read of `slot` for now (see CudaCopyEngine)."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- the simulated link (CPU)


class SimulatedTransfer(Transfer):
    def __init__(self, dst: Tensor, src: Tensor, tag: object, worker: threading.Thread) -> None:
        super().__init__(dst, src, tag)
        self.worker = worker
        self.handed_over = threading.Event()  # set once copy() has returned: issued_s is final
        self.copied = threading.Event()  # set by the worker once the bytes are in place (or failed)
        self.start_s = self.end_s = float("nan")  # when the modelled link starts / finishes it

    def done(self) -> bool:
        return self.copied.is_set() and (self.error is not None or now() >= self.end_s)

    def wait(self, poll_s: float = 0.05) -> None:
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

    def sync(self) -> None:
        self.wait()  # on the CPU the host *is* the compute side

    def interval(self) -> tuple[float, float]:
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
                start = max(t.issued_s, self._link_free_s)  # first in, first out
                t0 = now()
                t.dst.copy_(t.src)  # the real bytes
                # The link takes its modelled time, or the real memcpy's if that is slower. Not
                # "until now": a worker the OS scheduled late is not a slow link (and waiters
                # still wait for `copied`, so nobody sees the bytes before they are there).
                busy = max(self.spec.seconds(t.nbytes), now() - t0)
                t.start_s, t.end_s = start, start + busy
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


# ---------------------------------------------------------------- the CUDA back end


class CudaTransfer(Transfer):
    def __init__(
        self, dst: Tensor, src: Tensor, tag: object, engine: "CudaCopyEngine", timed: bool
    ) -> None:
        super().__init__(dst, src, tag)
        self.engine, self.timed = engine, timed
        self.start_ev = torch.cuda.Event(enable_timing=True) if timed else None
        self.done_ev = torch.cuda.Event(enable_timing=timed)

    def done(self) -> bool:
        return self.error is not None or self.done_ev.query()  # a query, not a sync

    def wait(self) -> None:
        self.raise_if_failed()
        if self.timed:
            try:
                # SYNC: instrumented mode only: block the host until the copy lands, so the time
                # spent here is the measured stall. Untimed runs skip this line entirely.
                self.done_ev.synchronize()
            except RuntimeError as e:  # a CUDA error in the copy surfaces here, named
                self.error = e
                self.raise_if_failed()
        # WAIT: the compute stream waits for this copy, and only for this copy, right before the
        # expert is used. The host does not block; later kernels simply queue behind the event.
        torch.cuda.current_stream(self.dst.device).wait_event(self.done_ev)

    def sync(self) -> None:
        self.raise_if_failed()
        self.done_ev.synchronize()  # SYNC: the host must know the copy landed (see callers)

    def interval(self) -> tuple[float, float]:
        if self.start_ev is None:
            return float("nan"), float("nan")
        base = self.engine.base_ev
        t0 = self.engine.base_s
        return (
            t0 + base.elapsed_time(self.start_ev) / 1e3,
            t0 + base.elapsed_time(self.done_ev) / 1e3,
        )


class CudaCopyEngine:
    """A dedicated copy stream with one event per copy and one "done reading" event per slot."""

    def __init__(self, device: torch.device, num_slots: int, timed: bool = True) -> None:
        self.device, self.timed = device, timed
        self.stream = torch.cuda.Stream(device)
        self.read_done: list[torch.cuda.Event | None] = [None] * num_slots
        self.before_copy: Callable[[Transfer], None] | None = None  # test hook, as SimulatedLink
        # A reference point to turn event timings into host-clock times for the trace.
        self.base_ev = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)  # SYNC: once, at setup
        self.base_ev.record(torch.cuda.current_stream(device))
        self.base_ev.synchronize()  # SYNC: once, at setup
        self.base_s = now()
        self._closed = False

    def copy(self, dst: Tensor, src: Tensor, slot: int, tag: object) -> Transfer:
        if self._closed:
            raise TinyMoeError(f"copy of {tag}: the transfer engine is closed")
        t = CudaTransfer(dst, src, tag, self, self.timed)
        try:
            if self.before_copy is not None:
                self.before_copy(t)
            with torch.cuda.stream(self.stream):
                if self.read_done[slot] is not None:
                    # WAIT: the copy stream must not overwrite the slot while a kernel queued
                    # earlier on the compute stream may still be reading the expert it held.
                    self.stream.wait_event(self.read_done[slot])
                if t.start_ev is not None:
                    t.start_ev.record(self.stream)
                # Pinned source + non_blocking: the DMA engine copies while the GPU computes.
                dst.copy_(src, non_blocking=True)
                t.done_ev.record(self.stream)
        except Exception as e:  # surfaces in wait(), where the expert is used
            t.error = e
        return t

    def release(self, slot: int) -> None:
        # Recorded on the compute stream after the kernels that read the slot were queued: the
        # copy stream waits on it (above) before the slot's next copy.
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.read_done[slot] = ev

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.stream.synchronize()  # SYNC: let queued copies finish before slots are freed
