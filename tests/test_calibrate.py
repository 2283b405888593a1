"""Calibration (calibrate.py, speculation/estimator.py, speculation/calibration.py): default
vectors, estimator training, the files."""

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_TEXT, add_tokenizer, make_checkpoint

from tinymoe import TinyMoeError, load_model
from tinymoe.calibrate import (
    CalibrationSettings,
    calibrate,
    cli,
    default_vectors,
    quasi_pairs,
    record_exact_run,
)
from tinymoe.corpus import read_token_ids
from tinymoe.engine.experts import expert_forward
from tinymoe.engine.tokenizer import load_tokenizer
from tinymoe.speculation.calibration import (
    FORMAT_VERSION,
    META_FILE,
    TENSORS_FILE,
    load_speculation,
    save_speculation,
)
from tinymoe.speculation.estimator import EstimatorConfig, build_estimator, mean_kl, train_estimator
from tinymoe.speculation.predictors import make_predictor

SETTINGS = CalibrationSettings(lookaheads=(1, 2), steps=20, batch_size=32, val_fraction=0.25)


def write_text(path: Path, sentences: int = 300, seed: int = 0) -> Path:
    """Sentences of the baby tokenizer's words in random order."""
    rng = random.Random(seed)
    words = " ".join(TOKENIZER_TEXT).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(sentences)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    return add_tokenizer(make_checkpoint(tmp_path_factory.mktemp("cal") / "baby"))


def token_rows(model, B=8, T=16, seed=0):
    return torch.randint(
        0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed)
    )


def test_default_vectors_are_mean_expert_outputs(baby):
    model = load_model(baby)
    run = record_exact_run(model, token_rows(model), batch=3)
    dv = default_vectors(run)
    cfg = model.cfg
    assert dv.shape == (cfg.num_layers, cfg.num_experts, cfg.hidden_size)
    assert int(run.expert_count.sum()) == cfg.num_layers * 8 * 16 * cfg.top_k
    layer = 1
    with torch.no_grad():  # recompute layer 1's default vectors from scratch, from r_1
        u = model.layers[layer].post_attention_layernorm(run.resid[layer])
        for e in range(cfg.num_experts):
            rows = (run.ids[layer] == e).any(-1)
            if rows.any():
                y = expert_forward(model.experts.weights[layer][e], u[rows], cfg.expert_dim)
                torch.testing.assert_close(dv[layer, e], y.mean(0), atol=1e-5, rtol=1e-4)
            else:
                assert not dv[layer, e].any()


def test_estimator_training_lowers_kl_on_held_in_data(baby):
    model = load_model(baby)
    run = record_exact_run(model, token_rows(model))
    pairs = quasi_pairs(model, default_vectors(run), run, 1)
    cfg = model.cfg
    for kind in ("estimator", "linear"):
        torch.manual_seed(0)
        est = build_estimator(EstimatorConfig(kind, cfg.hidden_size, cfg.num_experts, 3))
        if kind == "linear":  # from zero, so that there is something to learn
            est.weight.data.zero_()
        before = sum(mean_kl(est, pairs).values())
        losses = train_estimator(est, pairs, steps=80, batch_size=64, lr=5e-3)
        after = sum(mean_kl(est, pairs).values())
        assert len(losses) == 80
        assert after < 0.5 * before, (kind, before, after)


def test_calibration_files_round_trip(baby, tmp_path):
    model = load_model(baby)
    cal = calibrate(model, token_rows(model), SETTINGS)
    save_speculation(cal, tmp_path)
    loaded = load_speculation(tmp_path, model.cfg)
    assert torch.equal(loaded.default_vectors, cal.default_vectors)
    assert torch.equal(loaded.expert_counts, cal.expert_counts)
    kinds = ("estimator", "linear", "context", "preattention")
    assert set(loaded.estimators) == {(k, d) for k in kinds for d in (1, 2)}
    for key, est in cal.estimators.items():
        a, b = est.state_dict(), loaded.estimators[key].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.hybrid_layers == cal.hybrid_layers
    assert loaded.meta["val_recall_at_k"] == cal.meta["val_recall_at_k"]
    rates = cal.meta["val_recall_at_k"]["1"]
    assert set(rates) == {
        "router",
        "router-nodefault",
        "linear-estimator",
        "estimator",
        "context",
        "preattention",
    }
    assert rates["router"][0] is None and 0 <= rates["router"][1] <= 1
    # The loaded files predict exactly what the in-memory calibration predicts.
    x = torch.randn(5, model.cfg.hidden_size)
    routing = model.layers[0].mlp.route(model.layers[0].post_attention_layernorm(x))
    for name in ("router", "estimator", "linear-estimator", "hybrid"):
        a = make_predictor(name, model, cal, 2).observe(0, x, x, routing)
        b = make_predictor(name, model, loaded, 2).observe(0, x, x, routing)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)


