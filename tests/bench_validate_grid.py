"""Benchmark: the simulator's validation grid on this machine, simulated beside measured TPOT.

    .venv/bin/python tests/bench_validate_grid.py [--model weights/pydoc-moe] [--repeat 3]

For every copy share (0.5, 0.85, 0.95: how much of on-demand's TPOT the calibrated link spends
copying), expert-slot budget (1/8, 1/4, 1/2 of the model's experts) and lookahead (1, 2), runs
`tinymoe simulate --validate` (each round records its own trace, runs every policy for real and
replays them: tinymoe/simulator/validate.py) for every offloading policy, and prints one line
per (setting, policy): simulated and measured TPOT, their ratio (the median of the rounds' own
ratios) and the rounds' range, and the ratio with the round's costs as recorded (`costs`); then
the worst row of each. The target: every row within 10% (own compute: see validate.py).
"""

import argparse
import json
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymoe.engine.config import ModelConfig  # noqa: E402
from tinymoe.simulate import main as simulate  # noqa: E402

POLICIES = "on-demand,lru,lfu,prefetch+router,prefetch+router+lru,speculative+router,oracle"


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--model", default=str(ROOT / "weights" / "pydoc-moe"))
    a.add_argument("--repeat", type=int, default=3, help="rounds per setting")
    a.add_argument("--threads", type=int, default=1)
    args = a.parse_args()
    cfg = ModelConfig.from_file(Path(args.model) / "config.json")
    experts = cfg.num_layers * cfg.num_experts
    print(f"{'share':>5} {'slots':>5} {'d':>2} {'policy':<22} {'sim ms':>8} {'meas ms':>8} "
          f"{'ratio':>6} {'rounds':>11} {'costs':>6}")  # fmt: skip
    worst = {"ratio": None, "ratio_round_costs": None}  # own compute (the target), round's costs
    within = 0
    for share in (0.5, 0.85, 0.95):
        for slots in (experts // 8, experts // 4, experts // 2):
            for d in (1, 2):
                argv = ["--model", args.model, "--validate", "--copy-share", str(share),
                        "--expert-slots", str(slots), "--lookahead", str(d), "--policies",
                        POLICIES, "--threads", str(args.threads), "--repeat", str(args.repeat),
                        "--json"]  # fmt: skip
                out = StringIO()
                with redirect_stdout(out):
                    if simulate(argv) != 0:
                        raise SystemExit(f"simulate failed: {argv}")
                for r in json.loads(out.getvalue())["rows"]:
                    lo, hi = r["spread"]
                    print(f"{share:>5} {slots:>5} {d:>2} {r['policy']:<22} "
                          f"{r['simulated_tpot_ms']:8.2f} {r['measured_tpot_ms']:8.2f} "
                          f"{r['ratio']:6.3f} {lo:5.2f}-{hi:.2f} {r['ratio_round_costs']:6.3f}",
                          flush=True)  # fmt: skip
                    within += abs(r["ratio"] - 1) <= 0.10
                    for key, w in worst.items():
                        if w is None or abs(r[key] - 1) > w[0]:
                            worst[key] = (abs(r[key] - 1), share, slots, d, r["policy"])
    rows = 3 * 3 * 2 * len(POLICIES.split(","))
    for key, what in (("ratio", "own compute"), ("ratio_round_costs", "round's costs")):
        err, share, slots, d, policy = worst[key]
        print(f"worst ({what}): {policy} at copy share {share}, {slots} slots, lookahead {d}: "
              f"{err:.1%} ({'within' if err <= 0.10 else 'NOT within'} 10%)")  # fmt: skip
    print(f"{within} of {rows} rows within 10% (own compute)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
