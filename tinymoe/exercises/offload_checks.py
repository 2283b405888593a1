"""The eviction exercise, and what the offloading checks share: generating under a policy.

The student's class is put where the runtime builds its own (`patched` on the runtime module),
so the real OffloadRuntime runs on the student's code. Scheduler decisions never depend on a
clock (docs/offloading.md), so bytes and counts are compared with the engine's exactly.
"""

import functools
import random

import torch

from tinymoe.engine.generate import generate
from tinymoe.exercises.exercise import CheckFailed, Exercise, expect, patched, targets
from tinymoe.exercises.fixtures import demo_model, heldout_ids
from tinymoe.offload.cache import ExpertCache
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.runtime import OffloadRuntime

FAST = LinkSpec(100.0, 0.0, "fast")  # copies in microseconds: the checks of decisions stay quick
NEW_TOKENS = 12


def prompt() -> list[int]:
    return heldout_ids()[0, :8].tolist()


def offloaded(policy: str, *, predictor=None, link=FAST, **kwargs) -> tuple[list[int], dict]:
    """Generate on the demo model under an offloading policy: the tokens and the report.
    predictor: makes the predictor (a fresh one for each run), if the policy needs one."""
    predictor = predictor() if predictor else None
    with OffloadRuntime(demo_model(), policy, predictor=predictor, link=link, **kwargs) as rt:
        tokens = generate(demo_model(), prompt(), NEW_TOKENS, eos_ids=()).tokens
        report = rt.report()
        report["decode_miss_kinds"] = [dict(+st.miss_kinds) for st in rt.stats["decode"].layers]
        return tokens, report


@functools.cache
def resident_tokens() -> list[int]:
    return generate(demo_model(), prompt(), NEW_TOKENS, eos_ids=()).tokens


def _decisions(report: dict) -> dict:
    """What the scheduler decided in decode, free of timing ("late" is a hit that waited)."""
    d = report["decode"]
    kinds = dict(d["miss_kinds"])
    found = d["hits"] + kinds.pop("late")
    return {
        "bytes copied": d["bytes_copied"],
        "prefetch bytes": d["prefetch_bytes"],
        "wasted prefetch bytes": d["wasted_prefetch_bytes"],
        "experts found in a slot": found,
        **{f"{k} misses": v for k, v in kinds.items()},
    }


def same_as_engine(patch: tuple[str, str, object], policy: str, what: str, **kwargs) -> dict:
    """Generate offloaded under `policy` with `patch` (module, name, the student's object) in
    place, then with the engine's own code: the same tokens and the same decisions. Returns the
    report of the run on the student's code."""
    with patched(*patch):
        tokens, mine = offloaded(policy, **kwargs)  # yours first: a hole fails at once
    ref_tokens, ref = offloaded(policy, **kwargs)
    expect(tokens == ref_tokens, f"{what}: the tokens changed")
    for key, want in _decisions(ref).items():
        got = _decisions(mine)[key]
        expect(got == want, f"{what}: {key} is {got}, the engine's cache/scheduler gives {want}")
    return mine


# ---------------------------------------------------------------- eviction

# Checks name experts, never slots: which free slot an expert goes to is the answer's choice.
A, B, C, X, Y = (0, 0), (0, 1), (0, 2), (9, 9), (9, 8)


def _cache(cls, slots: int, eviction: str) -> ExpertCache:
    return cls(slots, 4, torch.device("cpu"), torch.float32, eviction)  # experts of 4 numbers


def _filled(cls, eviction: str) -> ExpertCache:
    """A 3-slot cache holding A, B and C, used once each in that order (A least recent)."""
    cache = _cache(cls, 3, eviction)
    for key in (A, B, C):
        cache.insert(key)
        cache.touch(key)
    return cache


def _evicts(cache: ExpertCache, key: tuple = X, evict_reserved: bool = True):
    """Insert `key`: the key it evicted, None for a free slot, "gave up" when insert did."""
    got = cache.insert(key, evict_reserved)
    return "gave up" if got is None else got[1]


def on_slots(cache: ExpertCache, op: str, *keys: tuple) -> None:
    """Call cache.pin, unpin or reserve (`op`) on the slot of each key, in order."""
    for key in keys:
        getattr(cache, op)(cache.slot_of[key])


def check_free_first(code) -> str:
    cache = _cache(code.ExpertCache, 3, "lru")
    for n, key in enumerate((A, B, C), 1):
        expect(_evicts(cache, key) is None, f"insert #{n} into a cache with a free slot evicted")
    expect(len(set(cache.slot_of.values())) == 3, "two experts were given the same slot")
    cache.drop(B)  # its slot is free again
    expect(_evicts(cache) is None, "a slot freed by drop() was not used before evicting")
    return "a free slot is used while there is one"


def check_pins(code) -> str:
    for ev in ("lru", "lfu"):
        cache = _filled(code.ExpertCache, ev)  # A is the policy's first choice throughout
        on_slots(cache, "pin", A, B, C)
        expect(_evicts(cache) == "gave up", f"{ev}: with every slot pinned, insert must give up")
        on_slots(cache, "pin", A)  # A has two users now
        on_slots(cache, "unpin", B)
        got = _evicts(cache)
        expect(got != A, f"{ev}: a slot pinned by two users was evicted")
        expect(got == B, f"{ev}: only one slot was unpinned, yet another expert was evicted")
        on_slots(cache, "pin", X)
        on_slots(cache, "unpin", A)  # one of A's two users is done: A is still pinned
        expect(
            _evicts(cache, Y) == "gave up",
            f"{ev}: a slot pinned twice and unpinned once is still pinned, yet insert took it",
        )
    return "a pinned slot is never evicted, however many users hold it; None when all are"