def test_load_speculation_errors(baby, tmp_path):
    assert load_speculation(tmp_path) is None  # no files: the runtime falls back to d_l = 0
    model = load_model(baby)
    cal = calibrate(model, token_rows(model), SETTINGS)
    save_speculation(cal, tmp_path)
    other = make_checkpoint(tmp_path / "wide", hidden_size=48)
    with pytest.raises(TinyMoeError, match="default_vectors has shape"):
        load_speculation(tmp_path, load_model(other).cfg)
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(TinyMoeError, match="speculation.safetensors: missing"):
        load_speculation(tmp_path)
    save_speculation(cal, tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(TinyMoeError, match="not a valid speculation metadata"):
        load_speculation(tmp_path)


def test_load_speculation_refuses_another_format_version(baby, tmp_path):
    model = load_model(baby)
    save_speculation(calibrate(model, token_rows(model), SETTINGS), tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    for version in (FORMAT_VERSION + 1, None):
        meta["format_version"] = version
        (tmp_path / META_FILE).write_text(json.dumps(meta))
        with pytest.raises(TinyMoeError) as e:
            load_speculation(tmp_path, model.cfg)
        message = str(e.value)
        assert str(tmp_path / META_FILE) in message and f"{version!r} is not supported" in message
        assert f"reads version {FORMAT_VERSION}" in message


def test_read_token_ids(baby, tmp_path):
    text = write_text(tmp_path / "t.txt")
    ids = read_token_ids(baby, text, tokens=100, seq_len=16)
    assert ids.shape == (6, 16) and ids.dtype == torch.long
    everything = load_tokenizer(baby).encode(text.read_text()).ids
    assert ids[0].tolist() == everything[:16] and ids[-1].tolist() == everything[-16:]  # spread
    with pytest.raises(TinyMoeError, match="fewer than one --seq-len"):
        read_token_ids(baby, write_text(tmp_path / "short.txt", sentences=1), 100, 16)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(TinyMoeError, match="not UTF-8"):
        read_token_ids(baby, tmp_path / "bin.txt", 100, 16)


def test_cli_writes_calibration(baby, tmp_path, capsys):
    text = write_text(tmp_path / "cal.txt")
    out = tmp_path / "out"
    argv = ["--model", str(baby), "--text", str(text), "--out", str(out), "--tokens", "256"]
    argv += ["--seq-len", "32", "--lookahead", "1,2", "--estimator-steps", "5"]
    assert cli(argv) == 0
    stdout = capsys.readouterr().out
    assert "lookahead 2: recall@k" in stdout
    meta = json.loads((out / META_FILE).read_text())
    assert meta["tokens"] == 256 and meta["command"].startswith("tinymoe calibrate")
    assert load_speculation(out, load_model(baby).cfg) is not None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text", "/nonexistent.txt"], "--text /nonexistent.txt: no such file"),
        (["--text", "{text}", "--lookahead", "3"], "--lookahead 3: must be between 1 and 2"),
        (["--text", "{text}", "--tokens", "8"], "--tokens (8) must be at least --seq-len"),
    ],
)
def test_cli_one_line_errors(baby, tmp_path, capsys, extra, message):
    text = write_text(tmp_path / "cal.txt")
    argv = ["--model", str(baby), "--seq-len", "32"] + [a.format(text=text) for a in extra]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_cli_missing_model(tmp_path, capsys):
    assert cli(["--model", str(tmp_path / "nope"), "--text", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
