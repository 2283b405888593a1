"""Offloading runtime: exactness under every policy and budget, streaming, failures, shutdown."""

import threading

import pytest
import torch

from tinymoe import TinyMoeError, generate, load_model
from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import Routing
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.policy import parse_policy
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.speculation.oracle import OraclePredictor, record_routing
from tinymoe.speculation.recording import RouteRecorder

FAST = LinkSpec(100.0, 0.0)  # tests stay fast; the timing model has its own test
PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]  # routes to most of the 8 experts per layer


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    from conftest import make_checkpoint

    return load_model(make_checkpoint(tmp_path_factory.mktemp("offload") / "baby"))


@torch.no_grad()
def step_logits(model, prompt: list[int], n_new: int) -> list[torch.Tensor]:
    """Prefill, then n_new - 1 greedy decode steps; the full logits of every forward pass."""
    cfg = model.cfg
    cache = KVCache(
        cfg.num_layers, 1, cfg.num_kv_heads, len(prompt) + n_new, cfg.head_dim, "cpu", torch.float32
    )
    out = [model(torch.tensor([prompt]), cache=cache, start=0)]
    pos = len(prompt)
    for _ in range(n_new - 1):
        tok = out[-1][:, -1].argmax(-1).view(1, 1)
        out.append(model(tok, cache=cache, start=pos))
        pos += 1
    return out


@pytest.fixture(scope="module")
def reference(model):
    """Resident logits, and the routing the oracle replays (recorded on the same forwards)."""
    recorder = RouteRecorder()
    model.route_hook = recorder
    try:
        logits = step_logits(model, PROMPT, 6)
    finally:
        model.route_hook = None
    return logits, recorder.forwards


CASES = [("resident", None)] + [
    (policy, slots)
    for policy in ("on-demand", "lru", "lfu", "oracle")
    for slots in (None, 2, 3, 5, 24)  # None: the policy's default; 2 = top-k; 24 = every expert
]


@pytest.mark.parametrize("policy,slots", CASES)
def test_logits_bit_identical_to_resident(model, reference, policy, slots):
    logits, recording = reference
    predictor = OraclePredictor(recording) if policy == "oracle" else None
    link = None if policy == "resident" else FAST
    with OffloadRuntime(model, policy, predictor=predictor, slots=slots, link=link) as rt:
        got = step_logits(model, PROMPT, 6)
        report = rt.report()
    for want, have in zip(logits, got, strict=True):
        assert torch.equal(want, have)
    if policy != "resident":
        # A 12-token prompt needs up to 8 experts per layer: small budgets had to stream.
        assert report["prefill"]["bytes_copied"] > 0
        assert report["expert_slots"] == (slots or report["expert_slots"])


def test_speculative_oracle_equals_exact(model, reference):
    """Speculating with a perfect prediction routes exactly like the router: the plug point."""
    logits, recording = reference
    policy = parse_policy("speculative+oracle")
    with OffloadRuntime(model, policy, predictor=OraclePredictor(recording), link=FAST):
        got = step_logits(model, PROMPT, 6)
    assert all(torch.equal(a, b) for a, b in zip(logits, got, strict=True))


def test_generate_tokens_equal_resident(model):
    want = generate(model, PROMPT, 8, eos_ids=()).tokens
    for policy in ("on-demand", "lru", "lfu"):
        with OffloadRuntime(model, policy, link=FAST):
            assert generate(model, PROMPT, 8, eos_ids=()).tokens == want


def test_streaming_prefill_copies_each_expert_once_per_layer(model, reference):
    _, recording = reference
    prefill = recording[0]  # [layer] routing of the prompt
    distinct = sum(len(r.ids.unique()) for r in prefill)
    with OffloadRuntime(model, "on-demand", slots=2, link=FAST) as rt:
        step_logits(model, PROMPT, 1)
        report = rt.report()
    assert max(len(r.ids.unique()) for r in prefill) > 2  # so the budget really was too small
    assert report["prefill"]["bytes_copied"] == distinct * rt.store.expert_bytes


