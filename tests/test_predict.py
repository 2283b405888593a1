"""Predictors (speculation/predictors.py): shapes, a hand-checked Router-PF, speculation with a
perfect guess, the one factory (oracle included)."""

import pytest
import torch
from conftest import make_checkpoint

from tinymoe import TinyMoeError, load_model
from tinymoe.engine.experts import expert_forward
from tinymoe.engine.moe import Routing
from tinymoe.speculation.calibration import Calibration
from tinymoe.speculation.estimator import EstimatorConfig, build_estimator
from tinymoe.speculation.hook import PredictionHook
from tinymoe.speculation.oracle import OraclePredictor
from tinymoe.speculation.predictors import (
    PREDICTOR_NAMES,
    EstimatorPredictor,
    HybridPredictor,
    PreviousTokenPredictor,
    RouterPredictor,
    make_predictor,
    quasi_hidden,
    recall_at_k,
)
from tinymoe.speculation.recording import RouteRecorder


class Recorder:
    """Route hook: the router decides; remember (resid, u, routing) per layer of the last pass."""

    def __init__(self):
        self.seen: dict[int, tuple] = {}

    def reset(self):
        self.seen.clear()

    def __call__(self, layer, resid, u, router):
        routing = router(u)
        self.seen[layer] = (resid.reshape(u.shape), u, routing)
        return routing


class Replay:
    """A perfect predictor: replays the routing a resident run recorded for the target layer."""

    def __init__(self, recorded: dict[int, Routing], num_layers: int, lookahead: int):
        self.recorded, self.num_layers, self.lookahead = recorded, num_layers, lookahead

    def reset(self):
        pass

    def observe(self, layer, resid, u, routing):
        t = layer + self.lookahead
        if t >= self.num_layers:
            return None
        r = self.recorded[t]
        return Routing(ids=r.ids.clone(), weights=r.weights.clone())


