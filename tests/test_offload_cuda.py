"""The CUDA back end: pinned store, copy stream, events. Runs only where a GPU is present."""

import pytest
import torch

from tinymoe import TinyMoeError, generate, load_model
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.speculation.oracle import OraclePredictor, record_routing

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import make_checkpoint

    return load_model(make_checkpoint(tmp_path_factory.mktemp("cuda") / "baby"), device="cuda")


@pytest.mark.parametrize("timed", [True, False])
@pytest.mark.parametrize("policy,slots", [("on-demand", None), ("lru", 3), ("oracle", None)])
def test_cuda_offload_generates_resident_tokens(model, policy, slots, timed):
    want, recording = record_routing(model, PROMPT, 8, eos_ids=())
    predictor = OraclePredictor(recording) if policy == "oracle" else None
    with OffloadRuntime(model, policy, predictor=predictor, slots=slots, timed=timed) as rt:
        assert rt.store.layers[0].is_pinned() and rt.store.layers[0].device.type == "cpu"
        assert rt.cache.slots.device.type == "cuda"
        assert rt.engine.stream != torch.cuda.current_stream()  # copies on their own stream
        got = generate(model, PROMPT, 8, eos_ids=())
        report = rt.report()
    assert got.tokens == want.tokens
    assert report["decode"]["bytes_copied"] > 0
    if timed:
        assert report["decode"]["copy_ms"] > 0
    assert model.experts.weights[0].device.type == "cuda"  # given back


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
