"""The last exercise: a small estimator trained by distillation from the router (the paper's
learned predictor), on pairs (q_{t-1}, layer t's true router logits) from the demo model's
exact run over held-out text."""

import contextlib
import functools
import io

import torch

from tinymoe.calibrate import CalibrationSettings, calibrate
from tinymoe.exercises.exercise import (
    CheckFailed,
    Exercise,
    expect,
    expect_close,
    expect_tensor,
    expect_user_error,
    patched,
    targets,
)
from tinymoe.exercises.fixtures import (
    demo_calibration,
    demo_exact_run,
    demo_model,
    heldout_ids,
    randn,
)
from tinymoe.speculation.estimator import (
    EstimatorConfig,
    LinearEstimator,
    kl_to_router,
    mean_kl,
    train_estimator,
)
from tinymoe.speculation.predictors import quasi_hidden


def check_kl_values(code) -> str:
    p, q = 2 * randn(7, 32, seed=1), 2 * randn(7, 32, seed=2)
    got, want = code.kl_to_router(p, q), kl_to_router(p, q)
    expect_tensor(got, "kl_to_router(true, logits)", (7,), torch.float32)
    if torch.allclose(got, kl_to_router(q, p), atol=1e-5) and not torch.allclose(got, want):
        raise CheckFailed(
            "that is KL(estimator || router); distillation here minimises "
            "KL(router || estimator), the router's distribution first"
        )
    expect_close(got, want, "KL per token", atol=1e-5)
    expect(code.kl_to_router(p, p).abs().max().item() < 1e-5, "KL(p || p) should be 0")
    pb, qb = p.bfloat16(), q.bfloat16()
    hint = "compute it in fp32 whatever the logits' dtype"
    expect_close(code.kl_to_router(pb, qb), kl_to_router(pb, qb), "KL of bf16 logits", hint=hint)
    return "per-token KL(router || estimator) in nats, fp32"


@functools.cache
def _pairs() -> tuple[dict, dict]:
    """(q_{t-1}, true logits of layer t) for t = 1..L-1: 768 training tokens, 256 held out."""
    model, run = demo_model(), demo_exact_run()
    dv = demo_calibration().default_vectors
    train, val = {}, {}
    with torch.no_grad():
        for t in range(1, model.cfg.num_layers):
            q = quasi_hidden(model, dv, t - 1, t, run.resid[t - 1], run.routing(t - 1))
            logits = run.logits[t]
            train[t], val[t] = (q[:768], logits[:768]), (q[768:], logits[768:])
    return train, val


def _linear() -> LinearEstimator:
    cfg = demo_model().cfg
    ecfg = EstimatorConfig("linear", cfg.hidden_size, cfg.num_experts, cfg.num_layers)
    return LinearEstimator(ecfg).init_from_routers([b.mlp.gate.weight for b in demo_model().layers])


def _trained(train) -> tuple[LinearEstimator, list]:
    est = _linear()
    with contextlib.redirect_stderr(io.StringIO()):  # the engine's progress bar
        losses = train(est, _pairs()[0], steps=60, batch_size=128, lr=2e-3, seed=0)
    return est, losses


def _val_kl(estimator: LinearEstimator) -> float:
    """The held-out KL(router || estimator), averaged over the predicted layers."""
    per_layer = mean_kl(estimator, _pairs()[1])
    return sum(per_layer.values()) / len(per_layer)


@functools.cache
def _engine_val_kl() -> float:
    return _val_kl(_trained(train_estimator)[0])


def check_training(code) -> str:
    est, losses = _trained(code.train_estimator)
    expect(
        isinstance(losses, list)
        and len(losses) == 60
        and all(isinstance(x, float) for x in losses),
        "train_estimator should return one float loss per step (60 here)",
    )
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    expect(last < first, f"the training loss did not fall ({first:.4f} -> {last:.4f})")
    before, after = _val_kl(_linear()), _val_kl(est)
    want = _engine_val_kl()
    expect(
        after < before and after <= 1.1 * want + 1e-3,
        f"held-out KL {before:.4f} -> {after:.4f} after 60 steps; the engine's training "
        f"reaches {want:.4f} from the same start",
    )
    return f"held-out KL {before:.4f} -> {after:.4f} (engine's training: {want:.4f})"


def check_bad_steps(code) -> str:
    return expect_user_error(
        lambda: code.train_estimator(_linear(), _pairs()[0], steps=0), "steps=0"
    )


# Small enough for seconds on one thread: 12 windows to train on, 4 held back, 40 steps.
SETTINGS = CalibrationSettings(lookaheads=(1,), steps=40, batch_size=64, val_fraction=0.25)


def _calibrated(kl, train) -> dict:
    """tinymoe.calibrate's procedure on held-out windows with these KL and training functions:
    its held-out KLs ("val_kl": per estimator, before and after training)."""
    with (
        patched("tinymoe.speculation.estimator", "kl_to_router", kl),  # what mean_kl calls
        patched("tinymoe.calibrate", "train_estimator", train),
        contextlib.redirect_stderr(io.StringIO()),  # progress bars and notes
    ):
        return calibrate(demo_model(), heldout_ids(), SETTINGS).meta["val_kl"]


@functools.cache
def _engine_calibrated() -> dict:
    return _calibrated(kl_to_router, train_estimator)


def check_calibration(code) -> str:
    mine, ref = _calibrated(code.kl_to_router, code.train_estimator), _engine_calibrated()
    notes = []
    for name, want in ref.items():
        got = mine[name]
        before, after = got["val_kl_before"], got["val_kl_after"]
        expect(
            abs(before - want["val_kl_before"]) <= 1e-4 * want["val_kl_before"],
            f"{name}: the calibration tool measures a held-out KL of {before:.5f} before "
            f"training with your kl_to_router, {want['val_kl_before']:.5f} with the engine's",
        )
        expect(
            after <= 1.1 * want["val_kl_after"] + 1e-3,
            f"{name}: held-out KL {before:.4f} -> {after:.4f} after the calibration tool trained "
            f"with your train_estimator; the engine's reaches {want['val_kl_after']:.4f}",
        )
        notes.append(f"{name} {before:.3f} -> {after:.3f}")
    return "tinymoe.calibrate on your code, held-out KL: " + ", ".join(notes)


DISTILLATION = Exercise(
    id="distillation",
    title="A small estimator trained by distillation from the router",
    concepts=(
        "KL(router || estimator)",
        "AdamW with a cosine schedule",
        "the same share of every predicted layer per step",
        "held-out evaluation",
    ),
    targets=targets(
        "tinymoe.speculation.estimator:kl_to_router",
        "tinymoe.speculation.estimator:train_estimator",
    ),
    minutes=45,
    prerequisites=("router-pf",),
    checks=(
        ("the KL", check_kl_values),
        ("training", check_training),
        ("bad settings", check_bad_steps),
        ("the calibration tool on your code", check_calibration),
    ),
    engine_checks=("the calibration tool on your code",),
    given=("TinyMoeError",),  # what train_estimator raises for bad settings
)
