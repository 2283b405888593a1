"""The device expert cache: a fixed number of expert slots on the compute device.

The cache only decides *where* an expert goes and *which* expert leaves; the transfer engine
(transfer.py) moves the bytes and the scheduler (scheduler.py) decides *when* (a slot whose copy
is still in flight is not pinned: see there). Experts are read-only, so an evicted expert is
simply forgotten: nothing is copied back.

Finding the victim without looking at every slot. Each unpinned slot belongs to one of four
groups, by (free or held, reserved or not), and each group has a min-heap of entries:
(slot,) for a free slot (the lowest index goes first), (last_use, slot) under lru and
(uses[key], last_use, slot) under lfu for a held one, i.e. the eviction order of the class
docstring. `_victim` reads the tops of at most four heaps. Every method that changes a slot's
group or rank (touch, unpin, reserve, unreserve, insert, drop) marks the slot; the next
`_victim` pushes each marked slot's new entry once, and leaves old entries where they are: an
entry is live only while it still equals what the slot's state says now (`_place`; pinning
kills it), and a dead one is popped when it reaches the top. When the heaps hold more than
2S + 16 entries, they are rebuilt from the state (at most S entries, all live): so they never
hold more, and a rebuild, O(S), follows at least S + 16 pushes: O(1) per push.
Cost: O(log S) per operation, amortised. Heaps rather than an O(1) recency list because an
unpinned (or unreserved) slot goes back to its *old* place in the order, somewhere in the
middle, which a list cannot find without a scan.
"""

import heapq
from collections import Counter

import torch

from tinymoe.errors import TinyMoeError

Key = tuple[int, int]  # (layer, expert)
EVICTIONS = ("lru", "lfu")
# The heap groups of unpinned slots: free or held, reserved or not (the module docstring).
FREE, FREE_RESERVED, HELD, HELD_RESERVED = range(4)


