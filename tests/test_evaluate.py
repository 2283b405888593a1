"""Evaluation (evaluate.py, speculation/scoring.py): the JSON it reports, exactness of scoring,
one forward per window against the stepwise definition, and the command line."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import add_tokenizer, make_checkpoint
from test_calibrate import SETTINGS, write_text

from tinymoe import load_model
from tinymoe.calibrate import calibrate
from tinymoe.evaluate import ALL_NAMES, HIDDEN, cli, evaluate
from tinymoe.speculation.calibration import load_speculation, save_speculation
from tinymoe.speculation.predictors import RouterPredictor
from tinymoe.speculation.scoring import ScoringHook, forward_logits


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A baby checkpoint with a tokenizer and speculation files."""
    path = add_tokenizer(make_checkpoint(tmp_path_factory.mktemp("ev") / "baby"))
    model = load_model(path)
    ids = torch.randint(
        0, model.cfg.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0)
    )
    save_speculation(calibrate(model, ids, SETTINGS), path)
    return path


def held_out(model, B=3, T=10):
    return torch.randint(
        0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(9)
    )


FAILS_SAFE = ("context", "preattention")  # their guesses say when they are unsure


def test_evaluate_reports_every_predictor_and_layer(calibrated):
    model = load_model(calibrated)
    cal = load_speculation(calibrated, model.cfg)
    result = evaluate(model, held_out(model), cal, list(ALL_NAMES), (1, 2))
    result = json.loads(json.dumps(result))  # what --json prints
    assert {"tokens", "sequences", "seq_len", "lookaheads", "hit_rates", "speculative"} <= set(
        result
    )
    assert set(result["hit_rates"]) == set(ALL_NAMES)
    for name, by_d in result["hit_rates"].items():
        for d in ("1", "2"):
            m = by_d[d]
            safe = {"fail_safe_recall", "fallback"} if name in FAILS_SAFE else set()  # fails safe
            assert set(m) == {"recall", "top1", "mean_recall", "mean_top1"} | safe
            assert len(m["recall"]) == 3 and m["recall"][: int(d)] == [None] * int(d)
            assert all(0 <= r <= 1 for r in m["recall"][int(d) :]), name
            assert m["mean_top1"] <= 1
    spec = result["speculative"]
    assert set(spec) == ({"exact"} | set(ALL_NAMES)) - {HIDDEN}
    assert spec["exact"]["perplexity"] > 1
    for name in set(spec) - {"exact"}:
        for d in ("1", "2"):
            m = spec[name][d]
            safe = {"fallback"} if name in FAILS_SAFE else set()
            assert set(m) == {"perplexity", "top1_agreement", "kl"} | safe
            assert 0 <= m["top1_agreement"] <= 1 and m["kl"] >= 0