def test_oracle_prefetch_leaves_only_late_misses_after_layer_0(model, reference):
    _, recording = reference
    with OffloadRuntime(model, "oracle", predictor=OraclePredictor(recording), link=FAST) as rt:
        step_logits(model, PROMPT, 6)
        rt.report()
        layers = rt.stats["decode"].layers
    assert rt.num_slots == 4  # 2 * top-k by default
    for st in layers[1:]:
        assert set(+st.miss_kinds) <= {"late"}
        assert st.hits + st.misses == 5 * 2  # five decode steps, top-2
    assert layers[0].hits + layers[0].misses == 10


def decode_layer_0_after_first_step(model, predictor: OraclePredictor) -> dict:
    """Generate 6 tokens; layer 0's decode stats from the second decode step on (4 steps)."""
    with OffloadRuntime(model, "oracle", predictor=predictor, link=FAST) as rt:

        def skip_first_decode_step(tok: int) -> None:
            tokens.append(tok)
            if len(tokens) == 2:  # the prefill streamed through every slot: nothing prefetched
                rt.report()
                rt.reset_stats()

        tokens: list[int] = []
        generate(model, PROMPT, 6, eos_ids=(), on_token=skip_first_decode_step)
        rt.report()
        st = rt.stats["decode"].layers[0]
        leftover = dict(rt.scheduler.reserved)
    assert st.hits + st.misses == 4 * 2  # four decode steps, top-2
    return {"kinds": set(+st.miss_kinds), "prefetched": st.prefetch_bytes, "left": leftover}


def test_oracle_prefetches_the_next_tokens_layer_0(model):
    _, recording = record_routing(model, PROMPT, 6, eos_ids=())
    crossing = decode_layer_0_after_first_step(model, OraclePredictor(recording))
    # The previous step's last layer prefetched layer 0: at worst its copy is still in flight.
    assert crossing["kinds"] <= {"late"} and crossing["prefetched"] > 0
    assert crossing["left"] == {}  # the last step had no next step to reserve for
    within = OraclePredictor(recording)
    within.crosses_tokens = False  # what every real predictor does: stop at the last layer
    alone = decode_layer_0_after_first_step(model, within)
    assert alone["kinds"] - {"late"} and alone["prefetched"] == 0  # layer 0 loads on demand


def test_on_demand_has_no_reuse_across_tokens(model):
    with OffloadRuntime(model, "on-demand", link=FAST) as rt:
        generate(model, PROMPT, 5, eos_ids=())
        dec = rt.report()["decode"]
    assert rt.num_slots == 2 and dec["hits"] == 0
    assert dec["bytes_copied"] == dec["misses"] * rt.store.expert_bytes


def test_close_restores_the_resident_model(model):
    want = generate(model, PROMPT, 4, eos_ids=()).tokens
    shapes = [tuple(w.shape) for w in model.experts.weights]
    rt = OffloadRuntime(model, "lru", link=FAST)
    assert model.experts.weights[0].numel() == 0  # the store took the experts: no second copy
    rt.close()
    rt.close()  # idempotent
    assert model.provider is model.experts and model.route_hook is None
    assert [tuple(w.shape) for w in model.experts.weights] == shapes
    assert not rt.engine.worker.is_alive()
    assert generate(model, PROMPT, 4, eos_ids=()).tokens == want


@pytest.mark.parametrize("policy,fail_kind", [("on-demand", "demand"), ("oracle", "prefetch")])
def test_failed_copy_raises_where_used_without_hanging(model, reference, policy, fail_kind):
    _, recording = reference
    predictor = OraclePredictor(recording) if policy == "oracle" else None
    rt = OffloadRuntime(model, policy, predictor=predictor, link=FAST)
    count = {"n": 0}

    def fail_one(t):
        if t.tag.kind == fail_kind:
            count["n"] += 1
            if count["n"] == 3:
                raise OSError("injected link failure")

    rt.engine.before_copy = fail_one
    caught: list[BaseException] = []

    def run():
        try:
            step_logits(model, PROMPT, 4)
        except BaseException as e:
            caught.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "generation hung on a failed copy"
    assert len(caught) == 1 and isinstance(caught[0], TinyMoeError)
    assert "injected link failure" in str(caught[0]) and "expert" in str(caught[0])
    rt.close()
    assert not rt.engine.worker.is_alive()
    assert model.experts.weights[0].numel() > 0  # usable again


