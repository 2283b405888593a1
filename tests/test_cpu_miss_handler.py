"""Host experts (the CPU miss handler): one copy each way per layer, the device's experts first.

On a CPU machine host and device are one device, so nothing is a host expert and nothing is
copied. The CPU tests make the host path run anyway: `on_host` is patched to call the host
store's rows (or a test provider's) host experts, and the two copies (`to_host`, `to_device`)
and the two places an expert is computed are logged. What they check holds on CUDA too, where
the CUDA tests (marked `cuda`, skipped without a GPU) check the overlap itself: the host computes
while the device's experts still run, with no blocking copy.
"""

import warnings

import pytest
import torch

import tinymoe.engine.experts as experts_mod
import tinymoe.engine.model as model_mod
import tinymoe.engine.moe as moe_mod
from tinymoe import generate, load_model
from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import Routing, moe_forward
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.speculation.oracle import OraclePredictor, record_routing

FAST = LinkSpec(100.0, 0.0)
PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]  # routes to most of the 8 experts per layer
E, D, I = 8, 32, 16


def cuda_only(test):
    """Marked `cuda` (tests/gpu_check.py runs `-m cuda`), skipped without a GPU."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(test))


class Provider:
    """Experts `host` from a separate host copy, yielded first (or `last`), the rest from
    `weights`."""

    def __init__(self, weights, host_weights, host=(), last=False, before_device=None):
        self.weights, self.host_weights, self.host, self.last = weights, host_weights, host, last
        self.before_device = before_device  # called before each device expert is yielded

    def experts(self, layer, ids):
        on_host = [(e, self.host_weights[e]) for e in ids if e in self.host]
        on_device = [e for e in ids if e not in self.host]
        if not self.last:
            yield from on_host
        for e in on_device:
            if self.before_device is not None:
                self.before_device()
            yield e, self.weights[e]
        if self.last:
            yield from on_host


class Log:
    """Patches the seam and logs, in order: "d2h" (rows), "sync", "device" (rows), "host"
    (rows), "h2d" (rows). `host_storages`: the storages whose rows count as host experts."""

    def __init__(self, monkeypatch, host_storages):
        self.events: list[tuple[str, int]] = []
        ptrs = set(host_storages)
        monkeypatch.setattr(moe_mod, "on_host", lambda w, x: w.untyped_storage().data_ptr() in ptrs)
        to_host, to_device = experts_mod.to_host, experts_mod.to_device
        on_device, on_the_host = moe_mod.expert_forward, experts_mod.expert_forward

        def logged_to_host(xs, written, host):
            self.events.append(("d2h", sum(x.shape[0] for x in xs)))
            out, wait = to_host(xs, written, host)

            def logged_wait():
                self.events.append(("sync", 0))
                wait()

            return out, logged_wait

        def logged_to_device(parts, device):
            self.events.append(("h2d", sum(p.shape[0] for p in parts)))
            return to_device(parts, device)

        def device_expert(w, x, i):
            self.events.append(("device", x.shape[0]))
            return on_device(w, x, i)

        def host_expert(w, x, i):
            self.events.append(("host", x.shape[0]))
            return on_the_host(w, x, i)

        monkeypatch.setattr(experts_mod, "to_host", logged_to_host)
        monkeypatch.setattr(experts_mod, "to_device", logged_to_device)
        monkeypatch.setattr(moe_mod, "expert_forward", device_expert)
        monkeypatch.setattr(experts_mod, "expert_forward", host_expert)

    def take(self) -> list[tuple[str, int]]:
        out, self.events = self.events, []
        return out


def check_one_layer(events, host_first=True) -> None:
    """One MoE layer with host experts: one copy each way, one sync, device experts queued before
    the host computes any, and (host experts yielded first) the inputs' copy before them too."""
    kinds = [k for k, _ in events]
    assert kinds.count("d2h") == kinds.count("sync") == kinds.count("h2d") == 1, kinds
    device = [i for i, k in enumerate(kinds) if k == "device"]
    host = [i for i, k in enumerate(kinds) if k == "host"]
    assert host and max(device, default=-1) < kinds.index("sync") < min(host)
    assert max(host) < kinds.index("h2d")
    if host_first:
        assert kinds.index("d2h") < min(device, default=len(kinds))
    else:  # still exact, but the copy then waits for the device's experts: no overlap
        assert kinds.index("d2h") > max(device, default=-1)
    assert dict(events)["h2d"] == sum(n for k, n in events if k == "host")


def layer_inputs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(n)])  # (n, 2)
    weights = torch.softmax(torch.randn(n, 2, generator=g), dim=-1)
    experts = 0.3 * torch.randn(E, 3 * I * D, generator=g)
    return u, Routing(ids, weights), experts


