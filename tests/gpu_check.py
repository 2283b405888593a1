"""The GPU check: every claim tinymoe can only validate on a real CUDA device, in one command.

    python tests/gpu_check.py [--out gpu-check] [--layers 4] [--new-tokens 32]
                              [--only NAME,..] [--skip NAME,..] [--budget-s 480] [--dry-run]

Sized for one run of under ten minutes on an H200 (not yet run on one; ~6 GB of GPU memory,
~16 GB of host memory at 4 layers).
Each check is one line of summary.json's "checks", {"pass": true | false | null (skipped), ...};
one that fails or raises does not stop the others, summary.json is rewritten after each, no
check starts after --budget-s and its subprocesses stop 30 s after it. GPU-only claims first:

  tests       pytest -m cuda over tests/ (pytest.txt, .xml), with a line per claim they hold:
              pinned_store (cudaHostRegister, adopted without a copy), sync_count (L + 1 syncs
              per decode step, in sync debug mode), copy_fault (a copy faulting on its stream
              surfaces at a `# SYNC:` line), delayed_copies (every scheduling mode), cuda_graphs
              (replays give eager's tokens), event_pool (the meter's events come from a pool)
  gather      the compiled resident step's inductor code copies no expert: no buffer of K*I*D
              elements or more, no batched matmul (a control that copies W[ids] is flagged)
  record      CUDA-graph trees warm up and record only in the decode steps generate keeps out
              of step_s (compile_s, record_s), in two generations
  recompiles  the compiled offloaded step (lru), 48 layers x 128 experts, top-8: few graphs,
              no recompile limit hit (made an error), a resident step still one graph after it
  h2d         pinned host-to-device GB/s: one 1 GiB copy; 64 expert-sized copies on a stream
  bench       tinymoe.bench on a random checkpoint with Qwen3-30B-A3B's shapes (hidden 2048,
              128 experts of width 768, top-8, bf16; 9.4 MB per expert), --layers layers
  quant       the same bench with int4 experts (--expert-quant int4): codes and scales copied
              on the copy stream and dequantized there; every exact row keeps resident's tokens
  decode      resident decode, eager against compiled + CUDA graphs: TPOT, same tokens
  simulate    tinymoe.simulate --validate on the same checkpoint: the trace recorded over the
              real link (measured, no simulated one), simulated beside measured TPOT per policy

--dry-run runs it all on the CPU with tiny sizes (tests: collected and skipped; h2d: skipped;
the rest for real, on inductor's CPU code), so that a bug here shows without a GPU
(tests/test_cuda_path.py runs it). Random weights route close to uniformly: the bench's hit
rates are a stress test, not Qwen3's.
"""

import argparse
import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymoe import ModelConfig, MoETransformer, load_model, save_model  # noqa: E402
from tinymoe.engine import generate as generate_module  # noqa: E402
from tinymoe.engine.generate import generate  # noqa: E402
from tinymoe.offload.link import LinkSpec  # noqa: E402
from tinymoe.offload.runtime import OffloadRuntime  # noqa: E402

QWEN3_30B_A3B = dict(  # the published config.json of Qwen/Qwen3-30B-A3B, fewer layers
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_heads=32, num_kv_heads=4,
    head_dim=128, num_experts=128, top_k=8, expert_dim=768, qk_norm="head", norm_topk_prob=True,
    rope_theta=1e6, rms_norm_eps=1e-6, eos_token_ids=(),
)  # fmt: skip
TINY_QWEN3 = dict(QWEN3_30B_A3B, vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2,
                  head_dim=16, num_experts=16, top_k=4, expert_dim=32)  # fmt: skip
POLICIES = (
    "on-demand,lru,prefetch+router-nodefault+lru,speculative+router-nodefault,oracle,resident"
)
PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11]
# tests' names -> the claim each holds (a substring of the test's name)
CLAIMS = {
    "pinned_store": "test_experts_loaded_straight_into_pinned_host_memory",
    "sync_count": "test_default_path_syncs_once_per_layer_and_once_per_token",
    "copy_fault": "test_cuda_copy_fault_surfaces_at_a_named_sync",
    "delayed_copies": "test_delayed_copies_still_give_resident_tokens",
    "cuda_graphs": "test_cuda_graphs_replay_the_compiled_step",
    "event_pool": "pool",
}
CHECKS = (
    "tests",
    "gather",
    "record",
    "recompiles",
    "h2d",
    "bench",
    "quant",
    "decode",
    "simulate",
)  # in this order
DEADLINE = [float("inf")]  # perf_counter() at --budget-s: subprocesses are cut there (+30 s)
MAX_GRAPHS = 8  # the offloaded step at any L; 5 on the CPU: forward before and after the layers,
# a layer's piece before its route hook (layer 0, then i symbolic) and after its experts


