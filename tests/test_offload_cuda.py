"""The CUDA back end: pinned store, copy stream, events. Runs only where a GPU is present.

The copies are delayed on the copy stream (`torch.cuda._sleep` in the before-copy hook), so a
missing or misplaced stream wait computes with a slot whose bytes have not arrived yet and the
tokens differ from resident's. Every scheduling mode is covered: on-demand, a cache that streams,
the oracle (crossing tokens), exact prefetch with a real predictor (throttled and not) and
speculative execution. The sync test counts the host syncs of each decode step of the default
path; the fault test makes a copy fail while it runs and finds where the error surfaces.
"""

import json
import subprocess
import sys
import warnings

import pytest
import torch

from tinymoe import TinyMoeError, generate, load_model
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.speculation.oracle import OraclePredictor, record_routing
from tinymoe.speculation.predictors import RouterPredictor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]
DELAY_CYCLES = 2_000_000  # ~1 ms of GPU clock per copy: far longer than a baby layer computes


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import make_checkpoint

    return load_model(make_checkpoint(tmp_path_factory.mktemp("cuda") / "baby"), device="cuda")


def delay_copies(rt: OffloadRuntime) -> None:
    rt.engine.before_copy = lambda t: torch.cuda._sleep(DELAY_CYCLES)


def predictor_for(policy: str, model, recording):
    if "oracle" in policy:
        return OraclePredictor(recording)
    if "router" in policy:
        return RouterPredictor(model, None, 1)
    return None


@pytest.mark.parametrize(
    "policy,slots,depth",
    [
        ("on-demand", None, 1),
        ("lru", 3, 1),  # fewer slots than a prompt layer needs: streaming
        ("lru", 24, 1),
        ("oracle", None, 1),
        ("prefetch+router", None, 1),
        ("prefetch+router+lru", 6, 1),  # throttled
        ("prefetch+router+lru", 6, None),  # every guess on the link
    ],
)
def test_delayed_copies_still_give_resident_tokens(model, policy, slots, depth):
    want, recording = record_routing(model, PROMPT, 8, eos_ids=())
    predictor = predictor_for(policy, model, recording)
    with OffloadRuntime(
        model, policy, predictor=predictor, slots=slots, prefetch_depth=depth
    ) as rt:
        assert rt.store.layers[0].is_pinned() and rt.store.layers[0].device.type == "cpu"
        assert rt.cache.slots.device.type == "cuda"
        assert rt.engine.stream != torch.cuda.current_stream()  # copies on their own stream
        delay_copies(rt)
        got = generate(model, PROMPT, 8, eos_ids=())
        report = rt.report()
    assert got.tokens == want.tokens
    dec = report["decode"]
    assert dec["bytes_copied"] > 0 and dec["copy_ms"] > 0  # timed by events, read afterwards
    assert dec["stall_ms"] > 0  # the delayed copies really were waited for
    assert model.experts.weights[0].device.type == "cuda"  # given back


def test_speculative_oracle_with_delayed_copies_equals_exact(model):
    want, recording = record_routing(model, PROMPT, 8, eos_ids=())
    with OffloadRuntime(model, "speculative+oracle", predictor=OraclePredictor(recording)) as rt:
        delay_copies(rt)
        got = generate(model, PROMPT, 8, eos_ids=())
    assert got.tokens == want.tokens


def test_default_path_syncs_once_per_layer_and_once_per_token(model):
    """The host reads each layer's expert ids (with the prediction, in one read) and the sampled
    token; nothing else on the decode path may synchronise. CUDA's sync debug mode warns on
    every synchronising call: each decode step's warnings are counted, L + 1 exactly."""
    L, n = model.cfg.num_layers, 6
    caught: list = []
    marks: list[int] = []  # len(caught) after each token

    def mark(tok: int) -> None:
        marks.append(len(caught))
        if len(marks) == 1:  # prefill done: count the decode steps only
            torch.cuda.set_sync_debug_mode("warn")

    with OffloadRuntime(model, "prefetch+router+lru", predictor=RouterPredictor(model, None, 1)):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                generate(model, PROMPT, n, eos_ids=(), on_token=mark)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = ["synchroniz" in str(w.message).lower() for w in caught]
    per_step = [sum(syncs[a:b]) for a, b in zip(marks, marks[1:], strict=False)]
    assert per_step == [L + 1] * (n - 1), [str(w.message)[:80] for w in caught[marks[0] :][:9]]


def test_runtime_built_inside_inference_mode_generates(model):
    want = generate(model, PROMPT, 6, eos_ids=()).tokens
    with torch.inference_mode(), OffloadRuntime(model, "lru", slots=3):
        got = generate(model, PROMPT, 6, eos_ids=()).tokens
    assert got == want


