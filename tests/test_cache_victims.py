"""The expert cache's victim index against the plain scan it replaced.

`ScanCache` is the cache as it was before the index (tinymoe/offload/cache.py at the time):
the same state, and `victim` scanning every slot. Long random sequences of every operation
drive both; every insert must take the same slot and evict the same expert (or give up alike),
and the whole state must stay equal. Broken variants of the index show that the comparison
catches a wrong rule or a forgotten update.
"""

import heapq
import random
from collections import Counter

import pytest
import torch

from tinymoe.offload.cache import HELD, ExpertCache


class ScanCache:
    """The reference: the old ExpertCache without the tensor, its `_victim` a scan."""

    def __init__(self, num_slots: int, eviction: str) -> None:
        self.eviction = eviction
        self.key_of = [None] * num_slots
        self.slot_of = {}
        self.pins = [0] * num_slots
        self.reserved = [False] * num_slots
        self.last_use = [0] * num_slots
        self.uses = Counter()
        self.clock = 0

    def touch(self, key):
        self.clock += 1
        self.last_use[self.slot_of[key]] = self.clock
        self.uses[key] += 1

    def pin(self, slot):
        self.pins[slot] += 1

    def unpin(self, slot):
        self.pins[slot] -= 1

    def reserve(self, slot):
        self.reserved[slot] = True

    def unreserve(self, slot):
        self.reserved[slot] = False

    def insert(self, key, evict_reserved=True):
        slot = self.victim(evict_reserved)
        if slot is None:
            return None
        evicted = self.key_of[slot]
        if evicted is not None:
            del self.slot_of[evicted]
        self.reserved[slot] = False
        self.key_of[slot] = key
        self.slot_of[key] = slot
        self.clock += 1
        self.last_use[slot] = self.clock
        return slot, evicted

    def drop(self, key):
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.key_of[slot] = None
            self.pins[slot], self.reserved[slot] = 0, False

    def victim(self, evict_reserved):
        """Today's rule: the lowest free slot that may be taken, else the smallest rank."""
        best, best_rank = None, None
        for slot, key in enumerate(self.key_of):
            if self.pins[slot] or (self.reserved[slot] and not evict_reserved):
                continue
            if key is None:
                return slot
            if self.eviction == "lru":
                rank = (self.reserved[slot], self.last_use[slot])
            else:
                rank = (self.reserved[slot], self.uses[key], self.last_use[slot])
            if best_rank is None or rank < best_rank:
                best, best_rank = slot, rank
        return best


STATE = ("key_of", "slot_of", "pins", "reserved", "last_use", "uses")
OPS = ("insert", "insert_prefetch", "touch", "pin", "unpin", "reserve", "unreserve", "drop")


def first_difference(cls, num_slots: int, eviction: str, seed: int, steps: int) -> str | None:
    """Drive `cls` and ScanCache through the same random operations: the first difference in
    an insert's answer or in the state, or None. Each seed draws its own mix of operations
    (weights), so some runs are pin-heavy, some reserve-heavy, some mostly inserts."""
    rng = random.Random(seed)
    weights = [rng.uniform(0.05, 1.0) for _ in OPS]
    new = cls(num_slots, 1, torch.device("cpu"), torch.float32, eviction)
    ref = ScanCache(num_slots, eviction)
    universe = [(layer, e) for layer in range(3) for e in range(num_slots)]  # 3x the slots
    for i in range(steps):
        op = rng.choices(OPS, weights)[0]
        held = sorted(ref.slot_of)
        slot = rng.randrange(num_slots)  # pin and reserve reach free slots too
        if op.startswith("insert") or not held:
            key = rng.choice(universe)
            if key in ref.slot_of:
                new.touch(key), ref.touch(key)
            else:
                evict_reserved = op == "insert"
                got, want = new.insert(key, evict_reserved), ref.insert(key, evict_reserved)
                if got != want:
                    return f"step {i}: insert {key} ({evict_reserved=}) gave {got}, not {want}"
        elif op == "touch":
            key = rng.choice(held)
            new.touch(key), ref.touch(key)
        elif op == "pin" and sum(ref.pins) <= num_slots:  # at times every slot is pinned
            new.pin(slot), ref.pin(slot)
        elif op == "unpin" and ref.pins[slot]:
            new.unpin(slot), ref.unpin(slot)
        elif op in ("reserve", "unreserve"):
            getattr(new, op)(slot), getattr(ref, op)(slot)
        elif op == "drop":
            key = rng.choice(held + [rng.choice(universe)])  # now and then one not held
            new.drop(key), ref.drop(key)
        for name in STATE:
            if getattr(new, name) != getattr(ref, name):
                return f"step {i} ({op}): {name} differs"
        if sum(map(len, new._heaps)) > 2 * num_slots + 16:
            return f"step {i}: the heaps hold {sum(map(len, new._heaps))} entries"
    return None


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
@pytest.mark.parametrize("num_slots", [1, 2, 5, 16, 200])
def test_same_victims_as_the_scan(num_slots, eviction):
    for seed in range(6):
        assert first_difference(ExpertCache, num_slots, eviction, seed, 2500) is None


# ---------------------------------------------------------------- the comparison catches bugs


class IgnoresReservations(ExpertCache):
    """Wrong rule: reserved held slots compete with unreserved ones, even for a prefetch."""

    def _place(self, slot):
        place = super()._place(slot)
        held = place is not None and self.key_of[slot] is not None
        return (HELD, place[1]) if held else place


class UnpinForgetsTheIndex(ExpertCache):
    """Forgotten update: an unpinned slot is not pushed back (it waits for the next rebuild)."""

    def unpin(self, slot):
        self.pins[slot] -= 1


class TouchForgetsTheIndex(ExpertCache):
    """Forgotten update: a touch changes the rank but pushes nothing."""

    def touch(self, key):
        self._clock += 1
        self.last_use[self.slot_of[key]] = self._clock
        self.uses[key] += 1


class UnreserveForgetsTheIndex(ExpertCache):
    def unreserve(self, slot):
        self.reserved[slot] = False


class DropForgetsTheIndex(ExpertCache):
    def drop(self, key):
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.key_of[slot] = None
            self.pins[slot], self.reserved[slot] = 0, False


class EvictsBeforeUsingAFreeSlot(ExpertCache):
    """Wrong rule: an unreserved held slot goes before a free one."""

    def _victim(self, evict_reserved):
        entry = self._best(HELD)
        return entry[-1] if entry is not None else super()._victim(evict_reserved)


class LfuWithoutCounts(ExpertCache):
    """Wrong rule: lfu ranked by recency alone, as lru."""

    def _place(self, slot):
        place = super()._place(slot)
        return (place[0], place[1][-2:]) if place else place


class NeverRebuilds(ExpertCache):
    """Right victims, but dead entries pile up without bound."""

    def _index(self, slot):
        place = self._place(slot)
        if place is not None:
            heapq.heappush(self._heaps[place[0]], place[1])


@pytest.mark.parametrize(
    "broken",
    [
        IgnoresReservations,
        UnpinForgetsTheIndex,
        TouchForgetsTheIndex,
        UnreserveForgetsTheIndex,
        DropForgetsTheIndex,
        EvictsBeforeUsingAFreeSlot,
        LfuWithoutCounts,
        NeverRebuilds,
    ],
)
def test_the_comparison_catches_a_broken_index(broken):
    found = [
        first_difference(broken, n, ev, seed, 1000)
        for n in (3, 16)
        for ev in ("lru", "lfu")
        for seed in range(3)
    ]
    assert any(found), f"{broken.__name__} passed for the reference"