def tiny_model(device: str, **overrides) -> MoETransformer:
    """A random model in memory (routing far from uniform: std 0.2), in fp32 on `device`."""
    fields = dict(model_type="qwen3_moe", vocab_size=96, hidden_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, num_experts=16, top_k=4,
                  expert_dim=16, qk_norm="head", eos_token_ids=())  # fmt: skip
    fields.update(overrides)
    return MoETransformer(ModelConfig(**fields)).init_weights(seed=0, std=0.2).to(device)


# ---------------------------------------------------------------- the compiled step


def gathers(codes: list[str], numel: int) -> list[str]:
    """What in inductor's output code copies expert weights gathered by index: a buffer of at
    least `numel` elements (every static buffer of a tinymoe decode step is far smaller; the KV
    cache's length is symbolic), a batched-matmul library call (its operand comes gathered),
    or a Triton kernel over that many elements (a gather of its own)."""
    found = []
    for code in codes:
        for name, shape in re.findall(r"(\w+) = empty_strided_\w+\(\(([^)]*)\)", code):
            dims = [d.strip() for d in shape.split(",") if d.strip()]
            if all(d.isdigit() for d in dims) and math.prod(map(int, dims)) >= numel:
                found.append(f"buffer {name} ({shape})")
        found += [f"call {c}" for c in re.findall(r"extern_kernels\.\w*bmm|aten\.bmm", code)]
        big = [n for n in re.findall(r"xnumel = (\d+)$", code, re.M) if int(n) >= numel]
        found += [f"kernel over {n}" for n in big]
    return found


def check_gather(device: str) -> dict:
    from torch._inductor.utils import run_and_get_code

    model = tiny_model(device, hidden_size=64, expert_dim=64, head_dim=16)
    cfg = model.cfg
    E, K, I, D = cfg.num_experts, cfg.top_k, cfg.expert_dim, cfg.hidden_size
    numel = K * I * D  # a copy of K experts' down (or half their gate_up) matrices
    _, codes = run_and_get_code(lambda: generate(model, PROMPT, 3, eos_ids=(), compile=True))
    found = gathers(codes, numel)
    # The control copies W[ids] for a batched matmul (no inductor pass turns a bmm with two
    # columns into loads): it must be flagged, or this check could not fail.
    W = model.experts.weights[0].detach()[:, : 2 * I * D].view(E, 2 * I, D)
    ids = torch.arange(K, device=device).view(1, K)
    u = torch.ones(1, D, device=device)
    control = torch.compile(lambda u, ids: torch.bmm(W[ids[0]], u.view(1, D, 1).expand(K, D, 2)))
    with torch.no_grad():
        _, control_codes = run_and_get_code(control, u, ids)
    flagged = gathers(control_codes, numel)
    ok = bool(codes) and not found and bool(flagged)
    return {"pass": ok, "gathers": found, "control_flagged": flagged, "threshold": numel}


