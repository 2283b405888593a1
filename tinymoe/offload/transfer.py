"""Transfers: one expert copy from the host store into a device slot, beside the compute.

The scheduler (scheduler.py) issues copies through a transfer engine and gets a `Transfer` back
at once. Two engines share that interface:

- `CudaCopyEngine` (here, a GPU): a dedicated copy stream next to the compute stream. The two
  streams wait for each other twice, never the host: the compute stream for a copy, right before
  it uses the expert (`compute_wait`), and the copy stream, before overwriting a slot, for the
  compute stream's last read of it (`release`).
- `SimulatedLink` (link.py, no GPU): a worker thread plays the copy stream over a link of given
  bandwidth and latency.

Both engines run copies first in, first out, on one queue. The scheduler relies on that: a slot
may be given a new copy while an earlier copy into it is still queued, because the earlier one is
certain to land first, and the compute side only ever waits for the newest copy into a slot.

Failures. A copy that fails where the host sees it (an exception when it is issued, or in the
simulated link's worker) is kept on its transfer and raised by `compute_wait()`, where the
expert is about to be used, naming layer, expert and slot; nothing hangs on it. On CUDA a copy
can also fail after it was issued, while it runs on the copy stream (a fault): compute_wait only
queues a wait, so it cannot see that. CUDA reports such an error to the first CUDA call that
checks after it happened, and at the latest at the next host sync after the compute stream's
wait for the copy: the next layer's ids read or the step's token read, which generate() turns
into a TinyMoeError naming the step and the call (engine/generate.py, _name_cuda_error). A
copy nobody waited for (a wrong guess) reports at the next sync of any kind, at the latest at
`host_wait` (report, trace) or `close`. The CUDA context is lost after such an error.
"""

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from tinymoe.errors import TinyMoeError
from tinymoe.offload.quant import QuantizedExpert


def copy_expert(dst: Tensor, src: "Tensor | QuantizedExpert", non_blocking: bool = False) -> None:
    """What one expert copy does, on either engine: a host row copied into the slot `dst`; or a
    quantized expert's codes and scales copied, then dequantized into `dst` on its device
    (quant.py). Either way `src.nbytes` is what crossed the link."""
    if isinstance(src, Tensor):
        dst.copy_(src, non_blocking=non_blocking)
    else:
        src.copy_into(dst, non_blocking=non_blocking)


class Transfer:
    """One expert copy. `tag` is whatever the caller wants back (the scheduler's CopyTag)."""

    def __init__(self, dst: Tensor, src: "Tensor | QuantizedExpert", tag: object) -> None:
        self.dst, self.src, self.tag = dst, src, tag
        self.nbytes = src.nbytes  # the bytes on the link: quantized ones when quantized
        self.error: BaseException | None = None

    def done(self) -> bool:
        """Has the copy landed (or failed)? Asks without blocking: measurement only, never a
        scheduling decision (the scheduler's choices must not depend on timing)."""
        raise NotImplementedError

    def compute_wait(self) -> None:
        """Make the compute side wait for this copy; raise TinyMoeError if the copy failed (on
        CUDA: failed when issued; a fault while it runs surfaces later, see the top)."""
        raise NotImplementedError

    def host_wait(self) -> None:
        """Block the host until the copy has landed (reporting and shutdown, never per token)."""
        raise NotImplementedError

    def stamps(self) -> tuple[object, object]:
        """(start, end) of the copy on the link, as stamps of the engine's clock (meter.py)."""
        raise NotImplementedError

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise TinyMoeError(f"copy of {self.tag} failed: {self.error!r}") from self.error