def test_scoring_leaves_the_model_exact(calibrated):
    model = load_model(calibrated)
    ids = held_out(model)
    plain = forward_logits(model, ids, None, stepwise=True)
    predictors = {("router", 1): RouterPredictor(model, None, 1), (HIDDEN, 1): None}
    predictors[(HIDDEN, 1)] = RouterPredictor(model, None, 1)
    for stepwise in (True, False):
        hook = ScoringHook(model, predictors, {HIDDEN})
        torch.testing.assert_close(forward_logits(model, ids, hook, stepwise), plain)
    # and decoding position by position matches one full forward
    torch.testing.assert_close(plain, forward_logits(model, ids, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe", "mixtral"])
def test_one_forward_per_window_equals_the_stepwise_definition(tmp_path, model_type):
    """Every predictor, lookaheads 1 and 2, hit rates and speculation: the default evaluation
    (one forward per window, speculating at every position) against decoding's definition
    (one position at a time through a KV cache), on a 4-layer baby model."""
    path = make_checkpoint(tmp_path / model_type, model_type=model_type, num_layers=4)
    model = load_model(path)
    save_speculation(calibrate(model, held_out(model, B=8, T=16), SETTINGS), path)
    cal = load_speculation(path, model.cfg)
    ids = held_out(model, B=3, T=12)
    args = (model, ids, cal, list(ALL_NAMES), (1, 2))
    windows, stepwise = evaluate(*args), evaluate(*args, stepwise=True)
    assert not windows["stepwise"] and stepwise["stepwise"]
    for name, by_d in stepwise["hit_rates"].items():
        for d, want in by_d.items():
            got = windows["hit_rates"][name][d]
            for metric in ("recall", "top1"):
                pairs = [(g, w) for g, w in zip(got[metric], want[metric], strict=True) if w]
                assert all(abs(g - w) <= 0.005 for g, w in pairs), (name, d, metric)
    spec_w, spec_s = windows["speculative"], stepwise["speculative"]
    assert set(spec_w) == set(spec_s)
    exact = spec_w.pop("exact")["perplexity"]
    assert exact == pytest.approx(spec_s.pop("exact")["perplexity"], rel=1e-4)
    for name, by_d in spec_s.items():
        for d, want in by_d.items():
            got = spec_w[name][d]
            assert got["perplexity"] == pytest.approx(want["perplexity"], rel=0.005), (name, d)
            for metric in ("top1_agreement", "kl"):
                assert got[metric] == pytest.approx(want[metric], abs=0.005), (name, d, metric)
    # Speculation changed something, so the comparison above was not between two exact runs.
    assert spec_s["previous-token"]["1"]["kl"] > 0.01 and spec_s["router"]["1"]["kl"] > 0.001


def test_router_on_the_true_hidden_state_is_perfect_without_attention(tmp_path):
    """With every attention output zeroed, layer t's input is h_{t-1}: router-hidden at
    lookahead 1 must score recall 1 on every layer, and Router-PF without d_l must not."""
    model = load_model(make_checkpoint(tmp_path / "noattn"))
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
    result = evaluate(model, held_out(model), None, [HIDDEN, "router-nodefault"], (1,), False)
    assert result["hit_rates"][HIDDEN]["1"]["recall"][1:] == [1.0, 1.0]
    assert result["hit_rates"]["router-nodefault"]["1"]["mean_recall"] < 1.0


def test_cli_json_and_table(calibrated, tmp_path, capsys):
    text = write_text(tmp_path / "held.txt", seed=1)
    base = ["--model", str(calibrated), "--text", str(text), "--tokens", "64", "--seq-len", "16"]
    assert cli([*base, "--lookahead", "1", "--json", "--predictors", "router,hybrid"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["hit_rates"]) == {"router", "hybrid"}
    assert result["speculative"]["hybrid"]["1"]["perplexity"] > 1
    assert cli([*base, "--lookahead", "2", "--skip-speculative"]) == 0
    out = capsys.readouterr().out
    assert "recall@k per predicted layer, lookahead 2" in out and "previous-token" in out


def test_cli_plot(calibrated, tmp_path, capsys):
    text = write_text(tmp_path / "held.txt", seed=1)
    png = tmp_path / "hit.png"
    argv = ["--model", str(calibrated), "--text", str(text), "--tokens", "32", "--seq-len", "16"]
    argv += ["--lookahead", "1", "--skip-speculative", "--predictors", "router", "--plot", str(png)]
    rc = cli(argv)
    if importlib.util.find_spec("matplotlib") is None:
        err = capsys.readouterr().err
        assert rc == 2 and "error: --plot needs matplotlib" in err
    else:
        assert rc == 0 and png.stat().st_size > 0


def test_cli_errors(calibrated, tmp_path, capsys):
    text = write_text(tmp_path / "held.txt")
    base = ["--model", str(calibrated), "--text", str(text), "--seq-len", "16"]
    assert cli([*base, "--lookahead", "3"]) == 2
    assert "error: --lookahead 3: must be below the number of layers (3)" in capsys.readouterr().err
    bare = add_tokenizer(make_checkpoint(tmp_path / "bare"))  # no speculation files
    assert cli(["--model", str(bare), "--text", str(text), "--predictors", "estimator"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `tinymoe calibrate" in err[0]
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        cli([*base, "--predictors", "magic"])
    assert e.value.code == 2 and "unknown predictor 'magic'" in capsys.readouterr().err