def fake_calibration(model, seed: int = 0) -> Calibration:
    """Random default vectors and untrained estimators: enough to exercise every predictor."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    dv = 0.1 * torch.randn(cfg.num_layers, cfg.num_experts, cfg.hidden_size, generator=g)
    estimators = {}
    for kind in ("estimator", "linear", "context", "preattention"):
        inputs = 3 if kind == "preattention" else 2
        D, E, L = cfg.hidden_size, cfg.num_experts, cfg.num_layers
        ecfg = EstimatorConfig(kind, D, E, L, inputs=inputs)
        for d in (1, 2, 3):
            torch.manual_seed(seed + d)
            estimators[(kind, d)] = build_estimator(ecfg)
    hybrid = {1: [1], 2: [3], 3: []}
    counts = torch.ones(cfg.num_layers, cfg.num_experts, dtype=torch.long)
    return Calibration(dv, counts, estimators, hybrid)


@pytest.fixture
def model4(tmp_path):
    return load_model(make_checkpoint(tmp_path / "m4", num_layers=4, model_type="mixtral"))


def run_recorded(model, ids):
    rec = Recorder()
    model.route_hook = rec
    logits = model(ids)
    model.route_hook = None
    return logits, rec.seen


@pytest.mark.parametrize("name", PREDICTOR_NAMES)
@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_predictor_output_shapes(model4, name, lookahead):
    cfg = model4.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    _, seen = run_recorded(model4, ids)
    p = make_predictor(name, model4, fake_calibration(model4), lookahead)
    assert p.lookahead == lookahead
    p.reset()
    for _ in range(2):  # twice: previous-token predicts only from the second pass on
        for layer in range(cfg.num_layers):
            resid, u, routing = seen[layer]
            pred = p.observe(layer, resid, u, routing)
            if layer + lookahead >= cfg.num_layers:
                assert pred is None
                continue
            if pred is None:
                assert name == "previous-token"
                continue
            assert pred.ids.shape == (10, cfg.top_k) and pred.ids.dtype == torch.long
            assert pred.weights.shape == (10, cfg.top_k) and pred.weights.dtype == u.dtype
            assert int(pred.ids.min()) >= 0 and int(pred.ids.max()) < cfg.num_experts
            assert all(len(set(row)) == cfg.top_k for row in pred.ids.tolist())  # distinct
            # Mixtral renormalises the top-k weights: predictions must too.
            torch.testing.assert_close(pred.weights.sum(-1), torch.ones(10))


def test_weights_follow_the_models_renormalisation_rule(tmp_path):
    model = load_model(make_checkpoint(tmp_path / "olmoe", model_type="olmoe"))  # no renorm
    _, seen = run_recorded(model, torch.arange(6).view(1, 6))
    resid, u, routing = seen[0]
    for name in ("router", "estimator"):
        pred = make_predictor(name, model, fake_calibration(model), 1).observe(0, resid, u, routing)
        sums = pred.weights.sum(-1)
        assert bool((sums < 1 - 1e-4).all()), f"{name}: weights were renormalised"


def test_router_predictor_is_exact_when_default_vectors_are_the_true_output(tmp_path):
    """Top-1 routing, one token, layer 1's attention zeroed: r_1 = h_0 exactly. With v[0, e]
    set to the routed expert's true output, d_0 is layer 0's MoE output and q_0 = u_1, so
    Router-PF must reproduce layer 1's true routing bit for bit."""
    path = make_checkpoint(tmp_path / "q", model_type="qwen3_moe", top_k=1)
    model = load_model(path)
    with torch.no_grad():
        model.layers[1].self_attn.o_proj.weight.zero_()
    _, seen = run_recorded(model, torch.tensor([[7]]))
    resid0, u0, routing0 = seen[0]
    _, u1, routing1 = seen[1]
    e = int(routing0.ids[0, 0])
    dv = torch.zeros(model.cfg.num_layers, model.cfg.num_experts, model.cfg.hidden_size)
    with torch.no_grad():
        dv[0, e] = expert_forward(model.experts.weights[0][e], u0, model.cfg.expert_dim)[0]
        q0 = quasi_hidden(model, dv, 0, 1, resid0, routing0)  # the definition, plainly
        reference = model.layers[1].mlp.route(q0)
        pred = RouterPredictor(model, dv, 1).observe(0, resid0, u0, routing0)
        h0 = resid0 + routing0.weights * dv[0, e]
        hidden = RouterPredictor(model, None, 1).observe(0, h0, u0, routing0)
    assert torch.equal(q0, u1)
    assert torch.equal(reference.ids, routing1.ids)
    assert torch.equal(reference.weights, routing1.weights)
    assert torch.equal(pred.ids, routing1.ids) and torch.equal(pred.weights, routing1.weights)
    assert torch.equal(hidden.ids, routing1.ids) and torch.equal(hidden.weights, routing1.weights)
    # Sanity: the default vector matters here (without it the router sees a different state).
    with torch.no_grad():
        logits_nodefault = model.layers[1].mlp.gate(
            model.layers[1].post_attention_layernorm(resid0)
        )
    assert not torch.allclose(logits_nodefault, routing1.logits)


def test_untrained_linear_estimator_is_router_pf(model4):
    cfg = model4.cfg
    ecfg = EstimatorConfig("linear", cfg.hidden_size, cfg.num_experts, cfg.num_layers)
    linear = build_estimator(ecfg).init_from_routers([b.mlp.gate.weight for b in model4.layers])
    dv = fake_calibration(model4).default_vectors
    _, seen = run_recorded(model4, torch.arange(12).view(2, 6))
    router, est = RouterPredictor(model4, dv, 2), EstimatorPredictor(model4, linear, dv, 2)
    for layer in range(cfg.num_layers - 2):
        a, b = router.observe(layer, *seen[layer]), est.observe(layer, *seen[layer])
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.weights, b.weights)


def test_hybrid_uses_the_estimator_only_on_its_layers(model4):
    cal = fake_calibration(model4)
    router = RouterPredictor(model4, cal.default_vectors, 1)
    est = EstimatorPredictor(model4, cal.estimator("estimator", 1), cal.default_vectors, 1)
    hybrid = HybridPredictor(router, est, {2})
    _, seen = run_recorded(model4, torch.arange(8).view(1, 8))
    for layer in range(3):
        expected = (est if layer + 1 == 2 else router).observe(layer, *seen[layer])
        assert torch.equal(hybrid.observe(layer, *seen[layer]).ids, expected.ids)


