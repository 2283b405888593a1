"""The pre-attention predictor (speculation/preattention.py): layer t's attention, run early."""

import math

import pytest
import torch
from conftest import make_checkpoint

from tinymoe import load_model
from tinymoe.calibrate import CalibrationSettings, calibrate
from tinymoe.engine.moe import Routing
from tinymoe.speculation.calibration import load_speculation, save_speculation
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