def check_reserved(code) -> str:
    cache = _filled(code.ExpertCache, "lru")
    on_slots(cache, "reserve", A)
    on_slots(cache, "pin", C)  # B is the one slot neither reserved nor pinned
    message = "a demand miss evicted a reserved slot while an unreserved one was left"
    expect(_evicts(cache) == B, message)
    on_slots(cache, "unpin", C)
    on_slots(cache, "reserve", C, X)
    expect(
        _evicts(cache, Y, evict_reserved=False) == "gave up",
        "a prefetch (evict_reserved=False) evicted a reserved slot",
    )
    expect(
        _evicts(cache, Y) != "gave up",
        "a demand miss found only reserved slots and gave up: it may take one",
    )
    return "reserved slots go last, and only to a demand miss"


def check_orders(code) -> str:
    lru = _filled(code.ExpertCache, "lru")
    lru.touch(A)
    expect(_evicts(lru) == B, "lru: the least recently used expert was not the one evicted")
    lfu = _filled(code.ExpertCache, "lfu")
    for key in (A, A, A, C):
        lfu.touch(key)  # uses: A 4, B 1, C 2
    expect(_evicts(lfu) == B, "lfu: the least frequently used expert was not the one evicted")
    lfu = _filled(code.ExpertCache, "lfu")
    for _ in range(5):
        lfu.touch(A)  # A: 6 uses
    on_slots(lfu, "pin", B, C)
    expect(_evicts(lfu) == A, "lfu: only one slot was unpinned, yet another expert was evicted")
    on_slots(lfu, "unpin", B, C)
    lfu.touch(X)  # B, C and X: one use each, X the most recent
    expect(
        _evicts(lfu, A) == B,
        "lfu: among experts used equally often, the least recently used was not the one evicted",
    )
    for key in (A, C, X):
        lfu.touch(key)  # A: 7 uses in all, 1 since it came back; C and X: 2, more recent
    expect(
        _evicts(lfu, Y) == C,
        "lfu: an expert reloaded after eviction lost its history (count every use since "
        "the cache was made)",
    )
    return "LRU by recency; LFU by all-time uses, ties by recency"


def _random_ops(cache: ExpertCache, rng: random.Random, steps: int) -> list:
    log = []
    for i in range(steps):
        held = sorted(cache.slot_of)  # by key: slot numbers are the answer's choice
        op = rng.choice(["insert"] * 4 + ["touch"] * 4 + ["pin", "unpin", "reserve", "unreserve"])
        if op == "insert" or not held:
            key = (rng.randrange(3), rng.randrange(6))
            if key in cache.slot_of:
                cache.touch(key)
                continue
            got = cache.insert(key, evict_reserved=rng.random() < 0.7)
            log.append((i, key, None if got is None else got[1]))
            if got is not None:
                cache.touch(key)
        elif op == "touch":
            cache.touch(rng.choice(held))
        else:
            slot = cache.slot_of[rng.choice(held)]
            if op == "pin" and sum(cache.pins) < cache.num_slots - 1:
                cache.pin(slot)
            elif op == "unpin" and cache.pins[slot]:
                cache.unpin(slot)
            elif op in ("reserve", "unreserve"):
                getattr(cache, op)(slot)
    return log


def check_random_against_engine(code) -> str:
    n = 0
    for eviction in ("lru", "lfu"):
        for seed in range(4):
            mine, ref = (
                _random_ops(_cache(cls, 4, eviction), random.Random(seed), 300)
                for cls in (code.ExpertCache, ExpertCache)
            )
            for a, b in zip(mine, ref, strict=False):
                if a != b:
                    raise CheckFailed(
                        f"{eviction}, random sequence {seed}: at operation {a[0]}, "
                        f"inserting {a[1]} evicted {a[2]}; the engine's cache "
                        "evicts another expert there"
                    )
            n += len(ref)
    return f"{n} inserts in random sequences evict what the engine's cache evicts"


def check_eviction_demo(code) -> str:
    notes = []
    yours = ("tinymoe.offload.runtime", "ExpertCache", code.ExpertCache)
    for policy in ("lru", "lfu"):
        try:
            mine = same_as_engine(yours, policy, f"{policy} on the demo model", slots=48)
        except KeyError as e:  # the runtime asked for an expert no longer in the cache
            raise CheckFailed(
                f"{policy}: the runtime lost expert {e} while a layer was using it: a slot in "
                "use (pinned) was given to another expert"
            ) from None
        notes.append(f"{policy} hit rate {mine['decode']['hit_rate']:.2f}")
    return "demo model, 48 of 256 experts cached, decode: " + ", ".join(notes)


EVICTION = Exercise(
    id="eviction",
    title="The expert cache: pins, reservations, LRU and LFU eviction",
    concepts=(
        "device expert slots",
        "pinned slots are never evicted",
        "prefetch reservations",
        "LRU vs LFU with history",
    ),
    targets=targets("tinymoe.offload.cache:ExpertCache._victim"),
    minutes=30,
    prerequisites=("moe-layer",),
    checks=(
        ("free slots first", check_free_first),
        ("pinned slots", check_pins),
        ("reserved slots", check_reserved),
        ("eviction orders", check_orders),
        ("random sequences against the engine", check_random_against_engine),
        ("the demo model's routing", check_eviction_demo),
    ),
    engine_checks=("the demo model's routing",),
)
