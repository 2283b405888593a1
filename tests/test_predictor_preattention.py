"""The pre-attention predictor (speculation/preattention.py): layer t's attention, run early."""

import math

import pytest
import torch
from conftest import count_host_reads, make_checkpoint

from tinymoe import load_model
from tinymoe.calibrate import CalibrationSettings, calibrate
from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import Routing
from tinymoe.speculation.calibration import load_speculation, save_speculation
from tinymoe.speculation.estimator import EstimatorConfig, build_estimator
from tinymoe.speculation.exact_run import record_exact_run
from tinymoe.speculation.hook import PredictionHook
from tinymoe.speculation.preattention import (
    PreAttentionPredictor,
    ShadowAttention,
    preattention_pairs,
)
from tinymoe.speculation.predictors import make_predictor
from tinymoe.speculation.recording import RouteRecorder
from tinymoe.speculation.scoring import forward_logits

SETTINGS = CalibrationSettings(lookaheads=(1, 2), steps=20, batch_size=32, val_fraction=0.25)


def rows(model, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.vocab_size, (B, T), generator=g)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("pre") / "m", num_layers=4)
    model = load_model(path)
    save_speculation(calibrate(model, rows(model, 8, 16), SETTINGS), path)
    return path


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe", "mixtral"])
def test_shadow_attention_on_the_true_states_is_the_models_attention(tmp_path, model_type):
    """Fed layer t's true inputs x_t, the shadow attention gives the model's r_t - x_t: whole
    windows at once, and one position at a time through its growing cache alike."""
    model = load_model(make_checkpoint(tmp_path / "m", model_type=model_type))
    ids = rows(model, 2, 9)
    x_in, r_out = {}, {}
    hooks = [
        layer.input_layernorm.register_forward_hook(
            lambda m, a, o, i=i: None if i in x_in else x_in.update({i: a[0].clone()})
        )  # (a forward hook that returns something replaces the module's output)
        for i, layer in enumerate(model.layers)
    ]
    keep = lambda layer, r, u, routing: r_out.setdefault(layer, r.view(2, 9, -1).clone())  # noqa
    with torch.no_grad(), RouteRecorder(keep).installed(model):
        model(ids)
    for h in hooks:
        h.remove()
    for t in range(model.cfg.num_layers):
        want = r_out[t] - x_in[t]  # layer t's attention output (B, T, D)
        with torch.no_grad():
            whole = ShadowAttention(model)(t, x_in[t])
            shadow = ShadowAttention(model)
            steps = [shadow(t, x_in[t][:, i : i + 1]) for i in range(9)]
            split = ShadowAttention(model)
            two = [split(t, x_in[t][:, :4]), split(t, x_in[t][:, 4:])]  # a prompt, then more
        torch.testing.assert_close(whole, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.cat(two, 1), want, atol=1e-5, rtol=1e-4)
        assert shadow.length[t] == 9


@pytest.mark.parametrize("lookahead", [1, 2])
def test_decoding_guesses_are_the_estimator_on_its_training_pairs(calibrated, lookahead):
    """What the predictor computes while decoding (one position at a time) is what calibrate
    trained it on: the estimator applied to preattention_pairs' features, position for
    position (zeros for the previous token at a window's start, as live)."""
    model = load_model(calibrated)
    cal = load_speculation(calibrated, model.cfg)
    ids = rows(model, 3, 7, seed=2)
    run = record_exact_run(model, ids)
    pairs = preattention_pairs(model, cal.default_vectors, run, lookahead, 7)
    est = cal.estimator("preattention", lookahead)
    p = make_predictor("preattention", model, cal, lookahead)
    assert isinstance(p, PreAttentionPredictor) and p.reads_positions
    got: dict[int, list[torch.Tensor]] = {}

    class Watch:  # the router decides; the predictor only observes
        def reset(self):
            p.reset()

        def __call__(self, layer, r, u, router):
            routing = router(u)
            guess = p.observe(layer, r, u, routing)  # r (3, 1, D): three windows side by side
            if guess is not None:
                got.setdefault(layer + lookahead, []).append(guess.ids)
            return routing

    forward_logits(model, ids, Watch(), stepwise=True)
    for t, (x, _) in pairs.items():
        want = est(x, t).topk(model.cfg.top_k).indices.view(3, 7, -1)  # window-major rows
        assert torch.equal(torch.stack(got[t], dim=1), want), t