class TransferEngine(Protocol):
    # Test hook: called with each transfer before its copy (CUDA: with the copy stream current,
    # so `torch.cuda._sleep` delays the copy on its stream); raise to make that copy fail.
    before_copy: Callable[[Transfer], None] | None

    def copy(self, dst: Tensor, src: Tensor, slot: int, tag: object) -> Transfer:
        """Queue a copy of src (host; a Tensor or a QuantizedExpert) into dst (device slot
        `slot`), as copy_expert does it; returns at once."""
        ...

    def release(self, slot: int) -> None:
        """The compute side has queued its last read of `slot` for now."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- the CUDA back end


class CudaTransfer(Transfer):
    def __init__(self, dst: Tensor, src: Tensor, tag: object, start: torch.cuda.Event) -> None:
        super().__init__(dst, src, tag)
        self.start_ev = start
        self.end_ev = torch.cuda.Event(enable_timing=True)

    def done(self) -> bool:
        return self.error is not None or self.end_ev.query()  # a query, not a sync

    def compute_wait(self) -> None:
        self.raise_if_failed()  # failed when issued
        # WAIT: the compute stream waits for this copy, and only this copy, right before the
        # expert is used. The host does not block; later kernels queue behind the event. (A
        # fault during the copy cannot be seen here: it surfaces at the host's next sync.)
        torch.cuda.current_stream(self.dst.device).wait_event(self.end_ev)

    def host_wait(self) -> None:
        self.raise_if_failed()
        try:
            self.end_ev.synchronize()  # SYNC: reporting or shutdown only
        except RuntimeError as e:  # a CUDA error: this copy's, or queued work's before it
            self.error = e  # (done() is True from now on; the meter leaves its times unread)
            raise TinyMoeError(
                f"CUDA reported an error waiting for the copy of {self.tag} (it, or work queued "
                f"before it, failed; rerun with CUDA_LAUNCH_BLOCKING=1 to see which): {_first(e)}"
            ) from e

    def stamps(self) -> tuple[object, object]:
        return self.start_ev, self.end_ev


class CudaCopyEngine:
    """A dedicated copy stream with start/end events per copy and a "done reading" per slot."""

    def __init__(self, device: torch.device, num_slots: int) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # One "done reading" event per slot, recorded again at each release: a stream's wait
        # takes the event as it is when the wait is queued, so re-recording it later is safe,
        # and no event is created per expert use. (Waiting on one never recorded is a no-op.)
        self.read_done = [torch.cuda.Event() for _ in range(num_slots)]
        self.before_copy: Callable[[Transfer], None] | None = None
        self._closed = False

    def copy(self, dst: Tensor, src: Tensor, slot: int, tag: object) -> Transfer:
        if self._closed:
            raise TinyMoeError(f"copy of {tag}: the transfer engine is closed")
        t = CudaTransfer(dst, src, tag, torch.cuda.Event(enable_timing=True))
        try:
            with torch.cuda.stream(self.stream):
                # WAIT: the copy stream must not overwrite the slot while a kernel queued
                # earlier on the compute stream may still be reading the expert it held.
                self.stream.wait_event(self.read_done[slot])
                if self.before_copy is not None:  # (on the copy stream: tests delay it here)
                    self.before_copy(t)
                t.start_ev.record(self.stream)
                # Pinned source + non_blocking: the DMA engine copies while the GPU computes.
                # (Quantized: the codes' copy, then the dequantizing, both on this stream.)
                copy_expert(dst, src, non_blocking=True)
                t.end_ev.record(self.stream)
        except Exception as e:  # surfaces in compute_wait(), where the expert is used
            t.error = e
        return t

    def release(self, slot: int) -> None:
        # Recorded on the compute stream after the kernels that read the slot were queued: the
        # copy stream waits on it (above) before the slot's next copy.
        self.read_done[slot].record(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.stream.synchronize()  # SYNC: let queued copies finish before slots are freed
            except RuntimeError as e:  # a fault in a copy nobody waited for surfaces here at last
                raise TinyMoeError(
                    f"CUDA reported an error finishing the queued expert copies: {_first(e)}"
                ) from e


def _first(e: BaseException) -> str:
    """The first line of an error's message (CUDA's run on with hints)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _timed_copy_s(dst: Tensor, src: Tensor) -> float:
    """Seconds one non-blocking copy src -> dst takes on the GPU (events around it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()  # SYNC: measurement
    return start.elapsed_time(end) / 1e3


def measure_h2d_peak_gbps(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """The pinned host-to-device bandwidth this machine reaches: one big copy, best of three."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return max(nbytes / _timed_copy_s(dst, src) / 1e9 for _ in range(3))


def measure_h2d_link(device: torch.device, expert_bytes: int) -> tuple[float, float]:
    """The real link as (GB/s, latency in us): the pinned peak (measure_h2d_peak_gbps), and as
    the latency what one expert-sized pinned copy takes beyond bytes / peak (median of 9)."""
    gbps = measure_h2d_peak_gbps(device)
    src = torch.empty(expert_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(expert_bytes, dtype=torch.uint8, device=device)
    times = sorted(_timed_copy_s(dst, src) for _ in range(9))
    beyond_s = times[len(times) // 2] - expert_bytes / (gbps * 1e9)
    return gbps, max(beyond_s * 1e6, 0.0)
