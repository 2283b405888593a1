"""The CUDA path, checked as far as a CPU can: what tests/gpu_check.py checks on a GPU, here on
inductor's CPU code and with the CUDA-only parts made visible.

- The compiled step reads the routed experts in place: inductor's output code holds no gathered
  copy of them (experts_by_index), and the check that says so flags a copy when there is one.
- The decode steps that compile, and with CUDA graphs record the graph, are kept out of TPOT.
- A CUDA error during generation is raised as a TinyMoeError naming the step and the call.
- The compiled offloaded step at 48 layers compiles a bounded number of graphs.
- gpu_check.py itself: its flags, its harness, and a dry run of every check on the CPU.
"""

import json
import subprocess
import sys
from pathlib import Path

import gpu_check
import pytest
import torch

from tinymoe import TinyMoeError
from tinymoe.engine import generate as generate_module
from tinymoe.engine.generate import generate, warmup_steps
from tinymoe.engine.model import MoETransformer

SCRIPT = Path(gpu_check.__file__)
PROMPT = gpu_check.PROMPT


def test_gathers_flags_a_copy_of_experts_and_nothing_smaller():
    code = "\n".join(
        [
            "buf0 = empty_strided_cpu((4, 128, 64), (8192, 64, 1), torch.float32)",  # K*2I*D
            "buf1 = empty_strided_cuda((1, 2, s5, 16), (32, 16, 32, 1), torch.float32)",
            "buf2 = empty_strided_cuda((4, 64), (64, 1), torch.float32)",
            "extern_kernels.bmm(buf0, buf3, out=buf4)",
            "xnumel = 256",
        ]
    )
    assert gpu_check.gathers([code], 4 * 64 * 64) == [
        "buffer buf0 (4, 128, 64)",
        "call extern_kernels.bmm",
    ]
    assert gpu_check.gathers(["def triton_poi(xnumel = 16384)\n    xnumel = 16384"], 16384)
    assert gpu_check.gathers([code.replace("(4, 128, 64)", "(4, 128)")], 4 * 64 * 64) == [
        "call extern_kernels.bmm"
    ]


def test_the_compiled_step_reads_the_experts_in_place():
    """Inductor's code for the compiled resident step (experts_by_index inside) allocates no
    buffer as large as K experts' matrices and calls no batched matmul; a control that does
    copy W[ids] is flagged. gpu_check runs the same on CUDA, where it matters most: inductor
    only fuses an einsum's gather there under coordinate_descent_tuning."""
    result = gpu_check.check_gather("cpu")
    assert result["pass"], result
    assert "buffer" in " ".join(result["control_flagged"])


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("graphs", [True, False])
def test_steps_that_compile_or_record_are_kept_out_of_tpot(graphs, monkeypatch):
    """generate(compile=True) with a compiled step that takes a known time per call (a fake
    clock) and runs the eager forward: the first step is compile_s, with CUDA graphs the second
    is record_s, and step_s holds exactly the rest, in order; the model is marked compiling
    (a runtime meters those passes apart) in those steps only."""
    model = gpu_check.tiny_model("cpu")
    want = generate(model, PROMPT, 7, eos_ids=())
    clock, seconds = FakeClock(), [100.0, 50.0, 1.0, 2.0, 3.0, 4.0]
    marked: list[bool] = []

    def compiled_forward(model, cuda_graphs):
        assert cuda_graphs == graphs

        def step(input_ids, cache, start):
            marked.append(model.compiling)
            clock.t += seconds[len(marked) - 1]
            return MoETransformer.forward(model, input_ids, cache, start)

        return step

    monkeypatch.setattr(generate_module, "now", clock)
    monkeypatch.setattr(generate_module, "compiled_forward", compiled_forward)
    monkeypatch.setattr(generate_module, "cuda_graphs_apply", lambda m: graphs)
    got = generate(model, PROMPT, 7, eos_ids=(), compile=True)
    assert got.tokens == want.tokens and want.compile_s is None and want.record_s is None
    n = warmup_steps(True, graphs)
    assert got.compile_s == 100.0 and got.record_s == (50.0 if graphs else None)
    assert got.step_s == seconds[n:] and marked == [True] * n + [False] * (6 - n)
    assert got.tokens_per_s == (1 + len(got.step_s)) / sum(seconds[n:])  # (prefill took 0)
    assert not model.compiling and warmup_steps(False, True) == 0