def test_unsure_everywhere_is_exact(calibrated):
    model = load_model(calibrated)
    cal = load_speculation(calibrated, model.cfg)
    ids = rows(model, 2, 8, seed=1)
    exact = forward_logits(model, ids, None, stepwise=True)
    cal.estimator("preattention", 1).threshold.fill_(math.inf)
    hook = PredictionHook(make_predictor("preattention", model, cal, 1), speculate=True)
    torch.testing.assert_close(forward_logits(model, ids, hook, stepwise=True), exact)
    assert hook.fallback_share() == 1.0
    cal.estimator("preattention", 1).threshold.fill_(-math.inf)
    hook = PredictionHook(make_predictor("preattention", model, cal, 1), speculate=True)
    assert not torch.allclose(forward_logits(model, ids, hook, stepwise=True), exact, atol=1e-4)


def test_a_new_batch_or_reset_starts_a_new_sequence(calibrated):
    model = load_model(calibrated)
    shadow = ShadowAttention(model)
    x = torch.randn(1, 3, model.cfg.hidden_size)
    first = shadow(1, x)
    shadow(1, x)
    assert shadow.length[1] == 6
    shadow.reset()
    torch.testing.assert_close(shadow(1, x), first)  # positions 0..2 again, nothing before
    torch.testing.assert_close(shadow(1, x.expand(2, -1, -1))[1:], first)  # B = 2: fresh
    routing = Routing(torch.zeros(1, model.cfg.top_k, dtype=torch.long), torch.ones(1, 2) / 2)
    p = make_predictor("preattention", model, load_speculation(calibrated, model.cfg), 1)
    r = torch.randn(1, model.cfg.hidden_size)
    assert p.observe(0, r, r, routing).ids.shape == (1, model.cfg.top_k)  # (N, D) is one row


def test_calibration_records_its_figures(calibrated):
    cal = load_speculation(calibrated)
    for d in ("1", "2"):
        assert len(cal.meta["val_recall_at_k"][d]["preattention"]) == 4
        for t, f in cal.meta["fail_safe_preattention"][d].items():
            assert f["fail_safe_recall"] >= SETTINGS.fail_safe_recall - 1e-9, (d, t)
            assert cal.estimator("preattention", int(d)).threshold[int(t)].item() == f["threshold"]
    assert cal.estimator("preattention", 1).cfg.inputs == 3


# ---------------------------------------------------------------- the one-token fast path