def test_cuda_failed_copy_raises_where_used(model):
    rt = OffloadRuntime(model, "on-demand")
    calls = {"n": 0}

    def fail_third(t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected CUDA copy failure")

    rt.engine.before_copy = fail_third
    try:
        with pytest.raises(TinyMoeError, match="injected CUDA copy failure"):
            generate(model, PROMPT, 4, eos_ids=())
    finally:
        rt.close()
    assert generate(model, PROMPT, 2, eos_ids=()).tokens  # usable again


FAULT_CHILD = """
import json, linecache, os, sys, traceback
import torch
from tinymoe import generate, load_model
from tinymoe.offload.runtime import OffloadRuntime

model = load_model(sys.argv[1], device="cuda")
probe, bad = torch.zeros(4, device="cuda"), torch.tensor([10**6], device="cuda")
decoding, faulted = [], []

def fault(t):  # called on the copy stream (CudaCopyEngine.copy), before the copy is queued
    if decoding and not faulted:
        faulted.append(str(t.tag))
        torch.cuda._sleep(400_000_000)  # ~0.2 s: the host has long moved on when it faults
        probe[bad]  # an index out of bounds: a device-side assert, on the copy stream

def where(e):  # the innermost tinymoe line of the CUDA error's traceback, and the one above
    tb = traceback.extract_tb(e.__traceback__) if e is not None else []
    f = ([f for f in tb if "tinymoe" in f.filename] or [None])[-1]
    return [linecache.getline(f.filename, n) for n in (f.lineno - 1, f.lineno)] if f else []

rt = OffloadRuntime(model, "on-demand")
rt.engine.before_copy = fault
out = {"raised": None}
try:
    generate(model, [5, 17, 3, 42, 8], 4, eos_ids=(), on_token=decoding.append)
except Exception as e:
    out = {"raised": type(e).__name__, "message": str(e), "line": where(e.__cause__)}
print(json.dumps({**out, "faulted": faulted}), flush=True)
os._exit(0)  # the CUDA context is lost: no teardown
"""


def test_cuda_copy_fault_surfaces_at_a_named_sync(tmp_path):
    """A copy that faults while it runs on the copy stream (a device-side assert queued before
    it, long after the host issued it) cannot be raised by compute_wait, which only queues a
    wait: it surfaces at the next host sync, a line marked # SYNC:, and generate names the step
    and the call in a TinyMoeError. In a child process: a CUDA error loses the context."""
    from conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "m")
    p = subprocess.run(
        [sys.executable, "-c", FAULT_CHILD, str(path)], capture_output=True, text=True, timeout=300
    )
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["raised"] == "TinyMoeError", (out, p.stderr[-2000:])
    assert "decode step 1" in out["message"] and "CUDA error" in out["message"]
    assert any("# SYNC" in line for line in out["line"]), out  # where CUDA reported it


def test_cuda_link_flags_are_refused(model):
    from tinymoe.offload.link import PRESETS

    with pytest.raises(TinyMoeError, match="simulate a link"):
        OffloadRuntime(model, "on-demand", link=PRESETS["pcie4-x16"])


def test_experts_loaded_straight_into_pinned_host_memory(model, tmp_path):
    """run.py's offloading path on a GPU: the experts never touch the device until copied."""
    from conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "m")
    want = generate(load_model(path, device="cuda"), PROMPT, 8, eos_ids=()).tokens
    host = load_model(path, device="cuda", expert_device="cpu")
    assert host.experts.weights[0].is_pinned() and host.embed_tokens.weight.is_cuda
    pinned = [w.data_ptr() for w in host.experts.weights]
    before = torch.cuda.memory_allocated()
    with OffloadRuntime(host, "lru", slots=3) as rt:
        assert [t.data_ptr() for t in rt.store.layers] == pinned  # adopted, no second copy
        got = generate(host, PROMPT, 8, eos_ids=()).tokens
    assert got == want
    assert host.experts.weights[0].device.type == "cpu"  # given back to the host, not the GPU
    assert torch.cuda.memory_allocated() <= before + 2**20


@pytest.mark.parametrize("policy,slots", [("on-demand", None), ("lru", 3)])
def test_cpu_miss_handler_on_cuda_gives_resident_tokens(model, policy, slots):
    """Misses computed on the host from the pinned store, the rest on the GPU: exact."""
    want = generate(model, PROMPT, 8, eos_ids=()).tokens
    with OffloadRuntime(model, policy, slots=slots, miss_handler="cpu") as rt:
        got = generate(model, PROMPT, 8, eos_ids=())
        report = rt.report()
    assert got.tokens == want
    assert report["decode"]["host_computed"] > 0


def test_event_pool_makes_no_events_in_a_warm_decode(model, monkeypatch):
    """Warm, every expert in a slot: a decode step makes no CUDA event. The meter's stamps come
    from its pool and each slot has one "done reading" event, recorded again at every release."""
    made = []

    class Counted(torch.cuda.Event):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    all_experts = model.cfg.num_layers * model.cfg.num_experts
    with OffloadRuntime(model, "lru", slots=all_experts) as rt:
        generate(model, PROMPT, 8, eos_ids=())  # loads what the next run uses; fills the pool
        rt.report()
        rt.reset_stats()
        monkeypatch.setattr(torch.cuda, "Event", Counted)
        generate(model, PROMPT, 8, eos_ids=())
        decode = rt.report()["decode"]
    assert decode["misses"] == 0 and decode["steps"] == 7
    assert len(made) == 0
