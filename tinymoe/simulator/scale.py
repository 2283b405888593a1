"""scale_trace's mapping of recorded expert ids onto a target model's (costs.scale_trace).

`BucketRotation` re-expresses each token's recorded experts as the target's: every target expert
reachable, K distinct per token, the recorded reuse kept as far as the shapes allow. The rule in
full is scale_trace's docstring and docs/simulator.md ("The routing mapping").
"""

import math
from bisect import bisect_left

from tinymoe.errors import TinyMoeError
from tinymoe.simulator.record import RoutingTrace

MASK = 2**64 - 1


def mix(*xs: int) -> int:
    """A fixed 64-bit hash of integers (splitmix64's finaliser, chained): the mapping's only
    pseudo-randomness, the same on every run and machine (Python's hash() is not, for str)."""
    h = 0
    for x in xs:
        h = ((h ^ (x & MASK)) + 0x9E3779B97F4A7C15) & MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
        h ^= h >> 31
    return h


class BucketRotation:
    """scale_trace's mapping (see there): a recorded row of expert ids -> the target's."""

    name = "bucket-rotation"

    def __init__(self, trace: RoutingTrace, E: int, K: int, stay: float | None) -> None:
        self.E, self.K = E, K
        self.E_rec, self.K_rec = trace.model["num_experts"], trace.model["top_k"]
        self.C = -(-K // self.K_rec)  # the most target experts one recorded expert gives a token
        density = K * self.E_rec / (self.K_rec * E)  # target's K/E over the recorded's
        self.stay = min(1.0, density) if stay is None else stay
        if not 0.0 <= self.stay <= 1.0:
            raise TinyMoeError(f"scale_trace: stay must be in [0, 1], got {self.stay}")
        L_rec = trace.model["num_layers"]
        self.uses: list[list[list[int]]] = [[[] for _ in range(self.E_rec)] for _ in range(L_rec)]
        self.start: list[int] = []  # each pass's first token position
        pos = 0
        for ps in trace.passes:
            self.start.append(pos)
            for lr, rec in enumerate(ps.layers):
                for n, row in enumerate(rec.experts):
                    for e in row:
                        self.uses[lr][e].append(pos + n)  # positions, ascending
            pos += len(ps.layers[0].experts)

    def bucket(self, e: int) -> range:
        if self.E_rec <= self.E:
            return range(e * self.E // self.E_rec, (e + 1) * self.E // self.E_rec)
        return range(e * self.E // self.E_rec, e * self.E // self.E_rec + 1)

    def candidates(self, pos: int, layer: int, lr: int, e: int) -> list[int]:
        """e's target experts at token `pos` of target layer `layer` (recorded layer lr), in
        preference order: its bucket rotated to the current epoch, then every other expert."""
        members = self.bucket(e)
        b, a = len(members), members[0]
        uses = bisect_left(self.uses[lr][e], pos)  # e's uses at lr before this token
        epoch = math.floor((uses + mix(layer, e, 1) / 2**64) * (1.0 - self.stay))
        first = (mix(layer, e, 2) + epoch * self.C) % b
        return [a + (first + i) % b for i in range(b)] + [
            (a + b + i) % self.E for i in range(self.E - b)
        ]

    def row(self, ids: list[int], pos: int, layer: int, lr: int, n_out: int) -> list[int]:
        ids = list(dict.fromkeys(ids))
        if not ids:
            return []
        q, r = divmod(n_out, len(ids))
        # Who gets the r extra experts, and who yields on a collision: an order of the row's
        # ids that does not depend on how the row lists them (a guess naming the same experts
        # in another order maps to the same ids).
        order = sorted(ids, key=lambda e: mix(pos, layer, e))
        taken: set[int] = set()
        got: dict[int, list[int]] = {}
        for i, e in enumerate(order):
            want = q + (i < r)
            mine = got[e] = []
            for x in self.candidates(pos, layer, lr, e):
                if len(mine) == want:
                    break
                if x not in taken:
                    mine.append(x)
                    taken.add(x)
        return [x for e in ids for x in got[e]]  # in the row's order (a guess: confidence)

    def rows(self, rows: list[list[int]], p: int, layer: int, lr: int) -> list[list[int]]:
        def n_out(g: int) -> int:  # a routing row gives K; a guess of g ids, g x K / K_rec
            return (
                self.K if g == self.K_rec else max(1, min(self.E, round(g * self.K / self.K_rec)))
            )

        start = self.start[p]
        return [self.row(r, start + n, layer, lr, n_out(len(r))) for n, r in enumerate(rows)]
