"""Exercises on the forward pass around the experts: norms and rotary angles, and routing."""

import torch
from torch import Tensor

from tinymoe.engine import model as engine
from tinymoe.engine import moe as engine_moe
from tinymoe.exercises.exercise import (
    Exercise,
    expect,
    expect_close,
    expect_equal,
    expect_tensor,
    targets,
)
from tinymoe.exercises.fixtures import baby_config, randn, whole_model_check

ARCHS = ("mixtral", "olmoe", "qwen3_moe")


# ---------------------------------------------------------------- norm-rope


def _rmsnorms(code, x: Tensor) -> tuple[Tensor, Tensor]:
    """The student's RMSNorm and the engine's, with the same weights (not 1), applied to x."""
    mine, ref = code.RMSNorm(48, 1e-6), engine.RMSNorm(48, 1e-6)
    with torch.no_grad():
        mine.weight.copy_(0.5 + torch.rand(48, generator=torch.Generator().manual_seed(2)))
        ref.weight.copy_(mine.weight)
    return mine.to(x.dtype)(x), ref.to(x.dtype)(x)


def check_rms_normalize(code) -> str:
    x = 3 * randn(2, 5, 48)
    expect_close(code.rms_normalize(x, 1e-6), engine.rms_normalize(x, 1e-6), "rms_normalize(x)")
    xb = x.to(torch.bfloat16)
    got, want = code.rms_normalize(xb, 1e-6), engine.rms_normalize(xb, 1e-6)
    hint = "computed in fp32, returned in x's dtype (rounded once)"
    expect_equal(got, want, "rms_normalize(x) in bf16", hint)
    return "fp32 values; bf16 in, computed in fp32, bf16 out"


def check_rmsnorm_fp32(code) -> str:
    expect_close(*_rmsnorms(code, 3 * randn(2, 5, 48)), "RMSNorm(x) in fp32")
    return "(2, 5, 48) fp32 matches"


def check_rmsnorm_bf16(code) -> str:
    expect_equal(
        *_rmsnorms(code, 3 * randn(4, 48, dtype=torch.bfloat16)),
        "RMSNorm(x) in bf16",
        hint="the order of normalising, casting and scaling changes bf16 rounding "
        "(docs/forward.md, RMSNorm)",
    )
    return "bit-identical to Hugging Face's order of operations"


def check_rope_angles(code) -> str:
    pos = torch.arange(3, 11)
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        got = code.rope_cos_sin(pos, 8, 10000.0, dtype)
        want = engine.rope_cos_sin(pos, 8, 10000.0, dtype)
        expect(isinstance(got, tuple) and len(got) == 2, "rope_cos_sin should return (cos, sin)")
        expect_close(got[0], want[0], f"cos ({dtype})", atol=atol)
        expect_close(got[1], want[1], f"sin ({dtype})", atol=atol)
    return "cos and sin (T, Dh) for positions 3..10, fp32 and bf16"


def check_rope_rotation(code) -> str:
    cos, sin = engine.rope_cos_sin(torch.arange(7), 8, 10000.0, torch.float32)
    x = randn(2, 4, 7, 8)
    got, want = code.apply_rope(x, cos, sin), engine.apply_rope(x, cos, sin)
    hint = "rotate-half: the two halves of each head are the pairs' coordinates"
    expect_close(got, want, "apply_rope(x)", hint=hint)
    return "(B, heads, T, Dh) rotated as the engine does"


def check_rope_relative(code) -> str:
    """The point of rotary embeddings: q.k depends on the positions' difference only."""
    q, k = randn(1, 1, 1, 8, seed=3), randn(1, 1, 1, 8, seed=4)

    def score(m: int, n: int) -> float:
        cm, sm = code.rope_cos_sin(torch.tensor([m]), 8, 10000.0, torch.float64)
        cn, sn = code.rope_cos_sin(torch.tensor([n]), 8, 10000.0, torch.float64)
        qm, kn = code.apply_rope(q.double(), cm, sm), code.apply_rope(k.double(), cn, sn)
        return (qm * kn).sum().item()

    base = score(5, 2)
    for shift in (1, 17, 100):  # (fp32 angles: a shift of 100 moves q.k by ~1e-5)
        expect(
            abs(score(5 + shift, 2 + shift) - base) < 1e-3,
            f"q.k changes when both positions move by {shift}: rotary scores must depend "
            "on m - n only",
        )
    return "q.k at (5, 2) equals q.k at (5+s, 2+s) for s = 1, 17, 100"


# Every norm of the model is your RMSNorm, its q/k norms call your rms_normalize (OLMoE's over
# the whole projection, Qwen3's per head).
check_norm_rope_model = whole_model_check(
    "tinymoe.engine.model",
    ("RMSNorm", "rms_normalize", "rope_cos_sin", "apply_rope"),
    ("olmoe", "qwen3_moe"),
    seed=5,
)