def test_interrupt_shuts_the_worker_down(model):
    def interrupt(tok: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), OffloadRuntime(model, "lru", link=FAST) as rt:
        generate(model, PROMPT, 5, eos_ids=(), on_token=interrupt)
    assert not rt.engine.worker.is_alive()
    assert model.provider is model.experts


def test_budget_and_policy_errors(model):
    with pytest.raises(TinyMoeError, match="fewer than top-k"):
        OffloadRuntime(model, "on-demand", slots=1, link=FAST)
    with pytest.raises(TinyMoeError, match="expert-budget-gb"):
        OffloadRuntime(model, "lru", budget_gb=1e-6, link=FAST)
    with pytest.raises(TinyMoeError, match="needs a predictor"):
        OffloadRuntime(model, "oracle", link=FAST)
    with pytest.raises(TinyMoeError, match="unknown offload policy"):
        parse_policy("sometimes")
    assert model.provider is model.experts  # failed constructions installed nothing


def test_budget_in_gb_sets_the_slot_count(model):
    expert_bytes = model.cfg.expert_numel * 4
    with OffloadRuntime(model, "lru", budget_gb=7.5 * expert_bytes / 1e9, link=FAST) as rt:
        assert rt.num_slots == 7


def test_parse_policy_composite_names():
    p = parse_policy("prefetch+router+lfu")
    assert (p.predictor, p.speculate, p.eviction, p.cache_across_tokens, p.pipeline) == (
        "router",
        False,
        "lfu",
        True,
        True,
    )
    s = parse_policy("speculative+hybrid")
    assert (s.predictor, s.speculate, s.cache_across_tokens) == ("hybrid", True, False)
    assert parse_policy("on-demand").pipeline is False


def test_experts_loaded_on_the_host_are_adopted_without_a_copy(tmp_path):
    """load_model(expert_device="cpu") puts experts where the store copies from: it keeps them."""
    from conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "m")
    model = load_model(path, expert_device="cpu")
    before = [w.data_ptr() for w in model.experts.weights]
    resident = generate(load_model(path), PROMPT[:5], 4, eos_ids=()).tokens
    with OffloadRuntime(model, "lru", slots=3) as rt:
        assert [t.data_ptr() for t in rt.store.layers] == before  # adopted, not copied
        assert generate(model, PROMPT[:5], 4, eos_ids=()).tokens == resident
    assert [w.data_ptr() for w in model.experts.weights] == before  # given back home


def test_decode_reads_ids_to_the_host_once_per_layer(model, monkeypatch):
    """The host-device syncs of a decode step: one read of expert ids per layer (the layer's own
    and the prediction's together) and the sampled token. Counted on the CPU by wrapping the two
    calls that read a tensor to the host; on CUDA the same test runs with sync debug mode."""
    from tinymoe.speculation.predictors import RouterPredictor

    L, n = model.cfg.num_layers, 5
    from conftest import count_host_reads

    calls = count_host_reads(monkeypatch, ("tolist", "item"))
    counting = []

    def start_counting_after_prefill(tok: int) -> None:
        if not counting:
            counting.append(True)
            calls.update(tolist=0, item=0)

    predictor = RouterPredictor(model, None, 1)
    with OffloadRuntime(model, "prefetch+router+lru", predictor=predictor, link=FAST) as rt:
        generate(model, PROMPT, n, eos_ids=(), on_token=start_counting_after_prefill)
        assert rt.report()["decode"]["prefetch_bytes"] >= 0
    assert calls == {"tolist": (n - 1) * L, "item": n - 1}