def random_predictors(model, lookahead, seed=0):
    """Two PreAttentionPredictors on one random estimator (every block nonzero, the FF branch
    too, finite thresholds) and random default vectors: the first takes the decode fast path
    (DecodeStep), the second is forced to the reference (`fast_decode=False`)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ecfg = EstimatorConfig("preattention", cfg.hidden_size, cfg.num_experts, cfg.num_layers,
                           inputs=3)  # fmt: skip
    est = build_estimator(ecfg)
    with torch.no_grad():
        for p in est.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        est.threshold.copy_(torch.rand(cfg.num_layers, generator=g) * 0.4)  # some unsure
    dv = torch.randn(cfg.num_layers, cfg.num_experts, cfg.hidden_size, generator=g) * 0.5
    fast = PreAttentionPredictor(model, est, dv, lookahead)
    ref = PreAttentionPredictor(model, est, dv, lookahead, fast_decode=False)
    return fast, ref


def side_by_side(model, fast, ref, prompt_len, steps, seed=0):
    """A prefill of `prompt_len` tokens, then `steps` decode steps, routed by the router, both
    predictors observing every layer -> [(pass, layer, fast guess, reference guess)] of the
    one-token passes (the decode steps; the prefill too when it is one token)."""
    got, passes = [], []

    class Both:
        def reset(self):
            fast.reset(), ref.reset()

        def __call__(self, layer, r, u, router):
            routing = router(u)
            passes.append(layer == 0)
            a, b = fast.observe(layer, r, u, routing), ref.observe(layer, r, u, routing)
            assert (a is None) == (b is None)
            if a is not None and u.shape[0] == 1:
                got.append((sum(passes), layer, a, b))
            return routing

    cfg, w = model.cfg, model.embed_tokens.weight
    ids = rows(model, 1, prompt_len + steps, seed=seed)
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, ids.shape[1], cfg.head_dim, w.device,
                    w.dtype)  # fmt: skip
    with torch.no_grad(), model.routed_by(Both()) as hook:
        hook.reset()
        model(ids[:, :prompt_len], cache=cache, start=0)
        for i in range(prompt_len, ids.shape[1]):
            model(ids[:, i : i + 1], cache=cache, start=i)
    return got


FAST_CASES = {  # name: (make_checkpoint's overrides, lookahead, prompt tokens)
    "olmoe-clip": (dict(model_type="olmoe", clip_qkv=0.6), 1, 5),  # q, k of unequal lengths
    "olmoe-mha": (dict(model_type="olmoe", num_kv_heads=4), 2, 5),  # q, k normed as 2 rows
    "qwen3": (dict(model_type="qwen3_moe", num_layers=4), 2, 1),  # from the first token on
    "qwen3-bias": (dict(model_type="qwen3_moe", attention_bias=True), 1, 3),
    "mixtral": (dict(model_type="mixtral"), 1, 250),  # the shadow cache grows (256 -> 512)
}


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_the_decode_fast_path_is_the_reference(tmp_path, case):
    """In fp32, step for step and layer for layer, DecodeStep's guesses are the reference's:
    the same ids in the same order, the same sureness, the same weights up to rounding; and
    after the run the same shadow cache (lengths and contents) and the same `previous` states.
    The norm gains are not 1 (make_checkpoint), so a gain folded wrongly fails here."""
    overrides, lookahead, prompt_len = FAST_CASES[case]
    model = load_model(make_checkpoint(tmp_path / "m", **overrides))
    fast, ref = random_predictors(model, lookahead)
    got = side_by_side(model, fast, ref, prompt_len, steps=20)
    L = model.cfg.num_layers
    one_token_passes = 20 + (prompt_len == 1)
    assert len(got) == one_token_passes * (L - lookahead)
    assert fast._step is not None and ref._step is None
    sure = 0
    for step, layer, a, b in got:
        assert torch.equal(a.ids, b.ids), (step, layer, a.ids, b.ids)
        assert torch.equal(a.sure, b.sure), (step, layer)
        assert a.weights.dtype == b.weights.dtype and a.sure.shape == (1,)
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-6)
        sure += int(a.sure)
    assert 0 < sure < len(got)  # the thresholds cut: both sides of the margin test ran
    assert fast.shadow.length == ref.shadow.length
    assert fast.shadow.cache.max_len == ref.shadow.cache.max_len
    torch.testing.assert_close(fast.shadow.cache.k, ref.shadow.cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.shadow.cache.v, ref.shadow.cache.v, rtol=1e-5, atol=1e-5)
    assert fast.previous.keys() == ref.previous.keys()
    for layer, r in ref.previous.items():
        assert torch.equal(fast.previous[layer], r)


def test_the_fast_path_in_bf16_mostly_agrees(tmp_path):
    """In bf16 the fold rounds differently (the reference rounds each norm's output before its
    gain): the ids still agree on almost every (token, layer). Measured: 59 of these 60; 58 to
    60 of 60 over five seeds of each model type. The test asks for 90%."""
    path = make_checkpoint(tmp_path / "m", model_type="qwen3_moe", num_layers=4)
    model = load_model(path, dtype=torch.bfloat16)
    fast, ref = random_predictors(model, 1)
    got = side_by_side(model, fast, ref, prompt_len=5, steps=20)
    same = sum(torch.equal(a.ids, b.ids) for _, _, a, b in got)
    assert same >= 0.9 * len(got), f"{same} of {len(got)}"
    assert all(a.weights.dtype == b.weights.dtype == torch.bfloat16 for _, _, a, b in got)


def test_speculating_with_the_fast_path_decodes_as_the_reference(calibrated):
    """Through a speculating PredictionHook (its guesses route the layers, fed back into the
    next observe), the fast path decodes the same logits as the reference."""
    model = load_model(calibrated)
    cal = load_speculation(calibrated, model.cfg)
    ids = rows(model, 1, 12, seed=3)
    out = []
    for fast in (True, False):
        p = make_predictor("preattention", model, cal, 1)
        p.fast_decode = fast
        out.append(forward_logits(model, ids, PredictionHook(p, speculate=True), stepwise=True))
        assert (p._step is not None) == fast
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)


def test_the_fast_path_outlives_inference_mode(tmp_path):
    """DecodeStep's buffers are built inside the first decode step, under inference_mode; a
    later sequence run outside it (no_grad, as here, or with autograd on) must still work."""
    model = load_model(make_checkpoint(tmp_path / "m", model_type="qwen3_moe"))
    fast, ref = random_predictors(model, 1)
    with torch.inference_mode():
        side_by_side(model, fast, ref, prompt_len=1, steps=3)
    got = side_by_side(model, fast, ref, prompt_len=1, steps=3)  # the hook resets both
    assert all(torch.equal(a.ids, b.ids) for _, _, a, b in got)


@pytest.mark.parametrize("policy", ["speculative+preattention", "prefetch+preattention+lru"])
def test_offloaded_decode_with_it_reads_the_host_once_per_layer(tmp_path, policy, monkeypatch):
    """The fast path adds no host-device sync: a decode step offloaded with the pre-attention
    predictor reads to the host once per layer (the layer's ids, with the guess's ids and
    sureness in the same read) and once for the sampled token, as with Router-PF
    (tests/test_offload.py). Counted on the CPU by wrapping every call that turns a tensor into
    host values; on CUDA each of them would synchronise."""
    from tinymoe import generate
    from tinymoe.offload.link import LinkSpec
    from tinymoe.offload.runtime import OffloadRuntime

    model = load_model(make_checkpoint(tmp_path / "m", model_type="qwen3_moe"))
    fast, _ = random_predictors(model, 1)
    L, n = model.cfg.num_layers, 5
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "numpy")
    calls = count_host_reads(monkeypatch, names)

    counting: list[bool] = []

    def start_counting_after_prefill(tok: int) -> None:
        if not counting:  # the prompt's token: the decode steps start
            counting.append(True)
            calls.update(dict.fromkeys(calls, 0))

    with OffloadRuntime(model, policy, predictor=fast, link=LinkSpec(1e6, 0.0)):
        generate(model, [5, 17, 3, 42, 8, 61], n, eos_ids=(), on_token=start_counting_after_prefill)
    assert fast._step is not None  # the decode steps took the fast path
    reads = calls.pop("tolist")
    assert calls == {**dict.fromkeys(calls, 0), "item": n - 1}, calls
    if policy.startswith("speculative"):
        # a last layer run on a sure guess has no read of its own (its ids came with the layer
        # before's, and it guesses nothing further): L - 1 or L reads a step
        assert (n - 1) * (L - 1) <= reads <= (n - 1) * L, reads
    else:
        assert reads == (n - 1) * L, reads


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["olmoe-clip", "qwen3"])
def test_the_fast_path_on_cuda_is_the_reference_and_never_syncs(tmp_path, case):
    """On a GPU (in fp32, TF32 off): DecodeStep's guesses are the reference's, as on the CPU,
    and once built it makes no host-device sync (CUDA's sync debug mode raises on one)."""
    overrides, lookahead, prompt_len = FAST_CASES[case]
    model = load_model(make_checkpoint(tmp_path / "m", **overrides), device="cuda")
    fast, ref = random_predictors(model, lookahead)
    inner = fast.observe

    def strict(layer, resid, u, routing):
        if fast._step is None:
            return inner(layer, resid, u, routing)  # the first call builds it (copies allowed)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(layer, resid, u, routing)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    fast.observe = strict
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = side_by_side(model, fast, ref, prompt_len, steps=20)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert fast._step is not None and got
    for step, layer, a, b in got:
        assert torch.equal(a.ids, b.ids), (step, layer, a.ids, b.ids)
        assert torch.equal(a.sure, b.sure), (step, layer)
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-4, atol=1e-5)
