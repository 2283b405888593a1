"""The device expert cache: a fixed number of expert slots on the compute device.

The cache only decides *where* an expert goes and *which* expert leaves; the transfer engine
(transfer.py) moves the bytes and the scheduler (scheduler.py) decides *when* (a slot whose copy
is still in flight is not pinned: see there). Experts are read-only, so an evicted expert is
simply forgotten: nothing is copied back.
"""

from collections import Counter

import torch

from tinymoe.errors import TinyMoeError

Key = tuple[int, int]  # (layer, expert)
EVICTIONS = ("lru", "lfu")


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

    @property
    def num_slots(self) -> int:
        return len(self.key_of)

    def lookup(self, key: Key) -> int | None:
        """The slot holding `key`, or None. Does not count as a use (see `touch`)."""
        return self.slot_of.get(key)

    def touch(self, key: Key) -> None:
        """Record one use of `key` (it must be held): refreshes recency, counts frequency."""
        self._clock += 1
        self.last_use[self.slot_of[key]] = self._clock
        self.uses[key] += 1

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1

    def unpin(self, slot: int) -> None:
        if self.pins[slot] <= 0:
            raise RuntimeError(f"expert cache: slot {slot} unpinned more often than pinned")
        self.pins[slot] -= 1

    def reserve(self, slot: int) -> None:
        self.reserved[slot] = True

    def unreserve(self, slot: int) -> None:
        self.reserved[slot] = False

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
        return slot, evicted

    def drop(self, key: Key) -> None:
        """Forget `key` (after a failed copy: its slot holds garbage). The slot becomes free."""
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.key_of[slot] = None
            self.pins[slot], self.reserved[slot] = 0, False

    def _victim(self, evict_reserved: bool) -> int | None:
        """The slot `insert` fills: a free slot if there is one, else the evictable slot the
        policy likes least (the class docstring's rules); None when no slot may be taken."""
        best, best_rank = None, None
        for slot, key in enumerate(self.key_of):
            if self.pins[slot] or (self.reserved[slot] and not evict_reserved):
                continue
            if key is None:
                return slot
            # Unreserved slots go first; then the eviction order proper.
            if self.eviction == "lru":
                rank = (self.reserved[slot], self.last_use[slot])
            else:
                rank = (self.reserved[slot], self.uses[key], self.last_use[slot])
            if best_rank is None or rank < best_rank:
                best, best_rank = slot, rank
        return best
