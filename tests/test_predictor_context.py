"""The context predictor and fail-safe speculation (speculation/context.py, hook.fail_safe)."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from tinymoe import load_model
from tinymoe.calibrate import CalibrationSettings, calibrate
from tinymoe.corpus import render_man
from tinymoe.speculation.calibration import load_speculation, save_speculation
from tinymoe.speculation.context import ContextPredictor, Guess, choose_threshold, margin
from tinymoe.speculation.hook import PredictionHook, read_together
from tinymoe.speculation.predictors import make_predictor, quasi_hidden
from tinymoe.speculation.scoring import forward_logits

SETTINGS = CalibrationSettings(lookaheads=(1, 2), steps=20, batch_size=32, val_fraction=0.25)
DEMO = Path(__file__).resolve().parents[1] / "weights" / "pydoc-moe"


def rows(model, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.vocab_size, (B, T), generator=g)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ctx") / "m", num_layers=4)
    model = load_model(path)
    save_speculation(calibrate(model, rows(model, 8, 16), SETTINGS), path)
    return path


def test_margin_and_threshold_choice():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.5], [4.0, 3.9, 3.8, 0.0]])
    assert margin(logits, 2).tolist() == pytest.approx([1.0, 0.1], abs=1e-6)
    conf = torch.tensor([0.1, 0.2, 0.3, 0.4])
    recall = torch.tensor([0.0, 0.5, 1.0, 1.0])
    assert choose_threshold(conf, recall, 0.6) == -math.inf  # mean 0.625: nobody falls back
    assert choose_threshold(conf, recall, 0.8) == pytest.approx(0.2)  # (1 + 0.5 + 2) / 4 = 0.875
    assert choose_threshold(conf, recall, 0.9) == pytest.approx(0.3)  # (2 + 2) / 4 = 1
    assert choose_threshold(conf, torch.zeros(4), 1.0) == math.inf  # every token falls back


def set_thresholds(cal, value):
    for (kind, _), est in cal.estimators.items():
        if kind == "context":
            est.threshold.fill_(value)


@pytest.mark.parametrize("lookahead", [1, 2])
def test_unsure_everywhere_is_exact_and_sure_everywhere_is_not(calibrated, lookahead):
    """Fail-safe speculation bounds the cost by design: with every guess unsure it is exact."""
    model = load_model(calibrated)
    cal = load_speculation(calibrated, model.cfg)
    ids = rows(model, 3, 10, seed=1)
    exact = forward_logits(model, ids, None, stepwise=True)
    set_thresholds(cal, math.inf)
    hook = PredictionHook(make_predictor("context", model, cal, lookahead), speculate=True)
    torch.testing.assert_close(forward_logits(model, ids, hook, stepwise=True), exact)
    assert hook.fallback_share() == 1.0
    set_thresholds(cal, -math.inf)
    hook = PredictionHook(make_predictor("context", model, cal, lookahead), speculate=True)
    assert not torch.allclose(forward_logits(model, ids, hook, stepwise=True), exact, atol=1e-4)
    assert hook.fallback_share() == 0.0


def test_calibrated_thresholds_reach_the_target_on_held_back_pairs(calibrated):
    model = load_model(calibrated)
    cal = load_speculation(calibrated, model.cfg)
    for d in ("1", "2"):
        for t, f in cal.meta["fail_safe"][d].items():
            assert f["fail_safe_recall"] >= SETTINGS.fail_safe_recall - 1e-9, (d, t)
            assert 0 <= f["fallback"] <= 1 and f["recall"] <= f["fail_safe_recall"] + 1e-9
            assert cal.estimator("context", int(d)).threshold[int(t)].item() == f["threshold"]


def test_previous_token_state_is_what_it_reads(calibrated):
    """A decode step after a prefill reads the prompt's last token's state at the target layer;
    a sequence's first pass reads zeros; reset forgets."""
    model = load_model(calibrated)
    cal = load_speculation(calibrated, model.cfg)
    p = make_predictor("context", model, cal, 1)
    assert isinstance(p, ContextPredictor) and p.reads_previous_position
    seen = []
    model.route_hook = lambda layer, r, u, router: (
        seen.append((layer, r, u, router(u))) or seen[-1][3]
    )
    model(rows(model, 1, 5))
    prompt = {layer: r.reshape(u.shape).clone() for layer, r, u, _ in seen}
    seen.clear()
    model(rows(model, 1, 1, seed=3))
    model.route_hook = None
    p.reset()
    p.previous.update(prompt)  # as if the prompt (5 tokens) had been observed
    layer, r, u, g = seen[0]  # the decode step's layer 0 (1 token)
    r = r.reshape(u.shape)
    guess = p.observe(layer, r, u, g)
    est = cal.estimator("context", 1)
    q = quasi_hidden(model, p.default_vectors, 0, 1, r, g)
    prev = model.layers[1].post_attention_layernorm(prompt[1][-1:])
    want = est(torch.cat([q, prev], -1), 1).topk(model.cfg.top_k).indices
    assert torch.equal(guess.ids, want)  # the estimator on [q, Norm_1(prompt's last r_1)]
    p.reset()
    fresh = p.observe(layer, r, u, g)
    zeros = est(torch.cat([q, torch.zeros_like(q)], -1), 1).topk(model.cfg.top_k).indices
    assert torch.equal(fresh.ids, zeros)


def test_sureness_is_read_with_the_ids_in_one_read():
    a = Guess(ids=torch.tensor([[1, 2]]), weights=None, sure=torch.tensor([True]))
    b = Guess(ids=torch.tensor([[3, 4]]), weights=None, sure=torch.tensor([False]))
    read_together(a, b)
    assert a.host_ids == [[1, 2]] and b.host_ids == [[3, 4]] and b.host_sure == [False]
    c = Guess(ids=torch.tensor([[5, 6], [7, 8]]), weights=None, sure=torch.tensor([False, True]))
    assert c.ids_on_host() == [[5, 6], [7, 8]] and c.sure_on_host() == [False, True]


def test_shipped_demo_calibration_has_the_context_predictor():
    cal = load_speculation(DEMO)
    for d in (1, 2, 3):
        est = cal.estimator("context", d)
        assert torch.isfinite(est.threshold[d:]).all()  # calibrate chose every predicted layer's
    assert {("estimator", 1), ("linear", 1)} <= set(cal.estimators)  # the paper's still there


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff renders man pages")
def test_render_man_drops_header_and_footer(tmp_path):
    page = tmp_path / "demo.1"
    page.write_text(
        '.TH DEMO 1 "2026" "demo 1.0" "Demo Manual"\n.SH NAME\ndemo \\- a page\n'
        ".SH DESCRIPTION\nThe demo command prints nothing.\n"
    )
    text = render_man(page)
    assert "The demo command prints nothing." in text and "NAME" in text
    assert "Demo Manual" not in text and "DEMO(1)" not in text
