"""Benchmark: one insert into a full device expert cache, against the number of slots (issue 17).

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench_cache.py [--repeats 9] [--steps 4000]
        [--slots 64 1536 3712] [--pinned 8] [--reserved 16]
        [--old /tmp/old_cache.py] [--old-steps 300]

The steady state of a decode step's miss: every slot holds an expert, `--pinned` of them are
pinned (the layer computing now), `--reserved` hold prefetched experts (reserved for a later
layer); an expert not in the cache is inserted as a demand miss (`evict_reserved=True`, so
`_victim` evicts) and used once (`touch`). The keys come from a shuffled cycle over 4 times as
many experts as slots, so under lfu evicted experts come back with their history. Each cache
first runs as many steps as it has slots (its index reaches its steady amount of dead
entries); then each repeat times --steps steps of every cache, in alternating order. The table
gives, per cache, the median over repeats of the mean time per step in microseconds (then each
repeat's), and the ratio of the largest slot count's to the smallest's. --old PATH also times
the cache module at PATH (the scanning one: `git show HEAD:tinymoe/offload/cache.py > PATH`
before this change), with --old-steps steps per repeat.
"""

import argparse
import importlib.util
import random
import statistics
import time

import torch

from tinymoe.offload import cache as new_cache


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("old_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def full_cache(module, slots: int, eviction: str, args, rng: random.Random):
    """A full cache with pins and reservations, and the endless list of keys to insert."""
    cache = module.ExpertCache(slots, 1, torch.device("cpu"), torch.float32, eviction)
    keys = [(layer, e) for layer in range(4) for e in range(slots)]
    rng.shuffle(keys)
    for key in keys[:slots]:
        cache.insert(key)
        for _ in range(rng.randrange(4)):  # 0 to 3 uses: lfu has counts to order by
            cache.touch(key)
    for slot in rng.sample(range(slots), args.pinned + args.reserved)[: args.pinned]:
        cache.pin(slot)
    unpinned = [s for s in range(slots) if not cache.pins[s]]
    for slot in rng.sample(unpinned, args.reserved):
        cache.reserve(slot)
    return cache, keys


def per_step_us(cache, keys: list, start: int, steps: int) -> tuple[float, int]:
    """Mean time of one step (insert a key not held, then touch it), and the next key index."""
    i, n = start, len(keys)
    t0 = time.perf_counter()
    for _ in range(steps):
        while keys[i % n] in cache.slot_of:
            i += 1
        key = keys[i % n]
        cache.insert(key, True)
        cache.touch(key)
        i += 1
    return (time.perf_counter() - t0) / steps * 1e6, i


def measure(caches: dict, eviction: str, args) -> dict[tuple[str, int], list[float]]:
    """Time every (module, slot count) cache; each repeat times them all, in alternating order,
    so that a busy moment of the machine falls on all of them rather than on one."""
    state = {}
    for name, (module, _) in caches.items():
        for slots in args.slots:
            cache, keys = full_cache(module, slots, eviction, args, random.Random(slots))
            _, i = per_step_us(cache, keys, 0, slots)  # warm-up: the steady state
            state[name, slots] = [cache, keys, i]
    runs: dict[tuple[str, int], list[float]] = {which: [] for which in state}
    order = list(state)
    for r in range(args.repeats):
        for which in order if r % 2 == 0 else order[::-1]:
            cache, keys, i = state[which]
            us, state[which][2] = per_step_us(cache, keys, i, caches[which[0]][1])
            runs[which].append(us)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--slots", type=int, nargs="+", default=[64, 1536, 3712])
    p.add_argument("--pinned", type=int, default=8)
    p.add_argument("--reserved", type=int, default=16)
    p.add_argument("--old", help="path of the old cache module, timed alongside")
    p.add_argument("--old-steps", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(1)
    caches = {"new": (new_cache, args.steps)}
    if args.old:
        caches["old"] = (load_module(args.old), args.old_steps)
    print(
        f"one step = insert (evict) + touch into a full cache, {args.pinned} pinned, "
        f"{args.reserved} reserved; median of {args.repeats} repeats, us per step, 1 thread"
    )
    for eviction in ("lru", "lfu"):
        med = {}
        for (name, slots), runs in measure(caches, eviction, args).items():
            m = med[name, slots] = statistics.median(runs)
            spread = ", ".join(f"{x:.1f}" for x in runs)
            print(f"{eviction} {name} {slots:>5} slots: {m:8.2f} us   {spread}")
        lo, hi = min(args.slots), max(args.slots)
        for name in caches:
            ratio = med[name, hi] / med[name, lo]
            print(f"{eviction} {name}: time({hi}) / time({lo}) = {ratio:.2f}")


if __name__ == "__main__":
    main()
