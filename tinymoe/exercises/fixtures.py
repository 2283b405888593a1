"""What the checks run on: baby models built in memory, and the shipped demo model.

Baby models (hidden 32, a few layers, vocabulary 96) are random but not uniform (std 0.2, norm
weights away from 1), so a norm applied wrongly or a swapped expert changes the logits. They
are built here, with tinymoe itself, so the checker needs neither pytest nor files on disk.

Checks that need a *trained* model (predictor recall, perplexity) use the demo model,
weights/pydoc-moe, on the held-out text in tests/fixtures: loaded once per process and shared,
so a check that installs a hook or a runtime on it must take it off again (a `with` block does).
"""

import contextlib
import functools
import io

import torch
from torch import Tensor

from tinymoe.engine.config import ModelConfig
from tinymoe.engine.generate import generate
from tinymoe.engine.loader import load_model
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing
from tinymoe.engine.tokenizer import load_tokenizer
from tinymoe.errors import TinyMoeError
from tinymoe.exercises.exercise import REPO, expect, expect_close, patched
from tinymoe.speculation.calibration import Calibration, load_speculation
from tinymoe.speculation.exact_run import ExactRunRecord, record_exact_run
from tinymoe.speculation.predictors import RouterPredictor

DEMO = REPO / "weights" / "pydoc-moe"
HELDOUT = REPO / "tests" / "fixtures" / "heldout_sample.txt"
QK_NORM = {"olmoe": "full", "qwen3_moe": "head", "mixtral": "none"}


def baby_config(model_type: str = "olmoe", **overrides) -> ModelConfig:
    """A 3-layer, 8-expert, top-2 config of one architecture (its routing conventions too)."""
    fields = dict(
        model_type=model_type,
        vocab_size=96,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_experts=8,
        top_k=2,
        expert_dim=16,
        qk_norm=QK_NORM[model_type],
        norm_topk_prob=model_type != "olmoe",  # Mixtral always; OLMoE-1B-7B no; Qwen3 yes
        eos_token_ids=(),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


@torch.no_grad()
def baby_model(
    model_type: str = "olmoe", seed: int = 0, cls: type = MoETransformer, **overrides
) -> MoETransformer:
    """A random baby model on the CPU in fp32; `cls` may be a student's subclass."""
    model = cls(baby_config(model_type, **overrides)).init_weights(seed=seed, std=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):  # not 1: a norm applied wrongly must show
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


def random_ids(vocab: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def random_routing(
    n: int, experts: int, k: int, g: torch.Generator, dtype=torch.float32
) -> Routing:
    """n tokens routed to k distinct experts each, softmax weights in `dtype` (drawn from g)."""
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])  # (n, k)
    weights = torch.softmax(torch.randn(n, k, generator=g), dim=-1)
    return Routing(ids=ids, weights=weights.to(dtype))


def run_baby(model: MoETransformer) -> tuple[Tensor, list[int]]:
    """A model's logits on two fixed sequences, and its greedy continuation of the first."""
    ids = random_ids(model.cfg.vocab_size, (2, 9), seed=1)
    with torch.no_grad():
        logits = model(ids)
    return logits, generate(model, ids[0].tolist(), 6, eos_ids=()).tokens


def whole_model_check(module: str, names: tuple[str, ...], archs: tuple[str, ...], seed: int):
    """A check: with the engine's `<module>.<name>` (the module whose code calls it) replaced by
    the student's, for each name, baby models of each architecture, built and run, give the
    engine's own logits and greedy tokens."""

    def check(code) -> str:
        for arch in archs:
            logits, tokens = run_baby(baby_model(arch, seed=seed))
            with contextlib.ExitStack() as yours:
                for name in names:
                    yours.enter_context(patched(module, name, getattr(code, name)))
                got_logits, got_tokens = run_baby(baby_model(arch, seed=seed))
            expect_close(got_logits, logits, f"{arch}: the logits", atol=1e-4, rtol=1e-4)
            expect(
                got_tokens == tokens,
                f"{arch}: greedy generation picks other tokens than the engine",
            )
        return f"logits and greedy tokens equal the engine's ({', '.join(archs)})"

    return check


def router_predictor(lookahead: int = 1) -> RouterPredictor:
    """Router-PF on the demo model with its calibrated default vectors."""
    return RouterPredictor(demo_model(), demo_calibration().default_vectors, lookahead)


# ---------------------------------------------------------------- the demo model


@functools.cache
def demo_model() -> MoETransformer:
    if not (DEMO / "config.json").is_file():
        raise TinyMoeError(
            f"{DEMO}: the demo model is missing; this exercise needs a tinymoe checkout with "
            "weights/pydoc-moe"
        )
    return load_model(DEMO).eval()  # fp32 on the CPU


@functools.cache
def demo_calibration() -> Calibration:
    cal = load_speculation(DEMO, demo_model().cfg)
    if cal is None:
        raise TinyMoeError(f"{DEMO}: no speculation.safetensors; the demo model ships one")
    return cal


@functools.cache
def heldout_ids(rows: int = 16, seq_len: int = 64) -> Tensor:
    """(rows, seq_len) token ids of held-out Python documentation (never trained on)."""
    ids = load_tokenizer(DEMO).encode(HELDOUT.read_text(encoding="utf-8")).ids
    if len(ids) < rows * seq_len:
        raise TinyMoeError(f"{HELDOUT}: {len(ids)} tokens, fewer than {rows * seq_len}")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


@functools.cache
def demo_exact_run(rows: int = 16) -> ExactRunRecord:
    """The demo model over `rows` held-out windows, recorded as tinymoe.calibrate records."""
    with contextlib.redirect_stderr(io.StringIO()):  # the engine's progress bar
        return record_exact_run(demo_model(), heldout_ids(rows))