def test_a_cuda_error_is_named_by_its_step_and_call():
    """An error CUDA reports (raised here on the CPU, where a CUDA sync would raise it) becomes
    a TinyMoeError naming the step and the innermost tinymoe call; other errors pass as they
    are, and the model generates again afterwards."""
    model = gpu_check.tiny_model("cpu")

    def raise_on(call: int, layer: int, error: Exception) -> None:
        calls = []

        def hook(module, args, output):  # after layer `layer`'s attention, in its `call`th pass
            calls.append(1)
            if len(calls) == call:
                raise error

        handle = model.layers[layer].self_attn.register_forward_hook(hook)
        try:
            generate(model, PROMPT, 6, eos_ids=())
        finally:
            handle.remove()

    error_type = getattr(torch, "AcceleratorError", RuntimeError)  # (torch >= 2.8)
    cuda = error_type("CUDA error: an illegal memory access was encountered\nmore")
    with pytest.raises(TinyMoeError, match="during decode step 2, at tinymoe/engine/model.py:"):
        raise_on(3, 1, cuda)  # pass 1 is the prefill
    with pytest.raises(TinyMoeError, match="during the prefill, at .*[(]_layer[)]: CUDA err") as e:
        raise_on(1, 0, cuda)
    assert e.value.__cause__ is cuda and "\n" not in str(e.value)
    assert "an illegal memory access was encountered. It may" in str(e.value)
    assert "CUDA_LAUNCH_BLOCKING=1" in str(e.value)
    with pytest.raises(ValueError, match="^plain$"):
        raise_on(2, 0, ValueError("plain"))
    assert generate(model, PROMPT, 4, eos_ids=()).tokens == generate(model, PROMPT, 4).tokens


@pytest.mark.slow
def test_the_compiled_offloaded_step_compiles_a_bounded_number_of_graphs_at_48_layers():
    """48 layers x 128 experts, top-8, lru: each layer's step is cut around the route hook and
    the provider. At most MAX_GRAPHS graphs (not one per layer), none again for a second
    generation, dynamo's recompile limit never reached (made an error), the eager tokens; and
    a resident step compiled afterwards is still one graph (the eager layer loop of the
    offloaded step did not spread to forward)."""
    result = gpu_check.check_recompiles("cpu", layers=48)
    assert result["pass"], result


def test_gpu_check_parses_its_flags(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--dry-run" in p.stdout and "--budget-s" in p.stdout
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "gatherr"]) == 2
    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path)]) == 2  # the GPU path needs a GPU


def test_gpu_check_runs_every_check_whatever_one_does(tmp_path):
    """A check that raises is a FAIL line and the next ones still run; claims become lines;
    checks past the time budget are skipped lines; summary.json holds every line."""
    ran: list[str] = []

    def ok(name: str, **extra):
        def check() -> dict:
            ran.append(name)
            return {"pass": True, **extra}

        return check

    def boom() -> dict:
        ran.append("boom")
        raise RuntimeError("CUDA error: out of memory")

    checks = {"a": ok("a", claims={"claim": False}), "boom": boom, "c": ok("c")}
    summary = gpu_check.run_checks(checks, tmp_path, {}, budget_s=1e9)
    lines = json.loads((tmp_path / "summary.json").read_text())["checks"]
    assert ran == ["a", "boom", "c"] and lines == summary["checks"]
    assert [lines[n]["pass"] for n in ("a", "claim", "boom", "c")] == [True, False, False, True]
    assert "out of memory" in lines["boom"]["error"] and summary["all_pass"] is False
    summary = gpu_check.run_checks({"a": ok("a"), "c": ok("c")}, tmp_path, {}, budget_s=-1)
    assert [c["pass"] for c in summary["checks"].values()] == [None, None]
    assert summary["all_pass"] is True and ran == ["a", "boom", "c"]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    """Every check's plumbing on the CPU with tiny sizes (the 48-layer one has its own test)."""
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--skip", "recompiles"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    lines = summary["checks"]
    assert p.returncode == 0, (p.stderr[-3000:], lines)
    assert {"tests", "gather", "record", "h2d", "bench", "quant", "decode"} <= set(lines)
    assert lines["quant"]["pass"] is True and (tmp_path / "quant.json").exists()
    assert set(gpu_check.CLAIMS) <= set(lines)  # each claim a line (skipped without CUDA)
    assert lines["h2d"]["pass"] is None and lines["gather"]["pass"] is True
    assert lines["tests"]["cases"] and set(lines["tests"]["cases"].values()) == {"skipped"}
    assert (tmp_path / "pytest.txt").exists() and (tmp_path / "bench.json").exists()
