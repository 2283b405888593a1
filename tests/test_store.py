"""The host expert store: one exactly-pinned buffer, all-or-nothing take_from, pinning's lifetime.

On the CPU, page-locking is replaced by a recorder (`fake_lock`), so what is locked, how much,
and when it is unlocked are checked without a GPU. The CUDA tests at the end measure the real
thing and skip without one.
"""

import gc
import mmap

import pytest
import torch
from conftest import make_checkpoint

import tinymoe.offload.store as store_module
from tinymoe import TinyMoeError, generate, load_model
from tinymoe.offload.store import HostExpertStore, host_buffer

PROMPT = [5, 17, 3, 42, 8, 61]


@pytest.fixture
def fake_lock(monkeypatch):
    """Record page-locking instead of doing it: a list of ("lock" | "unlock", ptr, nbytes)."""
    calls: list[tuple[str, int, int]] = []
    sizes: dict[int, int] = {}

    def lock(ptr: int, nbytes: int) -> int:
        calls.append(("lock", ptr, nbytes))
        sizes[ptr] = nbytes
        return 0

    def unlock(ptr: int, device: int) -> None:
        calls.append(("unlock", ptr, sizes.pop(ptr)))

    monkeypatch.setattr(store_module, "_lock", lock)
    monkeypatch.setattr(store_module, "_unlock", unlock)
    yield calls
    gc.collect()  # buffers left by a test are unlocked while the recorder is still installed


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("store") / "baby")


def expert_bytes(model) -> int:
    cfg = model.cfg
    return cfg.num_layers * cfg.num_experts * cfg.expert_numel * model.embed_tokens.weight.itemsize


# ---- host_buffer