def check_record(device: str) -> dict:
    """CUDA-graph trees warm a graph up, then record it, each in a call of its own: both must
    fall in the decode steps generate keeps out of step_s. On the CPU (dry run) graphs are
    forced on: inductor then skips them (nothing to record), and the bookkeeping is checked."""
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager as Trees

    model, n = tiny_model(device), 8
    want = generate(model, PROMPT, n, eos_ids=()).tokens
    seen: list[int] = []  # tokens of the current generation: decode step k runs with k seen
    events: list[tuple[str, int]] = []

    def logged(kind: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            events.append((kind, len(seen)))
            return fn(*args, **kwargs)

        return wrapper

    forced = mock.patch.object(generate_module, "cuda_graphs_apply", lambda m: True)
    runs, per_run = [], []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with (
        mock.patch.object(Trees, "record_function", logged("record", Trees.record_function)),
        mock.patch.object(Trees, "run_eager", logged("warmup", Trees.run_eager)),
        forced if device == "cpu" else contextlib.nullcontext(),
    ):
        for _ in range(2):  # the second generation: a new KV cache, the graph recorded again
            seen.clear()
            events.clear()
            runs.append(generate(model, PROMPT, n, eos_ids=(), compile=True, on_token=seen.append))
            per_run.append(list(events))
    skipped = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    booked = all(
        r.compile_s is not None and r.record_s is not None and len(r.step_s) == n - 3 for r in runs
    )
    in_warmup = all(step in (1, 2) for evs in per_run for _, step in evs)
    recorded = any(kind == "record" for kind, _ in per_run[0])
    cuda_ok = recorded and skipped == 0 if device == "cuda" else True
    same = all(r.tokens == want for r in runs)
    return {"pass": booked and in_warmup and cuda_ok and same, "events": per_run,
            "step_s_len": [len(r.step_s) for r in runs], "cudagraph_skips": skipped,
            "same_tokens": same}  # fmt: skip


def check_recompiles(device: str, layers: int = 48) -> dict:
    """The offloaded step, cut around every layer's host calls, compiled at `layers` layers."""
    model = tiny_model(device, num_layers=layers, num_experts=128, top_k=8, hidden_size=16,
                       expert_dim=8, num_heads=2, num_kv_heads=1)  # fmt: skip
    want = generate(model, PROMPT, 4, eos_ids=()).tokens
    link = None if device == "cuda" else LinkSpec(1000.0, 0.0)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    with (
        torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),  # no silent eager
        OffloadRuntime(model, "lru", slots=64, link=link) as rt,
    ):
        got = generate(model, PROMPT, 4, eos_ids=(), compile=True).tokens
        graphs = counters["stats"]["unique_graphs"]
        generate(model, PROMPT[:7], 4, eos_ids=(), compile=True)  # a new cache and prompt
        again = counters["stats"]["unique_graphs"] - graphs
        copied = rt.report()["decode"]["bytes_copied"]
    counters.clear()  # a resident step compiled next is still one graph, without a break
    generate(tiny_model(device, num_layers=1), PROMPT, 3, eos_ids=(), compile=True)
    resident = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    ok = got == want and 0 < graphs <= MAX_GRAPHS and again == 0 and resident == (1, 0)
    return {"pass": ok and copied > 0, "layers": layers, "graphs": graphs,
            "graphs_second_generation": again, "resident_graphs_and_breaks": resident,
            "same_tokens": got == want}  # fmt: skip


def time_left(cap_s: float) -> float:
    return max(30.0, min(cap_s, DEADLINE[0] + 30 - time.perf_counter()))


def run_tests(out: Path, dry: bool) -> dict:
    tests = ROOT / "tests"
    where = [tests / "test_offload_cuda.py", tests / "test_decode_path.py"] if dry else [tests]
    xml = out / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", f"--junitxml={xml}", *where]
    p = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True,
                       timeout=time_left(300))  # fmt: skip
    (out / "pytest.txt").write_text(p.stdout + p.stderr)
    cases = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        cases[case.get("name")] = outcome
    claims = {}
    for claim, part in CLAIMS.items():
        outcomes = [o for name, o in cases.items() if part in name and o != "skipped"]
        claims[claim] = all(o == "passed" for o in outcomes) if outcomes else None
    last = (p.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"pass": p.returncode == 0, "result": last, "cases": cases, "claims": claims}


def h2d_bandwidth(expert_bytes: int) -> dict:
    """GB/s (1e9 B/s) of pinned host-to-device copies: one 1 GiB copy, and 64 expert-sized
    copies issued back to back on a side stream, each timed by events (best of three)."""
    side, n = torch.cuda.Stream(), 64
    big = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    src = torch.empty(n, expert_bytes, dtype=torch.uint8, pin_memory=True)
    big_dst, dst = big.to("cuda"), src.to("cuda")

    def best_s(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            side.wait_stream(torch.cuda.current_stream())
            start.record(side)
            with torch.cuda.stream(side):
                for d, s in copies:
                    d.copy_(s, non_blocking=True)
            end.record(side)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)

    one = 2**30 / best_s([(big_dst, big)]) / 1e9
    per_expert = n * expert_bytes / best_s(list(zip(dst, src, strict=True))) / 1e9
    return {"pass": one > 1 and per_expert > 1,  # plainly broken below 1 GB/s
            "one_1GiB_copy_gbps": one, "expert_copies_gbps": per_expert}  # fmt: skip