def test_previous_token_replays_the_last_pass():
    p = PreviousTokenPredictor(num_layers=3, lookahead=1)
    x = torch.zeros(4, 8)

    def routing(first):
        ids = torch.tensor([[first + i, first + i + 1] for i in range(4)])
        return Routing(ids=ids, weights=torch.full((4, 2), 0.5))

    # First pass (a 4-token prefill): no prediction.
    assert p.observe(0, x, x, routing(0)) is None
    assert p.observe(1, x, x, routing(10)) is None
    # Next pass with one token: layer 1's experts of the prefill's last token.
    pred = p.observe(0, x[:1], x[:1], Routing(torch.tensor([[5, 6]]), torch.ones(1, 2)))
    assert pred.ids.tolist() == [[13, 14]]
    # Same number of rows as the last pass: row by row (batched decode).
    p.reset()
    p.observe(1, x, x, routing(20))
    p.observe(2, x, x, routing(30))
    assert torch.equal(p.observe(1, x, x, routing(0)).ids, routing(30).ids)


@pytest.mark.parametrize("lookahead", [1, 2])
def test_speculation_with_a_perfect_predictor_equals_exact(model4, lookahead):
    ids = torch.randint(
        0, model4.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3)
    )
    exact, seen = run_recorded(model4, ids)
    recorded = {layer: routing for layer, (_, _, routing) in seen.items()}
    hook = PredictionHook(Replay(recorded, model4.cfg.num_layers, lookahead), speculate=True)
    model4.route_hook = hook
    with torch.no_grad():
        spec = model4(ids)
    assert set(hook.last_prediction) == set(range(lookahead, model4.cfg.num_layers))
    assert torch.equal(spec, exact)


@pytest.mark.parametrize("name", PREDICTOR_NAMES)
def test_exact_mode_is_bit_identical_with_every_predictor(model4, name):
    ids = torch.randint(
        0, model4.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        exact = model4(ids)
        model4.route_hook = PredictionHook(make_predictor(name, model4, fake_calibration(model4)))
        model4.route_hook.reset()
        assert torch.equal(model4(ids), exact)
        assert torch.equal(model4(ids), exact)  # second pass: previous-token now predicts too


def test_speculation_changes_the_output(model4):
    """The converse: with a wrong predictor, speculative mode really routes by the prediction."""
    ids = torch.arange(6).view(1, 6)
    with torch.no_grad():
        exact = model4(ids)
        model4.route_hook = PredictionHook(RouterPredictor(model4, None, 1), speculate=True)
        assert not torch.equal(model4(ids), exact)


def test_make_predictor_errors_and_warning(model4, capsys):
    with pytest.raises(TinyMoeError, match="unknown predictor 'magic'"):
        make_predictor("magic", model4, None)
    for name in ("estimator", "linear-estimator", "hybrid"):
        with pytest.raises(TinyMoeError, match="tinymoe.calibrate"):
            make_predictor(name, model4, None)
    with pytest.raises(TinyMoeError, match="lookahead must be between 1 and 3"):
        make_predictor("router", model4, None, lookahead=4)
    cal = fake_calibration(model4)
    del cal.estimators[("estimator", 2)]
    with pytest.raises(TinyMoeError, match="no estimator trained for lookahead 2"):
        make_predictor("hybrid", model4, cal, lookahead=2)
    p = make_predictor("router", model4, None)
    assert p.default_vectors is None
    assert "d_l = 0" in capsys.readouterr().err


def test_make_predictor_builds_the_oracle_from_a_recording(model4):
    ids = torch.arange(6).view(1, 6)
    with RouteRecorder().installed(model4) as recorder, torch.no_grad():
        model4(ids)
    with pytest.raises(TinyMoeError, match="'oracle' needs the recorded routing"):
        make_predictor("oracle", model4, None)
    with pytest.raises(TinyMoeError, match="lookahead must be between 1 and 3"):
        make_predictor("oracle", model4, None, 4, recording=recorder.forwards)
    with pytest.raises(TinyMoeError, match="lookahead must be between 1 and 3"):
        OraclePredictor(recorder.forwards, 4)  # also when built directly
    oracle = make_predictor("oracle", model4, None, 2, recording=recorder.forwards)
    assert isinstance(oracle, OraclePredictor) and oracle.lookahead == 2
    routing = recorder.forwards[0][0]
    predicted = oracle.observe(0, torch.zeros(6, 32), torch.zeros(6, 32), routing)
    assert torch.equal(predicted.ids, recorder.forwards[0][2].ids)


def test_recall_at_k():
    pred = torch.tensor([[0, 1], [2, 3], [4, 5]])
    true = torch.tensor([[1, 0], [3, 7], [8, 9]])
    assert recall_at_k(pred, true).tolist() == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("with_vectors", [True, False])
def test_router_predictor_is_quasi_hidden_then_the_target_router(
    tmp_path, model_type, with_vectors
):
    """observe() is the definition, bit for bit: quasi_hidden, then layer t's own router."""
    model = load_model(make_checkpoint(tmp_path / "m", model_type=model_type, num_layers=4))
    cal = fake_calibration(model) if with_vectors else None
    dv = cal.default_vectors if cal is not None else None
    _, seen = run_recorded(model, torch.arange(40).view(2, 20) % model.cfg.vocab_size)
    predictor = RouterPredictor(model, dv, 2)
    for layer in range(model.cfg.num_layers - 2):
        resid, u, routing = seen[layer]
        with torch.no_grad():
            q = quasi_hidden(model, predictor.default_vectors, layer, layer + 2, resid, routing)
            want = model.layers[layer + 2].mlp.route(q)
            got = predictor.observe(layer, resid, u, routing)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.weights, want.weights)
        assert got.logits is None  # a prediction, by the Routing convention


