"""The scheduler: which experts to copy, into which slot, and in what order, from state alone.

Every decision here reads only state: the layer's routed ids, the prediction, the cache's
contents, pins and reservations, and the copies it has issued. It never reads a clock and never
asks whether a copy has landed, so the same run makes the same decisions on an idle machine and
on a busy one, and on the CPU and the GPU. (The meter, meter.py, measures beside it.)

How an offloaded layer l runs (`run_layer`, called with the ids its router, or a prediction,
chose; the model computes each yielded expert before asking for the next):
    1. Its prefetched experts stop being reserved: from now on they are ordinary cache entries.
    2. Every id found in a slot is a hit (pinned: held until its tokens are computed); the rest
       are misses, classified against the prediction and what was ever loaded (meter.py).
    3. The misses' copies are issued FIRST, because the link is first in, first out and a
       prefetch queued ahead of them would delay this layer; THEN the prefetch for layer
       l + lookahead (`_prefetch`: a guess never evicts a guess, never forces anything).
    4. Hits are yielded first (they compute while this layer's copies fly), then the copied
       experts in the order the link delivers them, each waiting for its own copy only
       (Transfer.compute_wait). The paper's on-demand baseline (`pipeline=False`, what its Eq. 1
       is derived for) waits for all of the layer's copies before computing any of them.
    5. Streaming: when the layer needs more experts than there are slots it may take (a long
       prompt routes to nearly all of them), each expert's slot is released as soon as its tokens
       are computed and the next miss is copied into it. Any budget >= top-k works.

Exact prefetch is throttled to `depth` copies per layer, fixed when the runtime is built
(exact_depth, throttle_depth): a real predictor is often wrong, and a wrong copy on a
first-in-first-out link delays the next layer's demand copies.

Copies in flight hold no pin: copies into a slot land in the order they were issued
(transfer.py), so whoever uses the slot waits for the newest one only (`landing[slot]`). A
prefetched expert is reserved for its target layer until that layer runs; a demand miss may take
a reserved slot, as a last resort, a prefetch never.

The CPU miss handler (`miss_handler="cpu"`): a miss is not copied; the expert is computed where
it lives, on the host, reading the host store. Its host rows are yielded FIRST, before the
device's experts: the MoE layer (moe.py) only collects them, starts its one copy of their inputs
to the host, queues the device's experts, and computes the host ones while those kernels run
(experts.py, "Host experts"). Prefetching still copies guesses; only demand copies are replaced.

Cross-token prefetch (the oracle only): the last `lookahead` layers may prefetch the next forward
pass's first layers (targets >= L); those reservations are re-keyed at the end of each pass.
"""

from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from tinymoe.offload.cache import ExpertCache, Key
from tinymoe.offload.meter import LayerStats, Meter, classify_miss
from tinymoe.offload.store import HostExpertStore
from tinymoe.offload.transfer import Transfer, TransferEngine

# An expert in no slot when its layer needs it: copied to the device (the paper; the default), or
# computed on the host (see the top), as llama.cpp's --n-cpu-moe, Fiddler and KTransformers do.
MISS_HANDLERS = ("copy", "cpu")


def throttle_depth(layer_s: float, copy_s: float, limit: int) -> int:
    """Exact prefetch's depth for a link that copies one expert in `copy_s` seconds next to
    layers that compute in `layer_s`: the copies the link finishes during one layer land before
    the next layer's demand copies need the link, plus one (at most `limit`). Computed once,
    from figures fixed for the run (a link's spec, a one-time measurement), never per step."""
    if copy_s <= 0:
        return limit
    return max(1, min(limit, 1 + int(layer_s / copy_s)))


def exact_depth(depth: int | None, speculate: bool, crosses_tokens: bool) -> int | None:
    """The scheduler's `depth` for a policy: exact prefetch is throttled to `depth` copies per
    layer; speculative mode and the oracle (a predictor that crosses tokens) use every guess they
    prefetch, so nothing is throttled (None)."""
    return depth if not speculate and not crosses_tokens else None


@dataclass
class CopyTag:
    """What a copy is for; it rides along on the Transfer (for errors and the trace)."""

    layer: int
    expert: int
    slot: int
    kind: str  # "demand" | "prefetch"

    def __str__(self) -> str:
        return f"layer {self.layer} expert {self.expert} ({self.kind} copy into slot {self.slot})"


class Prefetch(NamedTuple):
    """A guess to act on: experts of layer `target`, most confident first."""

    target: int  # a layer of this forward pass, or (crossing tokens) L + a layer of the next
    experts: list[int]


