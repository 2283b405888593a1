"""The router-pf exercise: the quasi-hidden state, the paper's contribution.

It runs on the demo model (trained, with calibration files) over held-out text, because a
random model's routing has nothing to predict. (Speculative execution: speculative_checks.py;
the learned estimator: distillation_checks.py.)
"""

import functools
import json

import torch
from torch import Tensor

from tinymoe.calibrate import router_recall
from tinymoe.engine.moe import Routing
from tinymoe.exercises.exercise import (
    Exercise,
    expect,
    expect_close,
    expect_tensor,
    patched,
    targets,
)
from tinymoe.exercises.fixtures import (
    DEMO,
    baby_model,
    demo_calibration,
    demo_exact_run,
    demo_model,
    randn,
    random_routing,
    router_predictor,
)
from tinymoe.exercises.offload_checks import same_as_engine
from tinymoe.speculation.predictors import quasi_hidden

# ---------------------------------------------------------------- router-pf


def _routing(n: int, seed: int = 0, experts: int = 32, k: int = 4) -> Routing:
    return random_routing(n, experts, k, torch.Generator().manual_seed(seed))


def _same_q(code, model, default_vectors, r: Tensor, cases: list, what: str, **tol) -> None:
    """The student's q_l equals the engine's for each (layer, target, routing) of `cases`."""
    for layer, target, routing in cases:
        with torch.no_grad():
            got = code.quasi_hidden(model, default_vectors, layer, target, r, routing)
            want = quasi_hidden(model, default_vectors, layer, target, r, routing)
        expect_close(got, want, f"{what} (layer {layer}, target {target})", **tol)


def check_qh_shape(code) -> str:
    model, D = demo_model(), demo_model().cfg.hidden_size
    q = code.quasi_hidden(model, demo_calibration().default_vectors, 2, 3, randn(5, D), _routing(5))
    expect_tensor(q, "q_l", (5, D), torch.float32)
    return "(N, D) in the activations' dtype"


def check_qh_no_vectors(code) -> str:
    r = randn(5, demo_model().cfg.hidden_size, seed=1)
    cases = [(0, 1, _routing(5)), (2, 5, _routing(5))]
    _same_q(code, demo_model(), None, r, cases, "q_l without default vectors")
    return "d_l = 0: a norm of r_l alone"


def check_qh_values(code) -> str:
    r = randn(6, demo_model().cfg.hidden_size, seed=2)
    cases = [(layer, target, _routing(6, seed=layer)) for layer, target in ((0, 1), (3, 4), (1, 4))]
    dv = demo_calibration().default_vectors
    _same_q(code, demo_model(), dv, r, cases, "q_l", atol=1e-4, rtol=1e-4)
    return "d_l from the routing weights and layer l's default vectors, lookaheads 1 and 3"


def check_qh_bf16(code) -> str:
    """Mixtral's convention: bf16 activations and vectors, routing weights in fp32."""
    model = baby_model("mixtral", seed=3).to(torch.bfloat16)
    cfg = model.cfg
    dv = (0.5 * randn(cfg.num_layers, cfg.num_experts, cfg.hidden_size, seed=4)).to(torch.bfloat16)
    r = randn(6, cfg.hidden_size, seed=5, dtype=torch.bfloat16)
    rt = _routing(6, seed=6, experts=cfg.num_experts, k=cfg.top_k)  # fp32 weights
    what = "q_l of bf16 activations with fp32 routing weights"
    _same_q(code, model, dv, r, [(0, 1, rt), (0, 2, rt)], what, atol=3e-2, rtol=3e-2)
    return "bf16 in, bf16 out, whatever the routing weights' dtype"


@functools.cache
def _recall(with_vectors: bool, quasi=quasi_hidden) -> tuple[float, ...]:
    """Recall@K of Router-PF (lookahead 1) per target layer 1..L-1 on the held-out exact run,
    as calibrate measures it, with `quasi` as the predictor's quasi-hidden state."""
    dv = demo_calibration().default_vectors if with_vectors else None
    with patched("tinymoe.speculation.predictors", "quasi_hidden", quasi), torch.no_grad():
        return tuple(router_recall(demo_model(), dv, demo_exact_run(), 1).values())


def check_qh_recall(code) -> str:
    want, bare = _recall(True), _recall(False)
    mine = _recall(True, code.quasi_hidden)
    for t, (got, ref) in enumerate(zip(mine, want, strict=True), 1):
        expect(
            got >= ref - 0.005,
            f"layer {t}: Router-PF with your q_l recalls {got:.3f} of "
            f"the true experts; the engine's reaches {ref:.3f}",
        )
    shipped = json.loads((DEMO / "speculation.json").read_text())["val_recall_at_k"]["1"]
    mean, n = sum(mine) / len(mine), len(mine)
    return (
        f"recall@4 {mean:.3f} over layers 1-{n} (without default vectors {sum(bare) / n:.3f}; "
        f"layer 1: {bare[0]:.2f} -> {mine[0]:.2f}); calibration measured "
        f"{sum(shipped['router'][1:]) / n:.3f} on its own held-out text"
    )


def check_qh_runtime(code) -> str:
    """The offloading runtime predicts with the student's q_l (RouterPredictor calls it)."""
    yours, notes = ("tinymoe.speculation.predictors", "quasi_hidden", code.quasi_hidden), []
    for policy in ("prefetch+router+lru", "speculative+router"):
        mine = same_as_engine(yours, policy, policy, predictor=router_predictor)
        notes.append(f"{policy} hit rate {mine['decode']['hit_rate']:.2f}")
    return "demo model, offloaded, 12 tokens: " + ", ".join(notes)


ROUTER_PF = Exercise(
    id="router-pf",
    title="Router-PF: predict the next layer's experts from the quasi-hidden state",
    concepts=(
        "the residual r_l before the MoE output",
        "default vectors",
        "q_l = Norm_t(r_l + d_l)",
        "recall@k",
    ),
    targets=targets("tinymoe.speculation.predictors:quasi_hidden"),
    minutes=30,
    prerequisites=("routing", "moe-layer"),
    checks=(
        ("shape", check_qh_shape),
        ("without default vectors", check_qh_no_vectors),
        ("with default vectors", check_qh_values),
        ("bf16 activations, fp32 routing weights", check_qh_bf16),
        ("recall on held-out text", check_qh_recall),
        ("the runtime on your q_l", check_qh_runtime),
    ),
    engine_checks=("recall on held-out text", "the runtime on your q_l"),
)
