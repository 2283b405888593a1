"""Benchmark: the runtime's own host time per layer, warm, at the demo's size and at Qwen3's.

    .venv/bin/python tests/bench_host_overhead.py [--repeat 5] [--new-tokens 48] [--threads 1]

With every expert a step uses already in a slot and a link too fast to matter, what an
offloading policy adds to TPOT over the bare model is host work: the route hook, the scheduler's
bookkeeping, the meter, Router-PF's guess. This runs `tinymoe bench --warm` (each run generates
the prompt once, untimed, under its runtime, then again, timed) on two models, beside the bare
resident model in the same rounds:

- the shipped demo model (8 layers x 32 experts, top-4), every expert in a slot (256 slots);
- a random checkpoint with Qwen3-30B-A3B's layer and expert counts (48 x 128, top-8) and a tiny
  hidden size, so it runs on a CPU, with 1,536 slots: a quarter of its experts, the default
  budget, where choosing a victim by scanning every slot used to cost ~0.3 ms per insert.

It prints each model's bench table and the overhead per layer, (TPOT - resident TPOT) / L, in
us: the targets are <= 20 (lru) and <= 40 (prefetch+router+lru) on the demo, and the 48 x 128
figures within 1.5x of the demo's. A random model's one-token prompt keeps the decode's working
set small, so its warm run misses little; the misses it has are counted in the table.
"""

import argparse
import json
import sys
import tempfile
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymoe import ModelConfig, MoETransformer, save_model  # noqa: E402
from tinymoe.bench import format_table  # noqa: E402
from tinymoe.bench import main as bench  # noqa: E402

QWEN3_COUNTS = dict(  # Qwen3-30B-A3B's layers, experts and top-k; everything else tiny
    model_type="qwen3_moe", vocab_size=512, hidden_size=64, num_layers=48, num_heads=4,
    num_kv_heads=2, head_dim=16, num_experts=128, top_k=8, expert_dim=32, qk_norm="head",
    norm_topk_prob=True, eos_token_ids=(),
)  # fmt: skip
FAST = ["--link-gbps", "100000", "--link-latency-us", "0"]


def run(model_dir: Path, policies: str, slots: int, args: argparse.Namespace, extra: list[str]):
    argv = ["--model", str(model_dir), "--policies", policies, "--expert-slots", str(slots),
            "--threads", str(args.threads), "--max-new-tokens", str(args.new_tokens),
            "--repeat", str(args.repeat), "--warm", "--json", *FAST, *extra]  # fmt: skip
    out = StringIO()
    with redirect_stdout(out):
        if bench(argv) != 0:
            raise SystemExit(f"bench failed: {argv}")
    return json.loads(out.getvalue())


def overheads(result: dict) -> dict[str, float]:
    return {r["policy"]: r["over_resident_us_per_layer"] for r in result["rows"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5, help="rounds per model (medians)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    demo = run(ROOT / "weights" / "pydoc-moe", "lru,prefetch+router+lru,resident", 256, args, [])
    with tempfile.TemporaryDirectory() as tmp:
        model = MoETransformer(ModelConfig(**QWEN3_COUNTS)).init_weights(seed=0, std=0.05)
        save_model(model, Path(tmp), dtype=torch.float32)
        (Path(tmp) / "config.json").write_text(json.dumps(model.cfg.to_hf_dict()))
        big = run(Path(tmp), "lru,prefetch+router-nodefault+lru,resident", 1536, args,
                  ["--prompt-tokens", "1"])  # fmt: skip
    for name, result in (("demo, 8 x 32, 256 slots", demo), ("48 x 128, 1,536 slots", big)):
        print(f"\n{name}\n{format_table(result)}")
        misses = {r["policy"]: sum(r["miss_kinds"].values()) for r in result["rows"]}
        print("decode misses (all steps):", misses)
    d, b = overheads(demo), overheads(big)
    print("\nhost overhead over resident, us per layer (median run of each policy):")
    pairs = (("lru", "lru", 20), ("prefetch+router+lru", "prefetch+router-nodefault+lru", 40))
    for dn, bn, target in pairs:
        print(f"  {dn:<22} demo {d[dn]:6.1f} (target <= {target})   48 x 128 ({bn}) "
              f"{b[bn]:6.1f}   ratio {b[bn] / d[dn]:.2f} (target <= 1.5)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