def test_estimator_predictions_weigh_like_the_model_router(tmp_path):
    """Mixtral scales expert outputs by fp32 routing weights; a prediction it runs speculatively
    must carry fp32 weights too (OLMoE and Qwen3 round them to the activation dtype)."""
    model = load_model(make_checkpoint(tmp_path / "m", model_type="mixtral"), dtype="bfloat16")
    cfg = model.cfg
    ecfg = EstimatorConfig("linear", cfg.hidden_size, cfg.num_experts, cfg.num_layers)
    linear = build_estimator(ecfg).init_from_routers([b.mlp.gate.weight for b in model.layers])
    _, seen = run_recorded(model, torch.arange(6).view(1, 6))
    est = EstimatorPredictor(model, linear, None, 1)
    assert seen[0][2].weights.dtype == torch.float32  # the model's own router
    assert est.observe(0, *seen[0]).weights.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_vectors", [False, True])
def test_guess_ids_names_the_experts_observe_names(tmp_path, dtype, with_vectors):
    """The fast path exact prefetch runs (guess_ids: the norm's gain folded into the router, d_l
    projected through it) against the definition (observe), over every (token, layer) of a run.
    In fp32 only rounding separates them: the same experts in the same order. In bf16 the
    definition rounds q and its logits to bf16 first, so near-ties may rank differently: the
    same set for nearly every token, and the same recall of the true routing."""
    model = load_model(make_checkpoint(tmp_path / "m", num_layers=4), dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gains far from 1, some negative: folding them in must matter
        for block in model.layers:
            w = block.post_attention_layernorm.weight
            w.copy_(torch.randn(w.shape, generator=g) * 2)
    dv = fake_calibration(model).default_vectors if with_vectors else None
    _, seen = run_recorded(model, torch.arange(96).view(2, 48) % model.cfg.vocab_size)
    predictor = RouterPredictor(model, dv, 1)
    same_order = same_set = total = 0
    recall = {"observe": [], "guess_ids": []}
    for layer in range(model.cfg.num_layers - 1):
        with torch.no_grad():
            want = predictor.observe(layer, *seen[layer]).ids  # (N, K)
            got = predictor.guess_ids(layer, *seen[layer])
        assert got.weights is None and got.ids.shape == want.shape
        resid, u, routing = seen[layer]
        for i in range(0, resid.shape[0], 12):  # one token at a time: a decode step's own path
            one = Routing(routing.ids[i : i + 1], routing.weights[i : i + 1])
            with torch.no_grad():
                alone = predictor.guess_ids(layer, resid[i : i + 1], u[i : i + 1], one).ids
            same_alone = torch.equal(alone, got.ids[i : i + 1])
            assert (
                same_alone
                or dtype == "bfloat16"
                and set(alone[0].tolist()) == set(got.ids[i].tolist())
            )
        same_order += int((got.ids == want).all(-1).sum())
        same_set += int((got.ids.sort(-1).values == want.sort(-1).values).all(-1).sum())
        total += want.shape[0]
        true = seen[layer + 1][2].ids
        recall["observe"].append(recall_at_k(want, true))
        recall["guess_ids"].append(recall_at_k(got.ids, true))
    if dtype == "float32":
        assert same_order == total
    else:
        assert same_set >= 0.95 * total
        r = {k: torch.cat(v).mean().item() for k, v in recall.items()}
        assert abs(r["guess_ids"] - r["observe"]) <= 0.02