@pytest.mark.parametrize("n", [1, 9])
@pytest.mark.parametrize("host_count", [1, 3, E])
def test_host_experts_one_copy_each_way_device_experts_first(monkeypatch, n, host_count):
    u, routing, experts = layer_inputs(n, seed=n + host_count)
    want = moe_forward(u, routing, Provider(experts, experts), 0, I)
    host_weights = experts.clone()  # its rows are the "host" ones
    used = sorted(set(routing.ids.flatten().tolist()))
    host = set(used[:host_count])
    log = Log(monkeypatch, [host_weights.untyped_storage().data_ptr()])
    got = moe_forward(u, routing, Provider(experts, host_weights, host), 0, I)
    events = log.take()
    check_one_layer(events)
    assert sum(k == "host" for k, _ in events) == len(host)
    # A decode step copies its one token once, however many host experts read it.
    copied = dict(events)["d2h"]
    assert copied == (1 if n == 1 else int(sum((routing.ids == e).sum() for e in host)))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 9])
def test_host_experts_yielded_last_are_exact_without_overlap(monkeypatch, n):
    u, routing, experts = layer_inputs(n, seed=40 + n)
    want = moe_forward(u, routing, Provider(experts, experts), 0, I)
    host_weights = experts.clone()
    host = set(routing.ids[0].tolist())
    log = Log(monkeypatch, [host_weights.untyped_storage().data_ptr()])
    got = moe_forward(u, routing, Provider(experts, host_weights, host, last=True), 0, I)
    check_one_layer(log.take(), host_first=False)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_no_host_experts_no_copies(monkeypatch):
    u, routing, experts = layer_inputs(9, seed=3)
    log = Log(monkeypatch, [])
    moe_forward(u, routing, Provider(experts, experts), 0, I)
    moe_forward(
        u[:1], Routing(routing.ids[:1], routing.weights[:1]), Provider(experts, experts), 0, I
    )
    kinds = {k for k, _ in log.take()}
    assert kinds == {"device"}


# ---------------------------------------------------------------- through the offloading runtime


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import make_checkpoint

    return load_model(make_checkpoint(tmp_path_factory.mktemp("cpumiss") / "baby"))


@torch.no_grad()
def step_logits(model, n_new: int) -> list[torch.Tensor]:
    """Prefill PROMPT, then n_new - 1 greedy decode steps: every forward pass's logits."""
    cfg = model.cfg
    cache = KVCache(
        cfg.num_layers, 1, cfg.num_kv_heads, len(PROMPT) + n_new, cfg.head_dim, "cpu", torch.float32
    )
    out = [model(torch.tensor([PROMPT]), cache=cache, start=0)]
    for pos in range(len(PROMPT), len(PROMPT) + n_new - 1):
        out.append(model(out[-1][:, -1].argmax(-1).view(1, 1), cache=cache, start=pos))
    return out


@pytest.fixture(scope="module")
def reference(model):
    logits = step_logits(model, 5)
    _, recording = record_routing(model, PROMPT, 5, eos_ids=())
    return logits, recording


def test_runtime_on_a_cpu_copies_nothing_and_is_exact(model, reference, monkeypatch):
    """On a CPU machine the store's rows are on the compute device: no host expert, no copy."""
    logits, _ = reference
    calls = []
    monkeypatch.setattr(experts_mod, "to_host", lambda *a: calls.append("d2h"))
    monkeypatch.setattr(experts_mod, "to_device", lambda *a: calls.append("h2d"))
    with OffloadRuntime(model, "on-demand", link=FAST, miss_handler="cpu") as rt:
        got = step_logits(model, 5)
        assert rt.report()["decode"]["host_computed"] > 0
    assert calls == []
    assert all(torch.equal(a, b) for a, b in zip(logits, got, strict=True))