class Scheduler:
    """Decides what to copy, into which slot, and in what order, from state alone.

    Its state: `cache` (ExpertCache: slots, pins, reservations), `store` (the host copies, and
    `expert_bytes`), `engine` (the copy stream or simulated link), `meter` (counts what happens;
    `meter.layer(layer, phase)` is that layer's LayerStats, phase None: the current pass's),
    `depth` (exact prefetch's copies per guess; None: no limit), `reserved` (target layer ->
    the keys reserved for it, released when that layer runs or the pass ends), `unused_prefetch`
    (keys a prefetch copied that nobody has used yet). Keys are (layer, expert).
    """

    def __init__(
        self,
        cache: ExpertCache,
        store: HostExpertStore,
        engine: TransferEngine,
        meter: Meter,
        num_layers: int,
        *,
        pipeline: bool = True,
        depth: int | None = None,
        miss_handler: str = "copy",
    ) -> None:
        self.cache, self.store, self.engine, self.meter = cache, store, engine, meter
        self.num_layers, self.pipeline, self.depth = num_layers, pipeline, depth
        self.host_misses = miss_handler == "cpu"
        self.landing: dict[int, Transfer] = {}  # slot -> newest copy into it nobody waited for
        self.reserved: dict[int, list[Key]] = {}  # target layer -> experts prefetched for it
        self.seen: set[Key] = set()  # experts ever copied (compulsory vs capacity misses)
        self.unused_prefetch: set[Key] = set()  # prefetched, not used yet (wasted if evicted)
        # Each slot's row of cache.slots as a view made once: indexing the tensor per use costs
        # about a microsecond of host time, every expert of every layer. (Made outside inference
        # mode, as the slots are: the copy worker writes through them; see cache.py.)
        with torch.inference_mode(False):
            self.slot_views = cache.slots.unbind(0)  # S views of (3*I*D,)

    # ---- forward-pass boundaries

    def new_sequence(self) -> None:
        """A new prompt: reservations for a next pass of the old sequence are void."""
        for target in list(self.reserved):
            self._unreserve(target)

    def end_forward(self) -> None:
        """Drop reservations for layers that never ran; re-key cross-token ones (t >= L) to the
        next pass's layers (t - L)."""
        L = self.num_layers
        for target in [t for t in self.reserved if t < L]:
            self._unreserve(target)
        self.reserved = {t - L: keys for t, keys in self.reserved.items()}

    # ---- one layer

    def run_layer(
        self,
        layer: int,
        ids: list[int],
        predicted: Container[int] | None = None,
        prefetch: Prefetch | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield (expert, slot view) for each id (see the top). predicted: the experts the
        layer's prediction named (None without one), for the miss taxonomy; prefetch: the guess
        for a later layer, issued once this layer's own copies are on the link."""
        cache, meter = self.cache, self.meter
        st = meter.layer(layer)
        self._unreserve(layer)
        ready: list[tuple[int, int]] = []  # (expert, slot), pinned: hits and earlier copies
        arriving: list[tuple[int, int]] = []  # (expert, slot), pinned: this layer's copies
        todo: list[int] = []  # misses not yet given a slot
        host: list[int] = []  # misses computed on the host (miss_handler "cpu")
        current = None
        try:  # every pin below is undone in `finally`, whatever raises (or stops) the layer
            for e in ids:
                slot = cache.lookup((layer, e))
                if slot is None:
                    todo.append(e)
                    meter.miss(st, classify_miss(predicted, e, (layer, e) in self.seen))
                    continue
                cache.pin(slot)
                ready.append((e, slot))
                t = self.landing.get(slot)
                # Measurement only: whether the copy has landed changes no decision below.
                if t is not None and not t.done():
                    meter.miss(st, "late")
                else:
                    meter.hit(st)
            if self.host_misses:  # computed where they are, from the host store: no copy
                host, todo = todo, []
            self._issue_demand(layer, todo, arriving, st)
            if not todo:
                self._prefetch(prefetch)
            for e in host:  # first: the layer computes them last, on the host (see the top)
                meter.host_computed(st)
                yield e, self.store.host_weights(layer, e)
            while ready or arriving:
                if not ready and not self.pipeline:
                    for e, slot in arriving:  # the paper's on-demand: land them all first
                        self._land(layer, e, slot)
                    ready, arriving = arriving, []
                e, slot = current = ready.pop(0) if ready else arriving.pop(0)
                if slot in self.landing:  # (a hit on a slot whose copy was waited for: no call)
                    self._land(layer, e, slot)
                key = (layer, e)
                cache.touch(key)
                self.unused_prefetch.discard(key)
                yield e, self.slot_views[slot]
                # The caller has computed expert e's tokens: its slot may be reused.
                current = None
                self.engine.release(slot)
                cache.unpin(slot)
                if todo:
                    self._issue_demand(layer, todo, arriving, st)
                    if not todo:
                        self._prefetch(prefetch)
        finally:
            for e, slot in ready + arriving + ([current] if current else []):
                if cache.key_of[slot] == (layer, e):
                    cache.unpin(slot)

    def _land(self, layer: int, expert: int, slot: int) -> None:
        """Make the compute side wait for the newest copy into `slot`, if nobody has yet."""
        t = self.landing.pop(slot, None)
        if t is None:
            return
        start = self.meter.stall_start()
        try:
            t.compute_wait()
        except BaseException:
            # Never compute with what a failed copy left in the slot: forget it, then raise.
            self.cache.drop((layer, expert))
            raise
        self.meter.stall_end(layer, start, t)

    # ---- copies

    def _issue_demand(
        self, layer: int, todo: list[int], arriving: list[tuple[int, int]], st: LayerStats
    ) -> None:
        """Copy as many of this layer's missing experts as there are slots to put them in;
        moves them from todo to arriving as (expert, slot), pinned."""
        while todo:
            slot = self._insert((layer, todo[0]), evict_reserved=True)
            if slot is None:
                return  # every slot is in use by this layer: stream (see run_layer)
            e = todo.pop(0)
            self._copy(layer, e, slot, "demand", st)
            self.cache.pin(slot)
            arriving.append((e, slot))

    def _prefetch(self, prefetch: Prefetch | None) -> None:
        """Act on a guess (None: nothing to do). Every guessed expert that is in a slot, or that
        this prefetch copies into one, is reserved for `prefetch.target` and recorded in
        `reserved`. Experts not in a slot are copied, most confident first, at most `depth` of
        them (None: all), only into a slot that holds no reservation (a guess never undoes
        another); one that finds no such slot is skipped. A target >= num_layers is layer
        target - num_layers of the next forward pass, always a decode step.
        """
        if prefetch is None:
            return
        layer, phase = prefetch.target, None
        if layer >= self.num_layers:  # crossing tokens: the next pass, always a decode step
            layer, phase = layer - self.num_layers, "decode"
        st = self.meter.layer(layer, phase)
        copies = 0
        for e in prefetch.experts:
            key = (layer, e)
            slot = self.cache.lookup(key)
            if slot is None:
                if self.depth is not None and copies >= self.depth:
                    continue  # throttled: this guess stays off the link
                slot = self._insert(key, evict_reserved=False)
                if slot is None:
                    continue  # no room: skip it, never force; it will be a capacity miss
                self._copy(layer, e, slot, "prefetch", st)
                self.unused_prefetch.add(key)
                copies += 1
            self.cache.reserve(slot)
            self.reserved.setdefault(prefetch.target, []).append(key)

    def _copy(self, layer: int, expert: int, slot: int, kind: str, st: LayerStats) -> None:
        """Issue the copy of (layer, expert) into `slot` ("demand" | "prefetch"), counted in st."""
        tag = CopyTag(layer, expert, slot, kind)
        try:
            t = self.engine.copy(self.slot_views[slot], self.store.expert(layer, expert), slot, tag)
        except BaseException:
            self.cache.drop((layer, expert))  # nothing is on its way: the slot holds no expert
            raise
        self.landing[slot] = t  # replaces an older copy into this slot: that one lands first
        self.seen.add((layer, expert))
        self.meter.copied(st, t, prefetch=kind == "prefetch")

    def _insert(self, key: Key, evict_reserved: bool) -> int | None:
        """cache.insert (None: no slot may be taken), counting an evicted unused prefetch."""
        got = self.cache.insert(key, evict_reserved)
        if got is None:
            return None
        slot, evicted = got
        if evicted in self.unused_prefetch:
            self.unused_prefetch.discard(evicted)
            self.meter.wasted(evicted[0], self.store.expert_bytes)
        return slot

    def _unreserve(self, target: int) -> None:
        for key in self.reserved.pop(target, []):
            slot = self.cache.lookup(key)
            if slot is not None:
                self.cache.unreserve(slot)
