"""The offloading runtime: experts live in host memory and are copied into device slots on use.

Pieces (one file each): the host store (store.py) holds every expert; the device cache
(cache.py) holds a few of them in slots; the transfer engine (transfer.py) copies between the
two on a second stream (or a simulated link); the instruments (instruments.py) time it all.
This file decides *when* to copy, and plugs into the model without changing it:

    model.route_hook = runtime._route     routing, via a PredictionHook (predict.py)
    model.provider   = runtime            the MoE layer asks runtime.experts(layer, ids)

How an offloaded layer l runs:
    1. attention; then the route hook: the router decides (or, speculating, an earlier
       prediction does), and the predictor, if any, guesses layer l + lookahead.
    2. moe_forward reads the routed ids on the host (the layer's one sync) and calls experts().
    3. experts() sorts the ids into hits (in a slot, copy finished), late ones (copy still in
       flight) and misses; issues the misses' copies FIRST, because the link is first in, first
       out and a prefetch queued ahead of them would delay this layer; THEN issues the prefetch
       for layer l + lookahead; then yields hits, and the rest as their copies land (waiting for
       one is a stall).
       Exact mode throttles the prefetch: a real predictor is often wrong, and a wrong copy
       on the link delays layer l + 1's demand copies. So the predicted experts wait in a host
       queue (`queued`, holding no slot) and are issued only while fewer than `depth` copies
       are in flight (plus what the link finishes in one layer's compute); the queue is topped
       up at every route hook and expert release, and what is still queued when its layer runs
       is dropped (needed ones become demand misses). Speculative mode and the oracle use every
       prefetch, so they issue all at once.
    4. Streaming: when the layer needs more experts than there are free slots (a long prompt
       routes to nearly all of them), each expert's slot is released once its tokens are
       computed and the next miss is copied into it. Any budget >= top-k works for any prompt.

Slots are pinned while the layer uses them or their copy is in flight (never evicted), and a
prefetched expert is reserved for its target layer until that layer runs (other prefetches may
not take its slot; a demand miss may, as a last resort).

Cross-token prefetch (the oracle only): the oracle knows the next decode step's routing too,
so the last `lookahead` layers prefetch the next step's first layers, and layer 0 need not load
on demand. Those reservations outlive the forward pass (re-keyed to the next one's layers); the
prefetch never forces a slot, so it cannot evict what the current layer needs.

The policies (which experts to keep, who predicts, the default budget) are in policy.py.
Prefetching needs (1 + lookahead) * top-k slots; with fewer, a prefetch that finds no unpinned
slot is skipped (counted as a capacity miss later), never forced.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tinymoe.engine.model import MoETransformer, Routing
from tinymoe.engine.timing import now
from tinymoe.errors import TinyMoeError
from tinymoe.offload.cache import ExpertCache, Key
from tinymoe.offload.instruments import LayerStats, PhaseStats, Trace, classify_miss
from tinymoe.offload.policy import Policy, parse_policy, resolve_slots
from tinymoe.offload.store import HostExpertStore
from tinymoe.offload.transfer import PRESETS, CudaCopyEngine, LinkSpec, SimulatedLink, Transfer
from tinymoe.speculation.hook import PredictionHook
from tinymoe.speculation.predictors import Predictor

DEFAULT_LINK = "pcie4-x16"

# ---------------------------------------------------------------- the runtime


@dataclass
class CopyTag:
    """What a transfer is for; the runtime's bookkeeping rides along on the Transfer."""

    layer: int
    expert: int
    slot: int
    kind: str  # "demand" | "prefetch"
    stats: LayerStats  # the layer (and phase) its bytes and link time are charged to

    def __str__(self) -> str:
        return f"layer {self.layer} expert {self.expert} ({self.kind} copy into slot {self.slot})"