def fail_copies_from_layer_1(model, monkeypatch):
    """Every copy whose source is layer 1's experts raises, as a failed pin or copy would;
    returns the real Tensor.copy_, to put back."""
    layer1 = model.experts.weights[1].data_ptr()
    copy = torch.Tensor.copy_

    def failing_copy(dst, src, *args, **kwargs):
        if src.data_ptr() == layer1:
            raise RuntimeError("injected copy failure at layer 1")
        return copy(dst, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", failing_copy)
    return copy


def test_host_buffer_locks_one_exact_page_aligned_range(fake_lock):
    buf = host_buffer((3, 8, 1536), torch.bfloat16, pin=True)
    nbytes = 3 * 8 * 1536 * 2  # 73,728: a power-of-two allocator would lock 131,072
    assert fake_lock == [("lock", buf.data_ptr(), nbytes)]
    assert buf.data_ptr() % mmap.PAGESIZE == 0  # the pages locked are the buffer's own
    assert buf.untyped_storage().nbytes() == nbytes and buf.is_contiguous()
    buf[2, 7, -1] = 1.5  # all of it is usable memory
    assert buf[2, 7, -1].item() == 1.5


def test_host_buffer_stays_locked_while_any_view_lives(fake_lock):
    buf = host_buffer((2, 4, 16), torch.float32, pin=True)
    ptr, row = buf.data_ptr(), buf[1]
    del buf
    assert [c[0] for c in fake_lock] == ["lock"]  # the row still views the memory
    del row
    assert fake_lock[-1] == ("unlock", ptr, 2 * 4 * 16 * 4)


def test_host_buffer_unpinned_is_ordinary_memory(fake_lock):
    buf = host_buffer((2, 3), torch.float16, pin=False)
    assert buf.shape == (2, 3) and buf.dtype == torch.float16 and fake_lock == []


def test_a_failed_lock_is_an_actionable_error(monkeypatch):
    class Cudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            return 2  # cudaErrorMemoryAllocation

        def cudaGetErrorString(self, err):
            return "out of memory"

    monkeypatch.setattr(torch.cuda, "cudart", Cudart)
    with pytest.raises(TinyMoeError, match=r"page-lock .* GiB .*out of memory.*free host memory"):
        host_buffer((4, 1024), torch.float32, pin=True)


# ---- take_from and give_back


def test_take_from_copies_every_layer_into_one_locked_buffer(ckpt, fake_lock):
    model = load_model(ckpt, expert_device="cpu")
    want = generate(model, PROMPT, 6, eos_ids=()).tokens
    st = HostExpertStore.take_from(model, pin=True)  # CPU experts are not pinned: copied
    assert fake_lock == [("lock", st.layers[0].data_ptr(), expert_bytes(model))]
    assert len({t.untyped_storage().data_ptr() for t in st.layers}) == 1  # one buffer
    assert all(w.numel() == 0 for w in model.experts.weights)  # the model let go
    st.give_back(model)  # home is the host: the model now holds the buffer, still locked
    assert [c[0] for c in fake_lock] == ["lock"]
    assert generate(model, PROMPT, 6, eos_ids=()).tokens == want
    ptr = model.experts.weights[0].data_ptr()
    del model
    gc.collect()
    assert fake_lock[-1] == ("unlock", ptr, fake_lock[0][2])  # freed with the last view


def test_take_from_adopts_experts_already_on_the_host(ckpt, fake_lock):
    model = load_model(ckpt, expert_device="cpu")
    before = [w.data_ptr() for w in model.experts.weights]
    st = HostExpertStore.take_from(model)  # CPU compute: nothing to pin, nothing to copy
    assert [t.data_ptr() for t in st.layers] == before and fake_lock == []
    st.give_back(model)
    assert [w.data_ptr() for w in model.experts.weights] == before


def test_loader_puts_all_experts_in_one_host_buffer(ckpt):
    model = load_model(ckpt, expert_device="cpu")
    ws = model.experts.weights
    assert len({w.untyped_storage().data_ptr() for w in ws}) == 1
    assert ws[0].untyped_storage().nbytes() == expert_bytes(model)


def test_take_from_is_all_or_nothing_when_a_copy_fails(ckpt, fake_lock, monkeypatch):
    """A copy failing at layer 1 leaves the model whole and unlocks the half-filled buffer."""
    model = load_model(ckpt, expert_device="cpu")
    want = generate(model, PROMPT, 6, eos_ids=()).tokens
    before = [(w.data_ptr(), tuple(w.shape)) for w in model.experts.weights]
    copy = fail_copies_from_layer_1(model, monkeypatch)
    with pytest.raises(RuntimeError, match="injected copy failure"):
        HostExpertStore.take_from(model, pin=True)
    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    assert [c[0] for c in fake_lock] == ["lock", "unlock"]  # released at once, not leaked
    assert [(w.data_ptr(), tuple(w.shape)) for w in model.experts.weights] == before
    assert generate(model, PROMPT, 6, eos_ids=()).tokens == want


def test_take_from_is_all_or_nothing_when_locking_fails(ckpt, monkeypatch):
    def no_lockable_memory(ptr: int, nbytes: int) -> int:
        raise TinyMoeError("cannot page-lock (injected)")

    monkeypatch.setattr(store_module, "_lock", no_lockable_memory)
    model = load_model(ckpt)
    want = generate(model, PROMPT, 6, eos_ids=()).tokens
    with pytest.raises(TinyMoeError, match="injected"):
        HostExpertStore.take_from(model, pin=True)
    assert all(w.numel() > 0 for w in model.experts.weights)
    assert generate(model, PROMPT, 6, eos_ids=()).tokens == want


def test_a_store_made_in_inference_mode_gives_back_ordinary_tensors(ckpt, fake_lock):
    model = load_model(ckpt)
    with torch.inference_mode():
        st = HostExpertStore.take_from(model, pin=True)
        st.give_back(model)
    assert not any(w.is_inference() for w in model.experts.weights)


def test_close_without_give_back_releases_the_buffer(ckpt, fake_lock):
    model = load_model(ckpt)
    st = HostExpertStore.take_from(model, pin=True)
    st.close()
    assert [c[0] for c in fake_lock] == ["lock", "unlock"] and st.num_layers == 0


# ---- on a real GPU


def host_pinned_by_the_caching_allocator() -> int | None:
    """Bytes PyTorch's pinned allocator has handed out (power-of-two blocks), where it says."""
    stats = getattr(torch.cuda, "host_memory_stats", dict)()
    return stats.get("active_bytes.current")


@pytest.fixture
def unlocks(monkeypatch):
    """The real _unlock, recording the pointers it unlocks."""
    seen: list[int] = []
    real = store_module._unlock

    def unlock(ptr: int, device: int) -> None:
        seen.append(ptr)
        real(ptr, device)

    monkeypatch.setattr(store_module, "_unlock", unlock)
    yield seen
    gc.collect()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("expert_device", ["cuda", "cpu"])
def test_cuda_pinned_bytes_are_the_expert_bytes(ckpt, expert_device):
    """Page-locked host memory for the experts is <= 1.05x their bytes (here: exactly them).

    Measured two ways that together cover all pinned host memory: PyTorch's pinned allocator
    (where the old per-layer pin_memory=True buffers came from, rounded up to powers of two:
    4/3 of the bytes for this model) must not grow at all; and the experts must sit in ONE
    storage of exactly L*E*3*I*D*itemsize bytes, registered in one call, which CUDA reports
    page-locked at both ends (cudaPointerGetAttributes, via is_pinned). expert_device "cuda":
    take_from copies the experts out; "cpu": the loader pinned them and take_from adopts them.
    """
    torch.cuda.synchronize()
    before = host_pinned_by_the_caching_allocator()
    model = load_model(ckpt, device="cuda", expert_device=expert_device)
    st = HostExpertStore.take_from(model)
    assert len({t.untyped_storage().data_ptr() for t in st.layers}) == 1
    nbytes = st.layers[0].untyped_storage().nbytes()
    assert nbytes == expert_bytes(model) <= 1.05 * expert_bytes(model)
    assert st.layers[0][0].is_pinned() and st.layers[-1][-1].is_pinned()
    after = host_pinned_by_the_caching_allocator()
    if before is not None and after is not None:
        assert after == before
    st.give_back(model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_give_back_to_the_gpu_unlocks_the_buffer(ckpt, unlocks):
    model = load_model(ckpt, device="cuda")
    want = generate(model, PROMPT, 6, eos_ids=()).tokens
    st = HostExpertStore.take_from(model)
    ptr = st.layers[0].data_ptr()
    assert unlocks == []
    st.give_back(model)  # copied back: nothing views the host buffer any more
    assert unlocks == [ptr]
    assert model.experts.weights[0].is_cuda
    assert generate(model, PROMPT, 6, eos_ids=()).tokens == want


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_experts_loaded_on_the_host_stay_pinned_with_the_model(ckpt, unlocks):
    model = load_model(ckpt, device="cuda", expert_device="cpu")
    before = [w.data_ptr() for w in model.experts.weights]
    st = HostExpertStore.take_from(model)
    assert [t.data_ptr() for t in st.layers] == before  # adopted
    st.give_back(model)
    assert model.experts.weights[-1].is_pinned() and unlocks == []  # ready to adopt again
    del model, st
    gc.collect()
    assert unlocks == [before[0]]  # with the last view


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_take_from_is_all_or_nothing(ckpt, unlocks, monkeypatch):
    model = load_model(ckpt, device="cuda")
    want = generate(model, PROMPT, 6, eos_ids=()).tokens
    copy = fail_copies_from_layer_1(model, monkeypatch)
    with pytest.raises(RuntimeError, match="injected copy failure"):
        HostExpertStore.take_from(model)
    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    assert len(unlocks) == 1  # the half-filled buffer, at once
    assert all(w.is_cuda and w.numel() > 0 for w in model.experts.weights)
    assert generate(model, PROMPT, 6, eos_ids=()).tokens == want