@torch.no_grad()
def make_checkpoint(path: Path, layers: int, fields: dict, device: str) -> None:
    """A random checkpoint of these shapes (bf16 on CUDA), initialised on `device` (fast)."""
    cfg = ModelConfig(num_layers=layers, **fields)
    with torch.device(device):
        model = MoETransformer(cfg)
    for name, p in model.named_parameters():
        p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    save_model(model, path, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))


def run_tool(
    module: str, args: list[str], out: Path, device: str, name: str = ""
) -> tuple[dict, dict | None]:
    """`python -m tinymoe.<module> ... --json` on the checkpoint's device, its stderr in
    out/<name>.txt and its JSON in out/<name>.json (name: the module's by default): (failure or
    {}, the JSON or None)."""
    name = name or module
    dtype, repeat = ("bfloat16", "3") if device == "cuda" else ("float32", "1")
    cmd = [
        sys.executable, "-m", f"tinymoe.{module}", *args, "--device", device, "--dtype", dtype,
        "--policies", POLICIES, "--prompt-tokens", "64", "--repeat", repeat, "--json",
    ]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=time_left(420))
    (out / f"{name}.txt").write_text(p.stderr)
    if p.returncode != 0:
        failed = {"pass": False, "returncode": p.returncode, "error": p.stderr.splitlines()[-1:]}
        return failed, None
    (out / f"{name}.json").write_text(p.stdout)
    return {}, json.loads(p.stdout)


def run_bench(model_dir: Path, out: Path, new_tokens: int, device: str, quant: str = "") -> dict:
    """The bench's rows; quant: "int4" runs them with quantized experts (out/quant.*)."""
    args = ["--model", str(model_dir), "--max-new-tokens", str(new_tokens)]
    args += ["--expert-quant", quant] if quant else []
    failed, result = run_tool("bench", args, out, device, "quant" if quant else "bench")
    if result is None:
        return failed
    keys = ("tpot_ms", "ratio_vs_on_demand", "hit_rate", "stall_share", "achieved_gbps", "exact")
    rows = {r["policy"]: {k: r.get(k) for k in keys} for r in result["rows"]}
    exact = all(r["exact"] for name, r in rows.items() if not name.startswith("speculative"))
    return {"pass": exact, "rows": rows}


def run_simulate(model_dir: Path, out: Path, new_tokens: int, device: str) -> dict:
    """The simulator on this device: record (over the real link on CUDA), replay every policy,
    and the real runs beside it; each policy's simulated and measured TPOT, and their ratio
    (the median of the rounds' own ratios: simulator/validate.py)."""
    args = ["--model", str(model_dir), "--validate", "--max-new-tokens", str(new_tokens)]
    failed, result = run_tool("simulate", args, out, device)
    if result is None:
        return failed
    rows = {r["policy"]: {"simulated_tpot_ms": r["simulated_tpot_ms"],
                          "measured_tpot_ms": r.get("measured_tpot_ms"),
                          "sim_over_measured": r.get("ratio")}
            for r in result["rows"] if r["miss_handler"] == "copy"}  # fmt: skip
    worst = max((abs(r["sim_over_measured"] - 1) for r in rows.values()
                 if r["sim_over_measured"]), default=None)  # fmt: skip
    # Pass: it ran and compared every policy; the error is reported (the acceptance is 10%).
    return {"pass": all(r["measured_tpot_ms"] for r in rows.values()), "rows": rows,
            "worst_error": worst, "link_gbps": result["link_gbps"]}  # fmt: skip