class OffloadRuntime:
    """Installs itself on `model` as expert provider and route hook; `close()` undoes it.

        with OffloadRuntime(model, "oracle", predictor=OraclePredictor(recording)) as rt:
            out = generate(model, ids, 32)       # unchanged: the runtime is just the provider
            print(rt.report()["decode"]["hit_rate"])

    predictor: drives prefetching (any Predictor: the oracle, or the next issue's); the policy
    must name one iff a predictor is given. speculate (from the policy): route with it instead.
    link: the simulated link's speed (CPU only); on CUDA the real copy engine is used.
    timed (CUDA): synchronize the compute stream at layer boundaries so times are honest; off,
    only counts and bytes are measured and the compute stream never blocks on the host.
    """

    def __init__(
        self,
        model: MoETransformer,
        policy: Policy | str = "on-demand",
        *,
        predictor: Predictor | None = None,
        slots: int | None = None,
        budget_gb: float | None = None,
        link: LinkSpec | None = None,
        trace: bool = False,
        timed: bool = True,
        prefetch_depth: int | None = 1,
    ) -> None:
        self.policy = parse_policy(policy) if isinstance(policy, str) else policy
        if (self.policy.predictor is None) != (predictor is None):
            raise TinyMoeError(
                f"offload policy {self.policy.name!r} "
                + ("needs a predictor" if predictor is None else "takes no predictor")
            )
        cfg = self.cfg = model.cfg
        self.model = model
        self.device = model.embed_tokens.weight.device
        if link is not None and self.device.type == "cuda":
            raise TinyMoeError(
                "--link-gbps/--link-latency-us/--link-preset simulate a link on "
                "the CPU; on CUDA the real host-to-device link is used"
            )
        self.hook = PredictionHook(predictor, self.policy.speculate)
        self.lookahead = predictor.lookahead if predictor is not None else 0
        # Throttled exact prefetch: a real predictor in exact mode is often wrong, and on a
        # first-in-first-out link a wrong prefetch delays the next layer's demand copies. So its
        # prefetches wait in `queued` and go on the link only while fewer than `depth` copies
        # are in flight. Speculative mode uses every prefetch, the oracle is never wrong:
        # both put all of theirs on the link at once (depth None).
        exact = not self.policy.speculate and not self.hook.crosses_tokens
        self.depth = prefetch_depth if exact else None
        # Running means of one layer's compute and one expert's copy, to scale the depth: the
        # runtime only gets control between layers and experts, so on a link fast next to
        # compute a depth of 1 would leave it idle through attention (see _pump).
        self._layer_s = self._copy_s = float("nan")
        self.stats = {"prefill": PhaseStats(cfg.num_layers), "decode": PhaseStats(cfg.num_layers)}
        self.phase = "prefill"
        self.trace = Trace() if trace else None
        self._sync_clock = timed and self.device.type == "cuda"
        self.link = link or PRESETS[DEFAULT_LINK]
        self.num_slots = 0
        if self.policy.offload:
            dtype = model.embed_tokens.weight.dtype
            expert_bytes = cfg.expert_numel * dtype.itemsize
            self.num_slots = resolve_slots(
                self.policy, cfg, expert_bytes, max(self.lookahead, 1), slots, budget_gb
            )
            # The slots first: if the device is out of memory, nothing has been moved yet.
            self.cache = ExpertCache(
                self.num_slots, cfg.expert_numel, self.device, dtype, self.policy.eviction
            )
            if self.device.type == "cuda":
                self.engine = CudaCopyEngine(self.device, self.num_slots, timed)
            else:
                self.engine = SimulatedLink(self.link)
            try:
                self.store = HostExpertStore.take_from(model)
            except BaseException:
                self.engine.close()
                raise
        elif slots is not None or budget_gb is not None:
            raise TinyMoeError("--expert-slots/--expert-budget-gb need an offloading policy")
        self.inflight: dict[Key, Transfer] = {}  # copies not yet seen finished (slot pinned)
        self.reserved: dict[int, list[Key]] = {}  # target layer -> experts prefetched for it
        self.seen: set[Key] = set()  # experts ever loaded (compulsory vs capacity misses)
        self.unused_prefetch: set[Key] = set()  # prefetched, not used yet (wasted if evicted)
        self.queued: list[tuple[int, Key, LayerStats]] = []  # throttled: (target, key, stats)
        # Install. The forward hooks mark where each forward pass (and the first layer) starts.
        self._saved_hook = model.route_hook
        model.provider, model.route_hook = self, self._route
        self._handles = [
            model.register_forward_pre_hook(self._forward_start, with_kwargs=True),
            model.register_forward_hook(self._forward_end),
        ]
        self._forward_t0 = self._seg_start = self._route_end = now()
        self._closed = False

    # ---- lifecycle

    def close(self) -> None:
        """Stop the copy worker, give the experts back to the model, uninstall the hooks."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self.model.provider, self.model.route_hook = None, self._saved_hook  # resident again
        if self.policy.offload:
            self.engine.close()
            self.store.give_back(self.model)
            del self.cache  # frees the slots

    def __enter__(self) -> "OffloadRuntime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset_stats(self) -> None:
        L = self.cfg.num_layers
        self.stats = {"prefill": PhaseStats(L), "decode": PhaseStats(L)}
        if self.trace is not None:
            self.trace = Trace()

    def report(self) -> dict:
        """Per-phase summaries (see instruments.PhaseStats.summary), after all copies landed."""
        if self.policy.offload:
            for key, t in list(self.inflight.items()):
                t.sync()  # SYNC: reporting only
                self._finished(key, t)
        return {
            "policy": self.policy.name,
            "expert_slots": self.num_slots,
            "link": None
            if self.device.type == "cuda" or not self.policy.offload
            else {
                "name": self.link.name,
                "gbps": self.link.gbps,
                "latency_us": self.link.latency_us,
            },
            "prefill": self.stats["prefill"].summary(),
            "decode": self.stats["decode"].summary(),
        }

    def write_trace(self, path: str | Path) -> None:
        """Write the Chrome/Perfetto trace of everything since the last reset_stats()."""
        if self.trace is None:
            raise TinyMoeError("this runtime was made with trace=False; nothing to write")
        self.report()  # let every copy land, so the copy track is complete
        self.trace.write(path)

    # ---- timing

    def _clock(self) -> float:
        if self._sync_clock:
            # SYNC: instrumented mode only, so a timestamp means "compute done", not "queued".
            # Only the compute stream: copies in flight keep running.
            torch.cuda.current_stream(self.device).synchronize()
        return now()

    def _span(self, track: str, name: str, start: float, end: float, **args: object) -> None:
        if self.trace is not None:
            self.trace.span(track, name, start, end, **args)

    def _forward_start(self, module, args, kwargs) -> None:
        start = kwargs.get("start", args[2] if len(args) > 2 else 0)
        self.phase = "prefill" if start == 0 else "decode"
        if start == 0:
            self.hook.reset()  # a new sequence: predictors forget the previous one
            if self.policy.offload:
                for target in list(self.reserved):  # cross-token prefetches nobody will use
                    self._unreserve(target)
                self.queued.clear()
        self.hook.next_forward(self.cfg.num_layers)
        self._forward_t0 = self._seg_start = self._clock()

    def _forward_end(self, module, args, output) -> None:
        t = self._clock()
        self._span("compute", "norm + lm_head", self._seg_start, t)
        st = self.stats[self.phase]
        st.steps += 1
        st.wall_s += t - self._forward_t0
        if self.policy.offload:
            L = self.cfg.num_layers
            for target in [t for t in self.reserved if t < L]:  # layers that never ran
                self._unreserve(target)
            self.queued.clear()  # (throttling never crosses tokens: all were for this pass)
            # Cross-token prefetches are for the next forward pass's layers: keep them.
            self.reserved = {t - L: keys for t, keys in self.reserved.items()}

    def _route(
        self, layer: int, resid: Tensor, u: Tensor, router: Callable[[Tensor], Routing]
    ) -> Routing:
        t0 = self._clock()
        self._span("compute", f"L{layer} attention", self._seg_start, t0)
        routing = self.hook(layer, resid, u, router)
        if self.policy.offload:
            self._pump()  # the link may have drained during attention
        self._route_end = self._clock()
        self._span("compute", f"L{layer} router", t0, self._route_end)
        return routing

    # ---- the provider

    def experts(self, layer: int, ids: list[int]) -> Iterator[tuple[int, Tensor]]:
        """The ExpertProvider method moe_forward calls: (expert, packed weights) for each id.

        Also closes the layer's time segment: compute = everything since the previous layer's
        experts finished (attention, router, experts), minus the time stalled on copies."""
        st = self.stats[self.phase].layers[layer]
        stall = 0.0
        if self.policy.offload:
            stall = yield from self._offloaded_experts(layer, ids, st)
        else:
            weights = self.model.experts.weights[layer]  # (E, 3*I*D), resident
            st.hits += len(ids)
            for e in ids:
                yield e, weights[e]
        t = self._clock()
        st.compute_s += t - self._seg_start - stall
        self._layer_s = _mean(self._layer_s, t - self._seg_start - stall)
        self._span("compute", f"L{layer} experts", self._route_end, t, experts=len(ids))
        self._seg_start = t

    def _offloaded_experts(
        self, layer: int, ids: list[int], st: LayerStats
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield (expert, slot view) for each id; returns the time stalled waiting for copies."""
        cache = self.cache
        self._reap()
        self._unreserve(layer)  # its prefetches arrived (or not): from now on, ordinary entries
        # Its prefetches never issued are dropped: the needed ones become ordinary demand misses
        # (copied first, below), the mispredicted ones are never copied at all.
        self.queued = [q for q in self.queued if q[0] > layer]
        ready, arriving, todo = self._sort(layer, ids, st)
        # This layer's misses go on the link first, then the prefetch for a later layer.
        self._issue_demand(layer, todo, arriving, st)
        if not todo:
            self._prefetch(layer + self.lookahead)
        stall = 0.0
        current = None
        try:
            while ready or arriving or todo:
                if not ready and not arriving:  # streaming, every slot busy with other copies
                    stall += self._wait_for_a_slot()
                    self._issue_demand(layer, todo, arriving, st)
                    if not todo:
                        self._prefetch(layer + self.lookahead)
                    continue
                if not ready and not self.policy.pipeline:
                    # The paper's on-demand: every copy issued for this layer lands before any
                    # expert computes, so the whole wait is one stall (bookkeeping between the
                    # copies hides behind them). Hits, if any, were computed while they copied.
                    t0 = self._clock()
                    while arriving:
                        # Left in `arriving` while waiting: if the wait raises, `finally` unpins.
                        self._land(arriving[0][2])
                        e, slot, _ = arriving.pop(0)
                        ready.append((e, slot))
                    stall += self._stalled(t0, f"all copies of layer {layer}")
                if ready:
                    (e, slot), t = ready.pop(), None
                else:
                    e, slot, t = arriving.pop(0)
                current = (e, slot)
                if t is not None:
                    stall += self._wait(t)
                cache.touch((layer, e))
                self.unused_prefetch.discard((layer, e))
                yield e, cache.slots[slot]
                # The caller has computed expert e's tokens: its slot may be reused.
                current = None
                self.engine.release(slot)
                cache.unpin(slot)
                if todo:
                    self._issue_demand(layer, todo, arriving, st)
                    if not todo:
                        self._prefetch(layer + self.lookahead)
                else:
                    self._pump()  # a copy may have landed while expert e computed
        finally:  # an error (or the caller stopping early) must not leave slots pinned
            if current is not None:
                self.engine.release(current[1])  # kernels reading it may still be queued
            held = ready + [(e, s) for e, s, _ in arriving] + ([current] if current else [])
            for e, slot in held:
                if cache.key_of[slot] == (layer, e):
                    cache.unpin(slot)
        st.stall_s += stall
        return stall

    def _sort(
        self, layer: int, ids: list[int], st: LayerStats
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int, Transfer]], list[int]]:
        """Split ids into ready (expert, slot), arriving (expert, slot, copy) and todo; count
        hits and misses. Ready and arriving slots are pinned: held until their tokens ran."""
        prediction = self.hook.last_prediction.get(layer)
        predicted = None
        if prediction is not None:
            predicted = {e for row in prediction.ids_on_host() for e in row}  # read at prefetch
        ready, arriving, todo = [], [], []
        for e in ids:
            slot = self.cache.lookup((layer, e))
            if slot is None:
                todo.append(e)
                self._count_miss(st, classify_miss(False, predicted, e, (layer, e) in self.seen))
                continue
            self.cache.pin(slot)
            t = self.inflight.get((layer, e))
            if t is None:
                st.hits += 1
                ready.append((e, slot))
            else:
                self._count_miss(st, "late")
                arriving.append((e, slot, t))
        arriving.sort(key=lambda a: a[2].issued_s)  # the order the link will deliver them
        return ready, arriving, todo

    # ---- copies

    def _copy(self, layer: int, expert: int, slot: int, kind: str, st: LayerStats) -> Transfer:
        key = (layer, expert)
        tag = CopyTag(layer, expert, slot, kind, st)
        t = self.engine.copy(self.cache.slots[slot], self.store.expert(layer, expert), slot, tag)
        self.inflight[key] = t  # the slot stays pinned (insert pinned it) until it lands
        self.seen.add(key)
        st.bytes += t.nbytes
        if kind == "prefetch":
            st.prefetch_bytes += t.nbytes
        return t

    def _insert(self, key: Key, evict_reserved: bool) -> int | None:
        got = self.cache.insert(key, evict_reserved)
        if got is None:
            return None
        slot, evicted = got
        if evicted in self.unused_prefetch:
            self.unused_prefetch.discard(evicted)
            self.stats[self.phase].layers[evicted[0]].wasted_bytes += self.store.expert_bytes
        return slot

    def _issue_demand(
        self,
        layer: int,
        todo: list[int],
        arriving: list[tuple[int, int, Transfer]],
        st: LayerStats,
    ) -> None:
        """Copy as many of this layer's missing experts as there are slots to put them in."""
        while todo:
            slot = self._insert((layer, todo[0]), evict_reserved=True)
            if slot is None:
                self._reap()  # a copy that landed since frees its slot
                slot = self._insert((layer, todo[0]), evict_reserved=True)
            if slot is None:
                return
            e = todo.pop(0)
            t = self._copy(layer, e, slot, "demand", st)
            self.cache.pin(slot)  # and held by this layer until its tokens are computed
            arriving.append((e, slot, t))

    def _prefetch(self, target: int) -> None:
        """Copy the experts predicted for layer `target`, into free or evictable slots only.

        A target >= L (only a predictor that crosses tokens makes one) is layer target - L of
        the next forward pass, always a decode step: its bytes are charged there."""
        prediction = self.hook.pending.get(target)
        wraps = target >= self.cfg.num_layers
        if prediction is None or (wraps and not self.hook.crosses_tokens):
            return
        layer, phase = target, self.phase
        if wraps:
            layer, phase = target - self.cfg.num_layers, "decode"
        st = self.stats[phase].layers[layer]
        # SYNC (in ids_on_host): the host needs the predicted ids to issue copies. They were
        # computed before this layer's own ids were read, so this waits for nothing; the read is
        # kept on the Routing, so running or scoring the prediction later costs no second sync.
        for e in sorted({e for row in prediction.ids_on_host() for e in row}):
            if self.depth is None or self.cache.lookup((layer, e)) is not None:
                self._prefetch_one(target, (layer, e), st)
            else:
                self.queued.append((target, (layer, e), st))  # throttled: _pump issues it
        self._pump()

    def _prefetch_one(self, target: int, key: Key, st: LayerStats) -> None:
        """Reserve `key` for layer `target`, copying it first if it is not in a slot."""
        slot = self.cache.lookup(key)
        if slot is None:
            slot = self._insert(key, evict_reserved=False)
            if slot is None:
                return  # no room: skip it, never force; it will be a capacity miss
            self._copy(key[0], key[1], slot, "prefetch", st)
            self.unused_prefetch.add(key)
        self.cache.reserve(slot)
        self.reserved.setdefault(target, []).append(key)

    def _pump(self) -> None:
        """Throttled prefetch: issue queued prefetches while fewer than `depth` copies are in
        flight. done() asks without blocking (an event query on CUDA), so this never syncs."""
        while self.queued:
            if sum(not t.done() for t in self.inflight.values()) >= self._depth_now():
                return
            target, key, st = self.queued.pop(0)
            self._prefetch_one(target, key, st)

    def _unreserve(self, target: int) -> None:
        for key in self.reserved.pop(target, []):
            slot = self.cache.lookup(key)
            if slot is not None:
                self.cache.unreserve(slot)

    def _depth_now(self) -> int:
        """`depth`, plus as many copies as the link finishes in one layer's compute: those
        would land before the next layer needs the link anyway, so they cannot delay it."""
        if not (self._copy_s > 0 and self._layer_s >= 0):  # NaN: not measured yet, or untimed
            return self.depth
        return self.depth + int(min(self._layer_s / self._copy_s, 64.0))

    def _wait(self, t: Transfer, host: bool = False) -> float:
        """Make the compute side wait for t (host too, if `host`); returns the time stalled."""
        t0 = self._clock()
        self._land(t, host)
        return self._stalled(t0, str(t.tag))

    def _stalled(self, t0: float, waited_for: str) -> float:
        t1 = now()
        self._span("compute", "stall", t0, t1, copy=waited_for)
        return t1 - t0

    def _land(self, t: Transfer, host: bool = False) -> None:
        key = (t.tag.layer, t.tag.expert)
        try:
            t.sync() if host else t.wait()
        except TinyMoeError:
            # Never compute with what a failed copy left in the slot: forget it, then raise.
            self.inflight.pop(key, None)
            self.cache.drop(key)
            raise
        if t.done():
            self._finished(key, t)

    def _wait_for_a_slot(self) -> float:
        """Streaming with every slot pinned by copies in flight: wait for the oldest to land.

        The host must see it land before it may reuse the slot, hence a host wait on CUDA too.
        """
        if not self.inflight:
            raise RuntimeError("expert cache: all slots pinned and no copy in flight to wait for")
        return self._wait(min(self.inflight.values(), key=lambda t: t.issued_s), host=True)

    def _reap(self) -> None:
        """Finish the bookkeeping of copies that have landed: their slots become evictable."""
        for key, t in list(self.inflight.items()):
            if t.done():
                self._finished(key, t)

    def _finished(self, key: Key, t: Transfer) -> None:
        if self.inflight.pop(key, None) is None:
            return
        if t.error is not None:
            self.cache.drop(key)  # as in _wait: forget the slot's contents, then raise
            t.raise_if_failed()
        self.cache.unpin(t.tag.slot)
        start, end = t.interval()
        if end >= start:  # False for NaN: untimed CUDA runs do not time their copies
            t.tag.stats.copy_s += end - start
            self._copy_s = _mean(self._copy_s, end - start)
            self._span("copy", f"L{key[0]} e{key[1]}", start, end, kind=t.tag.kind, bytes=t.nbytes)

    def _count_miss(self, st: LayerStats, kind: str) -> None:
        st.misses += 1
        st.miss_kinds[kind] += 1


def _mean(old: float, new: float, weight: float = 0.1) -> float:
    """An exponential running mean; NaN (no value yet) takes the first value as is."""
    return new if old != old else (1 - weight) * old + weight * new
