"""Benchmark: the runtime's own host time per layer, warm, at the demo's size and at Qwen3's.

    .venv/bin/python tests/bench_host_overhead.py [--repeat 3] [--new-tokens 96] [--threads 1]

With every expert a decode step uses already in a slot and a link too fast to matter, what an
offloading policy adds to a step over the bare model is host work: the route hook, the
scheduler's bookkeeping, the meter, Router-PF's guess. Two copies of the model decode the same
tokens: the bare one, and one with the policy's runtime installed, which first runs the whole
sequence once, untimed, so that its slots hold every expert the timed passes use (as
`tinymoe bench --warm` does). Their decode steps alternate, one each, in flipping order, and
the figure is the median over all steps of (runtime step - bare step) / L, in us: a machine's
slow spell hits both sides of a difference alike, which whole-run TPOTs on a shared machine
do not resolve at this size (tens of us per layer of a ~4 ms step).

- the shipped demo model (8 layers x 32 experts, top-4), every expert in a slot (256 slots);
- a random model with Qwen3-30B-A3B's layer and expert counts (48 x 128, top-8) and a tiny
  hidden size, so it runs on a CPU, with 1,536 slots: a quarter of its experts, the default
  budget, where choosing a victim by scanning every slot used to cost ~0.3 ms per insert.

Targets: <= 20 (lru) and <= 40 (prefetch+router+lru) on the demo, the 48 x 128 figures within
1.5x of the demo's. The 48 x 128 model has no calibration: its Router-PF runs without default
vectors (router-nodefault). Misses in the timed passes are printed (0: every step was warm).
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymoe import ModelConfig, MoETransformer, generate, load_model  # noqa: E402
from tinymoe.engine.generate import decode_one_token, prefill  # noqa: E402
from tinymoe.engine.kvcache import KVCache  # noqa: E402
from tinymoe.engine.timing import now  # noqa: E402
from tinymoe.offload.link import LinkSpec  # noqa: E402
from tinymoe.offload.runtime import OffloadRuntime  # noqa: E402
from tinymoe.speculation.calibration import load_speculation  # noqa: E402
from tinymoe.speculation.predictors import make_predictor  # noqa: E402

FAST = LinkSpec(1e6, 0.0, "unlimited")  # a copy costs nothing measurable
QWEN3_COUNTS = dict(  # Qwen3-30B-A3B's layers, experts and top-k; everything else tiny
    model_type="qwen3_moe", vocab_size=512, hidden_size=64, num_layers=48, num_heads=4,
    num_kv_heads=2, head_dim=16, num_experts=128, top_k=8, expert_dim=32, qk_norm="head",
    norm_topk_prob=True, eos_token_ids=(),
)  # fmt: skip


def passes(model: MoETransformer, tokens: list[int], prompt_len: int):
    """Yield a closure per decode step of `tokens` (teacher-forced), after an untimed prefill."""
    cfg, p = model.cfg, model.embed_tokens.weight
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, len(tokens), cfg.head_dim, p.device,
                    p.dtype)  # fmt: skip
    prefill(model, torch.tensor([tokens[:prompt_len]]), cache)
    for pos in range(prompt_len, len(tokens)):
        yield lambda pos=pos: decode_one_token(model, torch.tensor([[tokens[pos]]]), cache, pos)


def overhead(model, policy, slots, predictor_name, cal, tokens, prompt_len, repeat):
    """Median over decode steps of (runtime step - bare step) / L in us, and the timed misses."""
    twin = copy.deepcopy(model)
    predictor = None
    if predictor_name:
        predictor = make_predictor(predictor_name, twin, cal, 1)
    diffs = []
    with OffloadRuntime(twin, policy, predictor=predictor, slots=slots, link=FAST) as rt:
        for _ in passes(twin, tokens, prompt_len):  # warm: load what the timed passes use
            _()
        rt.reset_stats()
        for _ in range(repeat):
            for i, (bare, hooked) in enumerate(
                zip(passes(model, tokens, prompt_len), passes(twin, tokens, prompt_len),
                    strict=True)
            ):  # fmt: skip
                t = {}
                for name, step in (("bare", bare), ("hooked", hooked))[:: 1 if i % 2 else -1]:
                    t0 = now()
                    step()
                    t[name] = now() - t0
                diffs.append((t["hooked"] - t["bare"]) / model.cfg.num_layers * 1e6)
        misses = rt.report()["decode"]["misses"]
    return statistics.median(diffs), misses


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--repeat", type=int, default=3, help="timed passes over the tokens")
    a.add_argument("--new-tokens", type=int, default=96)
    a.add_argument("--threads", type=int, default=1)
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    demo_dir = ROOT / "weights" / "pydoc-moe"
    demo = load_model(demo_dir, dtype="float32")
    big = MoETransformer(ModelConfig(**QWEN3_COUNTS)).init_weights(seed=0, std=0.05)
    cases = [  # (label, model, slots, calibration, prompt)
        ("demo 8 x 32, 256 slots", demo, 256, load_speculation(demo_dir, demo.cfg), 32),
        ("48 x 128, 1,536 slots", big, 1536, None, 1),  # a short prompt: a small working set
    ]
    results = {}
    with torch.inference_mode():
        for label, model, slots, cal, prompt_len in cases:
            g = torch.Generator().manual_seed(0)
            prompt = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=g).tolist()
            tokens = prompt + generate(model, prompt, args.new_tokens, eos_ids=()).tokens
            router = "router" if cal is not None else "router-nodefault"
            for policy, predictor in (("lru", None), (f"prefetch+{router}+lru", router)):
                us, misses = overhead(model, policy, slots, predictor, cal, tokens, prompt_len,
                                      args.repeat)  # fmt: skip
                results[label, policy.split("+")[0]] = us
                print(f"{label:<24} {policy:<32} {us:7.1f} us per layer  (timed misses: "
                      f"{misses})", flush=True)  # fmt: skip
    print(f"\n{args.threads} thread(s); targets: demo lru <= 20, prefetch <= 40; 48 x 128 / demo "
          "<= 1.5")  # fmt: skip
    for kind in ("lru", "prefetch"):
        d, b = results[cases[0][0], kind], results[cases[1][0], kind]
        print(f"  {kind:<9} demo {d:6.1f}   48 x 128 {b:6.1f}   ratio {b / d:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
