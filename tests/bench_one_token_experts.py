"""Benchmark: one token's K experts, four ways, on the packed (E, 3*I*D) layout of each layer.

    .venv/bin/python tests/bench_one_token_experts.py [--repeats 7] [--experts 16] [--top-k 2]
                                                      [--expert-dim 512] [--hidden 256]

Why the eager decode step loops over experts (moe_forward's one-token path) and only the
compiled step reads them by index (experts_by_index). For L=8 layers, each with its own random
(E, 3*I*D) weights (more than the last-level cache, as in a real step), one token goes through
K experts of every layer:

- loop: moe_forward's one-token path, one expert at a time from the resident provider;
- grouped_mm: torch._grouped_mm over the layer's (E, 2I, D) and (E, D, I) views, the token
  repeated K times and sorted by expert (two calls per layer, whatever K; no copy of weights);
- index, eager: experts_by_index run eagerly: indexing the weights with the ids copies K experts;
- index, compiled: experts_by_index through torch.compile (inductor reads the rows in place).

Each repeat times every way over the same 40 tokens, in alternating order; the table gives the
median over repeats of the mean time per token (all L layers), in ms, one thread.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tinymoe.engine.experts import ResidentExperts, experts_by_index
from tinymoe.engine.moe import Routing, moe_forward

L, TOKENS = 8, 40


def grouped(u, ids, w, W, I):
    """K experts with two torch._grouped_mm calls: rows sorted by expert, offsets per expert."""
    E, D, K = W.shape[0], u.shape[-1], ids.shape[-1]
    sorted_ids, order = ids[0].sort()
    offs = torch.searchsorted(sorted_ids, torch.arange(E), right=True).to(torch.int32)  # (E,)
    gate_up = W[:, : 2 * I * D].view(E, 2 * I, D).transpose(1, 2)  # (E, D, 2I)
    down = W[:, 2 * I * D :].view(E, D, I).transpose(1, 2)  # (E, I, D)
    g, up = torch._grouped_mm(u.expand(K, D).contiguous(), gate_up, offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * up, down, offs=offs)  # (K, D), sorted by expert
    return (y * w[0, order, None]).sum(dim=0, keepdim=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    E, K, I, D = args.experts, args.top_k, args.expert_dim, args.hidden
    g = torch.Generator().manual_seed(0)
    provider = ResidentExperts(L, E, 3 * I * D)
    with torch.no_grad():
        for w in provider.weights:
            w.copy_(0.05 * torch.randn(w.shape, generator=g))
    Ws = [w.detach() for w in provider.weights]
    tokens = []
    for _ in range(TOKENS):
        u = torch.randn(1, D, generator=g)
        ids = [torch.randperm(E, generator=g)[:K].view(1, K) for _ in range(L)]
        tokens.append((u, ids, torch.softmax(torch.randn(1, K, generator=g), -1)))
    compiled = torch.compile(experts_by_index, dynamic=False)

    ways = {
        "loop (eager decode)": lambda u, ids, w, l: moe_forward(u, Routing(ids, w), provider, l, I),
        "grouped_mm": lambda u, ids, w, l: grouped(u, ids, w, Ws[l], I),
        "index, eager (copies)": lambda u, ids, w, l: experts_by_index(u, ids, w, Ws[l], I),
        "index, compiled": lambda u, ids, w, l: compiled(u, ids, w, Ws[l], I),
    }

    @torch.inference_mode()
    def run(way) -> float:
        t0 = time.perf_counter()
        for u, ids, w in tokens:
            for layer in range(L):
                way(u, ids[layer], w, layer)
        return (time.perf_counter() - t0) / TOKENS * 1e3

    t0 = time.perf_counter()
    with torch.inference_mode():
        u, ids, w = tokens[0]
        want = ways["loop (eager decode)"](u, ids[0], w, 0)
        for way in ways.values():  # warm-up (compiles), and every way agrees
            torch.testing.assert_close(way(u, ids[0], w, 0), want, atol=1e-5, rtol=1e-5)
    compile_s = time.perf_counter() - t0
    ms: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            ms[name].append(run(ways[name]))
    print(
        f"{L} layers x E={E} experts (I={I}, D={D}, fp32), top-{K}, one token at a time, "
        f"1 thread, {args.repeats} alternating repeats; warm-up with compile {compile_s:.1f} s"
    )
    base = statistics.median(ms[names[0]])
    for name in names:
        med = statistics.median(ms[name])
        runs = ", ".join(f"{x:.2f}" for x in ms[name])
        print(f"{name:>22}: {med:6.2f} ms per token ({med / base:.2f}x the loop)   {runs}")


if __name__ == "__main__":
    main()
