"""The GPU check: everything tinymoe can only validate on a real CUDA device, in one command.

    python tests/gpu_check.py [--out gpu-check] [--layers 4] [--new-tokens 32]

Run it on a machine with an NVIDIA GPU (about three minutes; it needs ~6 GB of GPU memory and
~16 GB of host memory for the default four layers). It writes, under --out:

    pytest.txt        the CUDA tests (tests/test_offload_cuda.py and every other `cuda` test):
                      delayed copies in every scheduling mode, the sync count, pinned memory
    h2d.json          pinned host-to-device bandwidth: one large copy, and expert-sized copies
                      back to back on a side stream (what the offloading runtime does)
    bench.json/.txt   tinymoe.bench on a random checkpoint with Qwen3-30B-A3B's shapes (hidden
                      2048, 128 experts of width 768, top-8, bf16; 9.4 MB per expert) and
                      --layers layers: TPOT per policy on the real link
    decode.json       resident decode on the GPU, eager against the compiled step captured as
                      a CUDA graph (generate(compile=True)): TPOT, compile time, same tokens
    summary.json      the headline figures of all four

Not collected by pytest (the file name does not start with test_). Random weights route close to
uniformly, so the bench's hit rates are a stress test, not Qwen3's; its TPOT and bandwidth
figures are what the hardware does with these shapes.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymoe import ModelConfig, MoETransformer, load_model, save_model  # noqa: E402
from tinymoe.engine.generate import generate  # noqa: E402

QWEN3_30B_A3B = dict(  # the published config.json of Qwen/Qwen3-30B-A3B, fewer layers
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    num_heads=32,
    num_kv_heads=4,
    head_dim=128,
    num_experts=128,
    top_k=8,
    expert_dim=768,
    qk_norm="head",
    norm_topk_prob=True,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    eos_token_ids=(),
)
POLICIES = (
    "on-demand,lru,prefetch+router-nodefault+lru,speculative+router-nodefault,oracle,resident"
)


def run_tests(out: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(ROOT / "tests")]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "pytest.txt").write_text(p.stdout + p.stderr)
    last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"returncode": p.returncode, "result": last, "seconds": time.perf_counter() - t0}


def h2d_bandwidth(expert_bytes: int) -> dict:
    """GB/s (1e9 B/s) of pinned host-to-device copies: one 1 GiB copy, and 64 expert-sized
    copies issued back to back on a side stream, each timed by events (best of three)."""
    dev = torch.device("cuda")

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    big = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    big_dst = torch.empty_like(big, device=dev)
    one = 2**30 / timed(lambda: big_dst.copy_(big, non_blocking=True)) / 1e9
    n = 64
    src = torch.empty(n, expert_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, expert_bytes, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream()

    def experts() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(n):
                dst[i].copy_(src[i], non_blocking=True)
        torch.cuda.current_stream().wait_stream(side)

    per_expert = n * expert_bytes / timed(experts) / 1e9
    return {
        "one_1GiB_copy_gbps": one,
        "expert_copies_gbps": per_expert,
        "expert_bytes": expert_bytes,
    }


@torch.no_grad()
def make_checkpoint(path: Path, layers: int) -> ModelConfig:
    """A random bf16 checkpoint with Qwen3-30B-A3B's shapes, initialised on the GPU (fast)."""
    cfg = ModelConfig(num_layers=layers, **QWEN3_30B_A3B)
    with torch.device("cuda"):
        model = MoETransformer(cfg)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    save_model(model, path, dtype=torch.bfloat16)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    del model
    torch.cuda.empty_cache()
    return cfg


def run_bench(model_dir: Path, out: Path, new_tokens: int) -> dict:
    cmd = [
        sys.executable, "-m", "tinymoe.bench", "--model", str(model_dir), "--device", "cuda",
        "--dtype", "bfloat16", "--policies", POLICIES, "--prompt-tokens", "64",
        "--max-new-tokens", str(new_tokens), "--repeat", "3", "--json",
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "bench.txt").write_text(p.stderr)
    if p.returncode != 0:
        return {"returncode": p.returncode, "error": p.stderr.strip().splitlines()[-1:]}
    (out / "bench.json").write_text(p.stdout)
    result = json.loads(p.stdout)
    keys = ("tpot_ms", "ratio_vs_on_demand", "hit_rate", "stall_share", "achieved_gbps", "exact")
    return {r["policy"]: {k: r.get(k) for k in keys} for r in result["rows"]}


def decode_speed(model_dir: Path, new_tokens: int) -> dict:
    """Resident decode, eager against compiled with CUDA graphs, alternating, two runs each (the
    first compiled run compiles and records the graph; the second is the steady state)."""
    model = load_model(model_dir, device="cuda", dtype=torch.bfloat16)
    prompt = list(range(1, 65))
    runs: dict[str, list] = {"eager": [], "compiled": []}
    for _ in range(2):
        for name in runs:
            runs[name].append(
                generate(model, prompt, new_tokens, eos_ids=(), compile=name != "eager")
            )
    median = {n: 1e3 * sorted(r[-1].step_s)[len(r[-1].step_s) // 2] for n, r in runs.items()}
    counters = torch._dynamo.utils.counters
    return {
        "tpot_p50_ms": median,
        "compiled_over_eager": median["compiled"] / median["eager"],
        "compile_s": runs["compiled"][0].compile_s,
        "same_tokens": runs["compiled"][-1].tokens == runs["eager"][-1].tokens,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check", help="directory for the result files")
    p.add_argument("--layers", type=int, default=4, help="layers of the Qwen3-shaped checkpoint")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-compile", action="store_true", help="skip step 4 (compiles ~1 minute)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device; this script checks the GPU path", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print("1/4 CUDA tests ...", file=sys.stderr, flush=True)
    summary["tests"] = run_tests(out)
    print(f"    {summary['tests']['result']}", file=sys.stderr)
    print("2/4 pinned host-to-device bandwidth ...", file=sys.stderr, flush=True)
    cfg = ModelConfig(num_layers=1, **QWEN3_30B_A3B)
    summary["h2d"] = h2d_bandwidth(cfg.expert_numel * 2)
    (out / "h2d.json").write_text(json.dumps(summary["h2d"], indent=2))
    print(f"    {summary['h2d']}", file=sys.stderr)
    print(f"3/4 bench, Qwen3-30B-A3B shapes, {args.layers} layers, bf16 ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(Path(tmp), args.layers)
        summary["bench"] = run_bench(Path(tmp), out, args.new_tokens)
        if not args.no_compile:
            print("4/4 resident decode, eager vs compiled + CUDA graphs ...", file=sys.stderr)
            summary["decode"] = decode_speed(Path(tmp), args.new_tokens)
            (out / "decode.json").write_text(json.dumps(summary["decode"], indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if summary["tests"]["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