def test_runtime_built_inside_inference_mode_generates(model):
    want = generate(model, PROMPT, 6, eos_ids=()).tokens
    with torch.inference_mode(), OffloadRuntime(model, "lru", slots=3, link=FAST):
        got = generate(model, PROMPT, 6, eos_ids=()).tokens
    assert got == want


class Guess:
    """A one-layer-ahead predictor that guesses `guess(layer, u, routing)` for layer + 1."""

    lookahead = 1

    def __init__(self, model, guess) -> None:
        self.num_layers, self.guess = model.cfg.num_layers, guess

    def reset(self) -> None:
        pass

    def observe(self, layer, resid, u, routing):
        return None if layer + 1 >= self.num_layers else self.guess(layer, u, routing)


def test_speculation_is_off_during_prefill(model, reference):
    """Speculating with a predictor that is always wrong changes decode steps, never the prompt:
    the prefill's logits (and so its KV cache) are exactly resident's."""
    logits, recording = reference

    def shifted(layer, u, routing):
        return Routing((routing.ids + 1) % model.cfg.num_experts, routing.weights)  # never right

    with OffloadRuntime(model, "speculative+wrong", predictor=Guess(model, shifted), link=FAST):
        got = step_logits(model, PROMPT, 3)
    assert torch.equal(got[0], logits[0])  # the prompt: exact
    assert not torch.equal(got[1], logits[1])  # a decode step: speculated


def test_failed_prefetch_that_is_never_used_does_not_abort(model, reference):
    """Every prefetch copy fails, and the predictor is always wrong, so none is ever used: the
    run completes and is exact (a failed copy matters only where its expert is used)."""
    logits, recording = reference

    def unused(layer, u, routing):  # two experts the prompt's next layer does not route to
        true = recording[0][layer + 1].ids.flatten().tolist()
        wrong = [e for e in range(model.cfg.num_experts) if e not in true][:2]
        return Routing(torch.tensor([wrong] * u.shape[0]), torch.ones(u.shape[0], 2))

    rt = OffloadRuntime(model, "prefetch+wrong+lru", predictor=Guess(model, unused), link=FAST)
    failed = []

    def fail_prefetches(t):
        if t.tag.kind == "prefetch":
            failed.append(t.tag)
            raise OSError("injected link failure")

    rt.engine.before_copy = fail_prefetches
    try:
        # The prompt only: its routing is the recording's first forward, so "wrong" is wrong.
        got = step_logits(model, PROMPT, 1)
    finally:
        rt.close()
    assert failed  # prefetches were issued and failed
    assert torch.equal(got[0], logits[0])


@pytest.mark.parametrize(
    "policy,slots",
    [("on-demand", None), ("on-demand", 5), ("lru", 3), ("lfu", 24), ("prefetch+guess+lru", 4)],
)
def test_cpu_miss_handler_is_exact(model, reference, policy, slots):
    """Misses computed on the host from the host store (no copy) give resident's logits, bit for
    bit, with prefetching or not; only what the slots hold is ever copied."""
    logits, recording = reference
    predictor = None
    if "guess" in policy:  # the true next layer, as recorded: prefetches are then copied
        predictor = Guess(model, lambda layer, u, routing: recording[0][layer + 1])
    with OffloadRuntime(
        model, policy, predictor=predictor, slots=slots, link=FAST, miss_handler="cpu"
    ) as rt:
        got = step_logits(model, PROMPT, 6)
        report = rt.report()
    assert all(torch.equal(a, b) for a, b in zip(logits, got, strict=True))
    dec, pre = report["decode"], report["prefill"]
    assert pre["host_computed"] > 0 and dec["misses"] >= dec["host_computed"]
    if predictor is None:
        assert pre["bytes_copied"] == dec["bytes_copied"] == 0  # nothing is ever copied


def test_miss_handler_is_checked(model):
    with pytest.raises(TinyMoeError, match="miss-handler"):
        OffloadRuntime(model, "lru", link=FAST, miss_handler="gpu")
    with pytest.raises(TinyMoeError, match="miss-handler"):
        OffloadRuntime(model, "resident", miss_handler="cpu")
    assert model.provider is model.experts