class ExpertCache:
    """Expert slots on the device, and which expert (a key (layer, expert)) each one holds.

    The state, per slot s (S = num_slots) and per key:
        slots         (S, 3*I*D) tensor on the device, one packed expert per row
        key_of[s]     the key slot s holds, or None: a free slot
        slot_of[key]  the slot holding key, for the keys held now (the inverse of key_of)
        pins[s]       how many users hold slot s right now (pin/unpin count up and down; the
                      layer computing with its expert); 0 means unpinned
        reserved[s]   True while s holds a prefetched expert whose layer has not run yet
        last_use[s]   the logical clock at the slot's last use (touch) or load (insert): larger
                      is more recent (no two slots holding experts share a value)
        uses[key]     how many times key was used since the cache was made (a Counter: 0 when
                      never), including uses before it was last evicted
        eviction      "lru" or "lfu"

    Eviction (`insert` asks `_victim` for the slot to fill) picks, among the unpinned slots,
    the least recently used expert (`lru`), or the least frequently used one (`lfu`, ties
    broken by recency). LFU counts every use of an expert since the cache was created: counting
    only uses since it was loaded would make a freshly loaded expert (count 1) the first victim
    every time, whatever its history. A free slot is used before any expert is evicted. A pinned
    slot is never a victim; that is the whole safety argument for streaming and prefetching, so
    `insert` returns None rather than ever touching one. A reserved slot is a victim only for a
    demand miss (`evict_reserved=True`), and only when no unreserved slot is left: one prefetch
    never undoes another, but a layer that must compute now is never blocked by a guess.
    """

    def __init__(
        self,
        num_slots: int,
        expert_numel: int,
        device: torch.device,
        dtype: torch.dtype,
        eviction: str = "lru",
    ) -> None:
        if num_slots < 1:
            raise TinyMoeError(f"the expert cache needs at least one slot, got {num_slots}")
        if eviction not in EVICTIONS:
            raise TinyMoeError(f"eviction {eviction!r} is unknown; expected one of {EVICTIONS}")
        self.eviction = eviction
        # Ordinary tensors even when made inside torch.inference_mode(): the copy worker's thread
        # is not in inference mode, and an inference tensor may only be written inside one.
        with torch.inference_mode(False):
            self.slots = torch.empty(
                num_slots, expert_numel, device=device, dtype=dtype
            )  # (S, 3*I*D)
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.reserved = [False] * num_slots
        self.last_use = [0] * num_slots  # logical clock of the slot's last use (or load)
        self.uses: Counter[Key] = Counter()  # LFU: uses of each expert since the cache was made
        self._clock = 0
        # The victim index (the module docstring): one heap per group, and how many entries
        # the four hold, live or dead.
        self._heaps: list[list[tuple[int, ...]]] = [[], [], [], []]
        self._entries = 0
        self._dirty: set[int] = set()  # slots whose state changed since their last push
        self._rebuild()

    @property
    def num_slots(self) -> int:
        return len(self.key_of)

    def lookup(self, key: Key) -> int | None:
        """The slot holding `key`, or None. Does not count as a use (see `touch`)."""
        return self.slot_of.get(key)

    def touch(self, key: Key) -> None:
        """Record one use of `key` (it must be held): refreshes recency, counts frequency."""
        slot = self.slot_of[key]
        self._clock += 1
        self.last_use[slot] = self._clock
        self.uses[key] += 1
        self._index(slot)

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1  # its heap entry is dead now (`_place`): nothing to push

    def unpin(self, slot: int) -> None:
        if self.pins[slot] <= 0:
            raise RuntimeError(f"expert cache: slot {slot} unpinned more often than pinned")
        self.pins[slot] -= 1
        self._index(slot)

    def reserve(self, slot: int) -> None:
        self.reserved[slot] = True
        self._index(slot)

    def unreserve(self, slot: int) -> None:
        self.reserved[slot] = False
        self._index(slot)

    def insert(self, key: Key, evict_reserved: bool = True) -> tuple[int, Key | None] | None:
        """Give `key` a slot, for the copy the caller is about to issue.

        Returns (slot, evicted key or None), or None when every candidate slot is pinned (or
        reserved, unless evict_reserved): the caller must first release a slot it uses
        (streaming) or give up (a prefetch). Never evicts a pinned slot.
        """
        if key in self.slot_of:
            raise RuntimeError(f"expert cache: {key} is already held in slot {self.slot_of[key]}")
        slot = self._victim(evict_reserved)
        if slot is None:
            return None
        evicted = self.key_of[slot]
        if evicted is not None:
            del self.slot_of[evicted]
        self.reserved[slot] = False
        self.key_of[slot] = key
        self.slot_of[key] = slot
        self._clock += 1
        self.last_use[slot] = self._clock  # a fresh load is "recent", so it is not the next victim
        self._index(slot)
        return slot, evicted

    def drop(self, key: Key) -> None:
        """Forget `key` (after a failed copy: its slot holds garbage). The slot becomes free."""
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.key_of[slot] = None
            self.pins[slot], self.reserved[slot] = 0, False
            self._index(slot)

    def _victim(self, evict_reserved: bool) -> int | None:
        """The slot `insert` fills: a free slot if there is one, else the evictable slot the
        policy likes least (the class docstring's rules); None when no slot may be taken."""
        self._flush()
        # A pinned slot is in no heap; a reserved one is looked at only for a demand miss.
        free = [self._best(FREE)] + ([self._best(FREE_RESERVED)] if evict_reserved else [])
        free = [entry for entry in free if entry is not None]
        if free:
            return min(free)[-1]  # any free slot would do: the lowest index, as a scan finds
        for group in (HELD, HELD_RESERVED) if evict_reserved else (HELD,):
            entry = self._best(group)  # unreserved slots go before reserved ones
            if entry is not None:
                return entry[-1]
        return None

    # ---- the victim index (the module docstring)

    def _place(self, slot: int) -> tuple[int, tuple[int, ...]] | None:
        """(group, entry) of `slot` as its state is now; None while it is pinned (no heap)."""
        if self.pins[slot]:
            return None
        key = self.key_of[slot]
        if key is None:
            return FREE + self.reserved[slot], (slot,)
        group = HELD + self.reserved[slot]
        if self.eviction == "lru":
            return group, (self.last_use[slot], slot)
        return group, (self.uses[key], self.last_use[slot], slot)

    def _index(self, slot: int) -> None:
        """`slot`'s state changed (its old entry dies): its new entry is pushed by the next
        `_victim`. Deferred, because hits change state many times per layer (pin, touch,
        unpin, reserve) and choose no victim: a set insert each, and one push per slot later."""
        self._dirty.add(slot)

    def _flush(self) -> None:
        """Push the current entry of every slot changed since the last flush."""
        for slot in self._dirty:
            place = self._place(slot)
            if place is not None:
                heapq.heappush(self._heaps[place[0]], place[1])
                self._entries += 1
        self._dirty.clear()
        if self._entries > 2 * self.num_slots + 16:
            self._rebuild()  # back to at most S entries: S + 16 pushes paid for this one

    def _best(self, group: int) -> tuple[int, ...] | None:
        """The smallest live entry of `group`'s heap, or None; pops dead entries on the way."""
        heap = self._heaps[group]
        while heap and self._place(heap[0][-1]) != (group, heap[0]):
            heapq.heappop(heap)  # the slot was pinned, touched, refilled... since the push
            self._entries -= 1
        return heap[0] if heap else None

    def _rebuild(self) -> None:
        """The heaps from the state alone: one live entry per unpinned slot, nothing dead."""
        self._heaps = [[], [], [], []]
        self._dirty.clear()
        for slot in range(self.num_slots):
            place = self._place(slot)
            if place is not None:
                self._heaps[place[0]].append(place[1])
        for heap in self._heaps:
            heapq.heapify(heap)
        self._entries = sum(map(len, self._heaps))