def decode_speed(model_dir: Path, new_tokens: int, device: str) -> dict:
    """Resident decode, eager against compiled (with CUDA graphs on CUDA), alternating, two
    runs each (the first compiled run compiles and records; the second is the steady state)."""
    model = load_model(model_dir, device=device, dtype="bfloat16" if device == "cuda" else "auto")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    runs: dict[str, list] = {"eager": [], "compiled": []}
    for _ in range(2):
        for name in runs:
            runs[name].append(
                generate(model, PROMPT, new_tokens, eos_ids=(), compile=name != "eager")
            )
    median = {n: 1e3 * sorted(r[-1].step_s)[len(r[-1].step_s) // 2] for n, r in runs.items()}
    same = runs["compiled"][-1].tokens == runs["eager"][-1].tokens
    skips, breaks = counters["inductor"]["cudagraph_skips"], sum(counters["graph_break"].values())
    return {"pass": same and breaks == 0 and (skips == 0 or device != "cuda"),
            "tpot_p50_ms": median, "compiled_over_eager": median["compiled"] / median["eager"],
            "compile_s": runs["compiled"][0].compile_s, "record_s": runs["compiled"][0].record_s,
            "same_tokens": same, "cudagraph_skips": skips, "graph_breaks": breaks}  # fmt: skip


def run_checks(checks: dict[str, Callable[[], dict]], out: Path, summary: dict, budget_s: float):
    """Run each check, catching what it raises; write summary.json after each. A result's
    "claims" ({name: pass}) become lines of their own."""
    t_start = time.perf_counter()
    DEADLINE[0] = t_start + budget_s
    lines = summary.setdefault("checks", {})
    for name, check in checks.items():
        t0 = time.perf_counter()
        if t0 - t_start > budget_s:
            result = {"pass": None, "skipped": f"started after --budget-s {budget_s:.0f} s"}
        else:
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                result = check()
            except Exception as e:  # one check's failure must not stop the others
                tail = traceback.format_exc().strip().splitlines()[-6:]
                result = {"pass": False, "error": f"{type(e).__name__}: {e}"[:500], "tb": tail}
            result["seconds"] = round(time.perf_counter() - t0, 1)
        lines[name] = result
        for claim, ok in result.pop("claims", {}).items():
            lines[claim] = {"pass": ok, "from": name}
        summary["all_pass"] = all(c["pass"] is not False for c in lines.values())
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        marks = {True: "PASS", False: "FAIL", None: "SKIP"}
        print(f"{marks[result['pass']]} {name} ({result.get('seconds', 0)} s)", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check", help="directory for the result files")
    p.add_argument("--layers", type=int, default=4, help="layers of the Qwen3-shaped checkpoint")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated checks not to run")
    p.add_argument("--budget-s", type=float, default=480, help="start no check after this")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes (see top)")
    args = p.parse_args(argv)
    only, skip = ([n for n in a.split(",") if n] for a in (args.only, args.skip))
    unknown = [n for n in only + skip if n not in CHECKS]
    if unknown:
        print(f"error: unknown check {unknown[0]!r}; one of {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; this script checks the GPU path (--dry-run: the CPU)",
              file=sys.stderr)  # fmt: skip
        return 2
    dev, dry = ("cpu", True) if args.dry_run else ("cuda", False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(tmp.name)
    shapes = TINY_QWEN3 if dry else QWEN3_30B_A3B
    new_tokens = 4 if dry else args.new_tokens
    made: list[Path] = []

    def checkpoint() -> Path:
        if not made:  # once, for bench and decode
            make_checkpoint(model_dir, 2 if dry else args.layers, shapes, dev)
            made.append(model_dir)
        return model_dir

    expert_bytes = ModelConfig(num_layers=1, **QWEN3_30B_A3B).expert_bytes(torch.bfloat16)
    checks = {  # (in CHECKS' order)
        "tests": lambda: run_tests(out, dry),
        "gather": lambda: check_gather(dev),
        "record": lambda: check_record(dev),
        "recompiles": lambda: check_recompiles(dev),
        "h2d": (lambda: {"pass": None, "skipped": "needs CUDA"}) if dry
        else (lambda: h2d_bandwidth(expert_bytes)),
        "bench": lambda: run_bench(checkpoint(), out, new_tokens, dev),
        "quant": lambda: run_bench(checkpoint(), out, new_tokens, dev, quant="int4"),
        "decode": lambda: decode_speed(checkpoint(), new_tokens, dev),
        "simulate": lambda: run_simulate(checkpoint(), out, new_tokens, dev),
    }  # fmt: skip
    checks = {n: c for n, c in checks.items() if (not only or n in only) and n not in skip}
    device = torch.cuda.get_device_name() if not dry else "cpu (dry run)"
    summary = {"device": device, "torch": torch.__version__, "dry_run": dry}
    try:
        run_checks(checks, out, summary, args.budget_s)
    finally:
        tmp.cleanup()
    print(json.dumps(summary["checks"], indent=2, default=str))
    return 0 if summary["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