def test_runtime_host_misses_one_copy_each_way_per_layer(model, reference, monkeypatch):
    """The scheduler yields a layer's host rows first: with the store's rows taken as host
    experts, every layer that has some copies once each way, after queueing its device experts
    (the oracle's prefetches, in 4 slots) and before the host computes; the logits match."""
    logits, recording = reference
    layers: list[list[tuple[str, int]]] = []
    forward = model_mod.moe_forward

    def one_layer(*args):
        out = forward(*args)
        layers.append(log.take())
        return out

    predictor = OraclePredictor(recording)
    with OffloadRuntime(
        model, "oracle", predictor=predictor, slots=4, link=FAST, miss_handler="cpu"
    ) as rt:
        log = Log(monkeypatch, {t.untyped_storage().data_ptr() for t in rt.store.layers})
        monkeypatch.setattr(model_mod, "moe_forward", one_layer)
        got = step_logits(model, 5)
        host_computed = sum(rt.report()[p]["host_computed"] for p in ("prefill", "decode"))
    with_host = [ev for ev in layers if any(k == "host" for k, _ in ev)]
    for ev in with_host:
        check_one_layer(ev)
    for ev in layers:
        assert any(k == "host" for k, _ in ev) or not any(k in ("d2h", "h2d") for k, _ in ev)
    assert sum(k == "host" for ev in layers for k, _ in ev) == host_computed > 0
    mixed = [ev for ev in with_host if any(k == "device" for k, _ in ev)]
    assert mixed  # layers with device and host experts: the order above was tested
    assert max(sum(k == "host" for k, _ in ev) for ev in with_host) >= 2  # one copy for several
    for a, b in zip(logits, got, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- on a GPU

SLEEP_CYCLES = 200_000_000  # ~0.1 s of GPU clock before each device expert


@cuda_only
@pytest.mark.parametrize("n", [1, 9])
def test_cuda_host_experts_run_while_the_device_computes(monkeypatch, n):
    """Before each device expert is yielded the compute stream is delayed (as the scheduler
    makes it wait for a late copy); when the host starts computing its experts the device must
    still be busy: their inputs' copy waited neither for that nor for the device's experts. One
    copy each way, and (one token) no blocking copy or stream sync at all."""
    dev = torch.device("cuda")
    u, routing, experts = layer_inputs(n, seed=70 + n)
    u, experts = u.to(dev), experts.to(dev)
    routing = Routing(routing.ids.to(dev), routing.weights.to(dev), host_ids=routing.ids.tolist())
    want = moe_forward(u, routing, Provider(experts, experts), 0, I)
    host_weights = experts.cpu()
    used = sorted(set(routing.ids.flatten().tolist()))
    host = set(used[: 1 if n == 1 else 3])  # and at least one device expert
    slept: list[torch.cuda.Event] = []
    busy_when_host_started: list[bool] = []

    def delay():
        torch.cuda._sleep(SLEEP_CYCLES)
        slept.append(torch.cuda.Event())
        slept[-1].record()

    log = Log(monkeypatch, [host_weights.untyped_storage().data_ptr()])
    host_expert = experts_mod.expert_forward

    def host_expert_seeing_the_device(w, x, i):
        if not busy_when_host_started:
            busy_when_host_started.append(not slept[-1].query())  # a query, not a sync
        return host_expert(w, x, i)

    monkeypatch.setattr(experts_mod, "expert_forward", host_expert_seeing_the_device)
    provider = Provider(experts, host_weights, host, before_device=delay)
    torch.cuda.synchronize()
    # One token: its ids are read already, so nothing may sync but the inputs' event. Many: the
    # grouped path reads its expert counts (a sync of its own, before any expert).
    torch.cuda.set_sync_debug_mode("error" if n == 1 else "default")
    try:
        got = moe_forward(u, routing, provider, 0, I)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_one_layer(log.take())
    assert busy_when_host_started == [True]
    # (the host's matmuls round differently from the device's; a wrong sum is off by O(1))
    assert got.device == dev and torch.allclose(got, want, rtol=1e-3, atol=1e-3)


def decode_syncs(model, recording, miss_handler: str) -> tuple[list[int], int, int]:
    """Tokens, synchronising calls CUDA's sync debug mode flags in the decode steps, and the
    decode's host-computed experts, under the oracle in top-k slots."""
    seen: list[int] = []

    def count_from_second_token(tok: int) -> None:
        seen.append(tok)
        if len(seen) == 1:  # prefill done: count the decode steps only
            torch.cuda.set_sync_debug_mode("warn")

    slots = model.cfg.top_k  # the next layer's prefetch often finds no free slot: misses
    predictor = OraclePredictor(recording)
    with OffloadRuntime(
        model, "oracle", predictor=predictor, slots=slots, miss_handler=miss_handler
    ) as rt:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = generate(model, PROMPT, 6, eos_ids=(), on_token=count_from_second_token)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        host = rt.report()["decode"]["host_computed"]
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return out.tokens, len(syncs), host


@cuda_only
def test_cuda_host_misses_add_no_blocking_sync(tmp_path):
    """End to end on a GPU: misses computed on the host give resident's tokens, and the decode
    makes no more flagged syncs than copying the misses does (the host experts' one event sync
    per layer is not flagged; the blocking copies of one expert at a time were, two each)."""
    from conftest import make_checkpoint

    model = load_model(make_checkpoint(tmp_path / "baby"), device="cuda")
    want, recording = record_routing(model, PROMPT, 6, eos_ids=())
    tokens, copy_syncs, _ = decode_syncs(model, recording, "copy")
    assert tokens == want.tokens and copy_syncs > 0  # (the ids' and the token's reads)
    tokens, cpu_syncs, host = decode_syncs(model, recording, "cpu")
    assert tokens == want.tokens and host > 0
    assert cpu_syncs <= copy_syncs