NORM_ROPE = Exercise(
    id="norm-rope",
    title="RMSNorm and rotary position embeddings",
    concepts=(
        "RMSNorm in fp32 and the bf16 rounding order",
        "rotate-half RoPE",
        "relative position",
    ),
    targets=targets(
        "tinymoe.engine.model:rms_normalize",
        "tinymoe.engine.model:RMSNorm.forward",
        "tinymoe.engine.model:rope_cos_sin",
        "tinymoe.engine.model:apply_rope",
    ),
    minutes=25,
    prerequisites=(),
    checks=(
        ("rms_normalize", check_rms_normalize),
        ("RMSNorm values (fp32)", check_rmsnorm_fp32),
        ("RMSNorm exactness (bf16)", check_rmsnorm_bf16),
        ("rotary angles", check_rope_angles),
        ("rotary rotation", check_rope_rotation),
        ("relative positions", check_rope_relative),
        ("the whole model on your code", check_norm_rope_model),
    ),
    engine_checks=("the whole model on your code",),
)


# ---------------------------------------------------------------- routing


def _logits(n: int = 6, e: int = 8, seed: int = 0, dtype=torch.float32) -> Tensor:
    return (2 * randn(n, e, seed=seed)).to(dtype)


def check_weights_dtype(code) -> str:
    for arch in ARCHS:
        cfg = baby_config(arch)
        for act in (torch.float32, torch.bfloat16):
            got = code.routing_weights_dtype(cfg, act)
            expect(
                got == engine_moe.routing_weights_dtype(cfg, act),
                f"routing_weights_dtype({arch}, activations {act}) gives {got}, not the "
                f"dtype {arch}'s transformers code scales experts in (docs/forward.md)",
            )
    return "Mixtral, OLMoE and Qwen3-MoE, fp32 and bf16 activations"


def check_routing_shapes(code) -> str:
    logits = _logits()
    r = code.route_topk(logits, 2, True, torch.bfloat16)
    expect(isinstance(r, engine_moe.Routing), "route_topk should return a Routing")
    expect_tensor(r.ids, "ids", (6, 2), torch.long)
    expect_tensor(r.weights, "weights", (6, 2), torch.bfloat16)
    expect(
        r.logits is not None and torch.equal(r.logits, logits),
        "the Routing should keep the router's logits (N, E) as they were given",
    )
    return "ids (N, K) long, weights (N, K) in the asked dtype, logits kept"


def check_routing_ids(code) -> str:
    hint = "each row holds the K most probable experts, the most probable first"
    for seed in range(3):
        logits = _logits(seed=seed)
        got = code.route_topk(logits, 3, False, torch.float32).ids
        expect_equal(got, engine_moe.route_topk(logits, 3, False, torch.float32).ids, "ids", hint)
    return "the K most probable experts, best first"


def _same_weights(code, logits: Tensor, normalise: bool, what: str, hint: str = "") -> None:
    got = code.route_topk(logits, 2, normalise, torch.float32).weights
    want = engine_moe.route_topk(logits, 2, normalise, torch.float32).weights
    expect_close(got, want, what, atol=1e-6, hint=hint)


def check_routing_weights(code) -> str:
    _same_weights(code, _logits(seed=4), False, "weights (OLMoE-1B-7B: not renormalised)")
    _same_weights(code, _logits(seed=4), True, "weights (renormalised)")
    return "softmax over all E, top-K, renormalised only when asked"


def check_routing_precision(code) -> str:
    logits = _logits(seed=5, dtype=torch.bfloat16)
    hint = "the softmax runs in fp32 whatever the logits' dtype"
    _same_weights(code, logits, True, "fp32 weights from bf16 logits", hint)
    return "bf16 logits, fp32 softmax: full fp32 precision"


check_routing_model = whole_model_check("tinymoe.engine.moe", ("route_topk",), ARCHS, seed=6)


ROUTING = Exercise(
    id="routing",
    title="Top-k routing and the three architectures' conventions",
    concepts=("fp32 softmax over E experts", "top-K", "renormalisation", "routing-weight dtype"),
    targets=targets("tinymoe.engine.moe:routing_weights_dtype", "tinymoe.engine.moe:route_topk"),
    minutes=20,
    prerequisites=(),
    checks=(
        ("weights dtype per architecture", check_weights_dtype),
        ("shapes and dtypes", check_routing_shapes),
        ("expert ids", check_routing_ids),
        ("weight values", check_routing_weights),
        ("fp32 precision", check_routing_precision),
        ("the whole model on your routing", check_routing_model),
    ),
    engine_checks=("the whole model on your routing",),
)
