"""How long `tinymoe evaluate` takes against a bare forward per window with hooks (issue 9).

    python tests/bench_evaluate.py --text data/heldout.txt              # the machine as it is
    python tests/bench_evaluate.py --text data/heldout.txt --busy 2     # two torch matmul loops

Each round runs, as separate processes, in turn:
  evaluate      `python -m tinymoe.evaluate` with the acceptance flags (12,288 tokens, windows of
                512, router and router-nodefault, lookahead 1, --skip-speculative) and its
                default threads;
  reference 1   this file with --reference --threads 1: load the model, read the same windows,
                one forward per window with the scoring hook installed (the same two predictors);
  reference T   the same with torch's own thread count (one per core).
Every figure is a whole process's wall time, start to exit (imports, loading and tokenizing
included, for all three); the reference also reports its forward loop alone. --busy N first
starts N processes multiplying 1024x1024 matrices forever with torch's default threads (what
"something else running" meant in the issue), and stops them at the end. Medians of --repeat
rounds. --check also runs evaluate --stepwise once and compares the numbers.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "pydoc-moe"
FLAGS = ["--lookahead", "1", "--tokens", "12288", "--seq-len", "512"]
FLAGS += ["--predictors", "router,router-nodefault", "--skip-speculative", "--json"]
BUSY = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


def reference(text: str, threads: int | None) -> None:
    """One forward per window, the scoring hook installed; prints the forward loop's seconds."""
    import torch

    from tinymoe import load_model
    from tinymoe.corpus import read_token_ids
    from tinymoe.speculation.calibration import load_speculation
    from tinymoe.speculation.predictors import RouterPredictor
    from tinymoe.speculation.scoring import ScoringHook, forward_logits

    if threads is not None:
        torch.set_num_threads(threads)
    model = load_model(MODEL)
    ids = read_token_ids(MODEL, text, 12288, 512)  # (24, 512)
    vectors = load_speculation(MODEL, model.cfg).default_vectors
    predictors = {
        ("router", 1): RouterPredictor(model, vectors, 1),
        ("router-nodefault", 1): RouterPredictor(model, None, 1),
    }
    hook = ScoringHook(model, predictors, set())
    t0 = time.perf_counter()
    for i in range(ids.shape[0]):
        forward_logits(model, ids[i : i + 1], hook)
    print(json.dumps({"forward_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}))


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return wall, p.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default=str(ROOT / "data" / "heldout.txt"))
    p.add_argument("--busy", type=int, default=0, help="torch matmul processes beside")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--check", action="store_true", help="also compare with --stepwise once")
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reference:
        reference(args.text, None if args.threads == "torch" else int(args.threads))
        return

    evaluate = [sys.executable, "-m", "tinymoe.evaluate", "--model", str(MODEL)]
    evaluate += ["--text", args.text, *FLAGS]
    ref = [sys.executable, __file__, "--reference", "--text", args.text, "--threads"]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    try:
        time.sleep(3 if busy else 0)  # let them import torch and start multiplying
        runs: dict[str, list[float]] = {"evaluate": [], "reference 1": [], "reference T": []}
        loops: dict[str, list[float]] = {"reference 1": [], "reference T": []}
        result = None
        for i in range(args.repeat):
            wall, out = timed(evaluate)
            runs["evaluate"].append(wall)
            result = json.loads(out)
            for name, threads in (("reference 1", "1"), ("reference T", "torch")):
                wall, out = timed([*ref, threads])
                runs[name].append(wall)
                loops[name].append(json.loads(out)["forward_s"])
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in runs.items()))
        check = None
        if args.check:
            wall, out = timed([*evaluate, "--stepwise"])
            stepwise = json.loads(out)
            check = {"stepwise_s": wall, "max_abs_diff": max_difference(result, stepwise)}
    finally:
        for b in busy:
            b.kill()
            b.wait()
    med = {k: statistics.median(v) for k, v in runs.items()}
    best_ref = min(med["reference 1"], med["reference T"])
    summary = {
        "busy_processes": args.busy,
        "repeat": args.repeat,
        "median_wall_s": med,
        "runs_s": runs,
        "reference_forward_loop_median_s": {k: statistics.median(v) for k, v in loops.items()},
        "evaluate_vs_faster_reference": med["evaluate"] / best_ref,
        "check": check,
    }
    print(json.dumps(summary, indent=1))


def max_difference(a: dict, b: dict) -> float:
    """The largest difference between two evaluate results' hit rates and perplexity ratio."""
    diffs = [abs(a["speculative"]["exact"]["perplexity"] / b["speculative"]["exact"]["perplexity"]
                 - 1)]  # fmt: skip
    for name, by_d in a["hit_rates"].items():
        for d, m in by_d.items():
            for metric in ("recall", "top1"):
                pairs = zip(m[metric], b["hit_rates"][name][d][metric], strict=True)
                diffs += [abs(x - y) for x, y in pairs if x is not None]
    return max(diffs)


if __name__ == "__main__":
    main()
