"""Benchmark: tinymoe's decode speed (TPOT) against transformers and the weight-read floor.

    .venv/bin/python tests/bench_vs_transformers.py [--repeats 7] [--threads 1] [--expert-dim 512]
                                                    [--no-compile]

Builds a random OLMoE-shaped model with transformers (8 layers, hidden 256, 16 experts, top-2),
saves it with save_pretrained, loads it with tinymoe, then decodes 64 tokens greedily after a
32-token prompt (fp32, CPU, batch 1, the same thread count for all). After a warm-up, the runs
alternate (the order flips each repeat) so background load hits all alike; each repeat's TPOT is
the mean over its decode steps (the first token is prefill), and the medians are compared.

The rows: tinymoe eager and compiled (generate(compile=True); it compiles in the warm-up, and the
compile time is printed); transformers' `generate()` as a user calls it (each step timed by a
streamer) and a bare loop of its forward calls with its KV cache; and the floor: only the matrix
-vector products a decode step needs, on the same weights, one call per matrix, in a bare loop
(floor_step, the issue's floor), and the same matrices only read, each summed once (read_step:
the memory's speed); between them a "flat eager step" (FlatStep): tinymoe's operations inlined
by hand for this one checkpoint, to split eager's distance to the floor into the engine's
structure and PyTorch's cost per operation. Then the operations in one eager decode step (the
engine's and the flat step's), and how far apart the logits are (compiled, flat, eager,
transformers, float64).
Not collected by pytest (the file name does not start with test_); transformers is an oracle.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import transformers
from conftest import CountOps  # (this script's folder, tests/, is on sys.path)
from transformers import OlmoeConfig, OlmoeForCausalLM
from transformers.generation.streamers import BaseStreamer

import tinymoe
from tinymoe.engine.experts import expert_views
from tinymoe.engine.generate import compiled_steps, decode_one_token, generate, prefill
from tinymoe.engine.kvcache import KVCache

PROMPT_LEN, NEW_TOKENS = 32, 64


class StepTimer(BaseStreamer):
    """Timestamps every token transformers' generate() emits (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def steps(self) -> list[float]:
        new = self.stamps[1:]  # token times; new[0] ends prefill, each later gap is one step
        return [b - a for a, b in zip(new, new[1:], strict=False)]


@torch.no_grad()
def build_model(args: argparse.Namespace) -> OlmoeForCausalLM:
    cfg = OlmoeConfig(
        vocab_size=args.vocab,
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=args.expert_dim,
        num_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = OlmoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():  # non-uniform routing, non-trivial norms
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith(".gate.weight"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def run_tinymoe(
    model: tinymoe.MoETransformer, prompt: list[int], compile: bool = False
) -> tuple[list[float], list[int]]:
    out = generate(model, prompt, NEW_TOKENS, temperature=0.0, eos_ids=(), compile=compile)
    return out.step_s, out.tokens


@torch.no_grad()
def run_hf_generate(model: OlmoeForCausalLM, prompt: list[int]) -> tuple[list[float], list[int]]:
    timer = StepTimer()
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        streamer=timer,
    )
    return timer.steps(), out[0, len(prompt) :].tolist()


@torch.no_grad()
def run_hf_forward_loop(
    model: OlmoeForCausalLM, prompt: list[int]
) -> tuple[list[float], list[int]]:
    cache = transformers.DynamicCache(config=model.config)
    out = model(torch.tensor([prompt]), cache=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    tokens, steps = [int(token)], []
    for _ in range(NEW_TOKENS - 1):
        t0 = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))  # the host needs the id, as in generate
        steps.append(time.perf_counter() - t0)
    return steps, tokens


Matrices = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, ...]]]]


def floor_step(layers: Matrices, lm_head: torch.Tensor, x, h, a) -> list[torch.Tensor]:
    """One decode step's matrix-vector products: per layer q/k/v (one matrix), o, the router and
    K=2 experts' gate_up and down; then the LM head. One F.linear per matrix, nothing else."""
    out = []
    for qkv, o, router, experts in layers:
        out += [F.linear(x, qkv), F.linear(h, o), F.linear(x, router)]
        for gate_up, down in experts:
            out += [F.linear(x, gate_up), F.linear(a, down)]
    out.append(F.linear(x, lm_head))
    return out


def read_step(layers: Matrices, lm_head: torch.Tensor, x, h, a) -> list[torch.Tensor]:
    """The same matrices, each only read once (summed): what their bytes cost at the memory's
    speed, below any matrix-vector product that reads them."""
    out = []
    for qkv, o, router, experts in layers:
        out += [qkv.sum(), o.sum(), router.sum()]
        for gate_up, down in experts:
            out += [gate_up.sum(), down.sum()]
    out.append(lm_head.sum())
    return out


class FlatStep:
    """The eager decode step with the engine taken away: the same operations as tinymoe's one
    token step, hand-inlined for this benchmark's checkpoint only (OLMoE: q/k norm over the
    whole projection with H == Hkv, no clip, no bias, top-K without renormalising, resident
    experts, no hook), every weight and expert view resolved before the loop, no module calls.

    Not an engine path (it knows one architecture and nothing of offloading): a measurement of
    how much of eager tinymoe's distance to the matmul floor is the engine's own structure
    (modules, hooks, providers, the general attention) and how much is PyTorch's cost per
    operation, which no eager code avoids. Its logits are compared with the engine's.
    """

    def __init__(self, model: tinymoe.MoETransformer, cache: KVCache) -> None:
        cfg, self.model, self.cache = model.cfg, model, cache
        assert cfg.qk_norm == "full" and cfg.num_heads == cfg.num_kv_heads and not cfg.clip_qkv
        D, I = cfg.hidden_size, cfg.expert_dim
        self.layers = []
        for i, layer in enumerate(model.layers):
            a, W = layer.self_attn, model.experts.weights[i].detach()
            experts = [expert_views(W[e], I, D) for e in range(cfg.num_experts)]
            qk_norm = torch.stack((a.q_norm.weight, a.k_norm.weight)).detach()  # (2, H*Dh)
            self.layers.append(
                (
                    layer.input_layernorm.weight,
                    a.qkv_proj.weight,
                    qk_norm,
                    a.o_proj.weight,
                    layer.post_attention_layernorm.weight,
                    layer.mlp.gate.weight,
                    experts,
                    cache.k[i],
                    cache.v[i],
                )  # fmt: skip
            )

    @torch.inference_mode()
    def __call__(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        m, cfg = self.model, self.model.cfg
        H, Dh, eps, K = cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.top_k

        def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

        cos, sin = m._rope_rows(pos, 1, self.cache.max_len, m.embed_tokens.weight)  # (1, Dh)
        x = F.embedding(token.view(1), m.embed_tokens.weight)  # (1, D)
        for w_in, w_qkv, w_qk, w_o, w_post, w_router, experts, k_all, v_all in self.layers:
            qk, v = F.linear(norm(x, w_in), w_qkv).view(3, H * Dh).split((2, 1))
            qk = norm(qk, w_qk).view(2 * H, Dh)  # q heads then k heads
            x1, x2 = qk.chunk(2, dim=-1)
            qk = qk * cos + torch.cat((-x2, x1), dim=-1) * sin
            k_all[0, :, pos] = qk[H:]
            v_all[0, :, pos] = v.view(H, Dh)
            k, v = k_all[:, :, : pos + 1], v_all[:, :, : pos + 1]
            y = F.scaled_dot_product_attention(qk[:H].view(1, H, 1, Dh), k, v)
            r = x + F.linear(y.view(1, H * Dh), w_o)
            u = norm(r, w_post)
            probs = torch.softmax(F.linear(u, w_router), dim=-1, dtype=torch.float32)
            weights, ids = torch.topk(probs, K)
            ys = []
            for e in ids[0].tolist():
                gate_up, down = experts[e]
                g, up = F.linear(u, gate_up).chunk(2, dim=-1)
                ys.append(F.linear(F.silu(g) * up, down))
            x = r + (torch.stack(ys) * weights.view(K, 1, 1)).sum(dim=0)
        return F.linear(norm(x, m.norm.weight), m.lm_head.weight)  # (1, V)


def run_flat(model: tinymoe.MoETransformer, prompt: list[int]) -> tuple[list[float], list[int]]:
    """FlatStep in generate's loop: prefill (the engine's), then greedy one-token steps."""
    cfg = model.cfg
    cache = KVCache(
        cfg.num_layers, 1, cfg.num_kv_heads, len(prompt) + NEW_TOKENS, cfg.head_dim, "cpu",
        torch.float32,
    )  # fmt: skip
    step = FlatStep(model, cache)
    token = prefill(model, torch.tensor([prompt]), cache).argmax(-1)
    tokens, steps = [int(token)], []
    for pos in range(len(prompt), len(prompt) + NEW_TOKENS - 1):
        t0 = time.perf_counter()
        token = step(token, pos).argmax(-1)
        tokens.append(int(token))
        steps.append(time.perf_counter() - t0)
    return steps, tokens


def floor_inputs(model: tinymoe.MoETransformer) -> tuple:
    """floor_step's arguments, on tinymoe's weights: different experts in every layer, every
    matrix cut out here (so the timed loop takes not even a view), fixed input vectors."""
    cfg = model.cfg
    D, I, E = cfg.hidden_size, cfg.expert_dim, cfg.num_experts
    layers = []
    for i, layer in enumerate(model.layers):
        w = model.experts.weights[i].detach()
        experts = [expert_views(w[e], I, D) for e in (i % E, (i + E // 2) % E)]
        attn = layer.self_attn
        layers.append((attn.qkv_proj.weight, attn.o_proj.weight, layer.mlp.gate.weight, experts))
    x, h, a = torch.randn(1, D), torch.randn(1, cfg.num_heads * cfg.head_dim), torch.randn(1, I)
    return layers, model.lm_head.weight, x, h, a


@torch.inference_mode()
def run_matmul_floor(step: Callable[..., list[torch.Tensor]], inputs: tuple) -> tuple[list, list]:
    """A floor: step (floor_step or read_step) in a bare loop, one call per decode step."""
    steps = []
    for _ in range(NEW_TOKENS - 1):
        t0 = time.perf_counter()
        step(*inputs)
        steps.append(time.perf_counter() - t0)
    return steps, []


def count_ops(model: tinymoe.MoETransformer, prompt: list[int]) -> tuple[dict, dict]:
    """The aten operations of one eager decode step (the KV cache holds the prompt), the
    engine's and FlatStep's."""
    cfg = model.cfg
    cache = KVCache(
        cfg.num_layers, 1, cfg.num_kv_heads, len(prompt) + 1, cfg.head_dim, "cpu", torch.float32
    )
    token = prefill(model, torch.tensor([prompt]), cache).argmax(-1)
    with CountOps() as c:
        decode_one_token(model, token.view(1, 1), cache, len(prompt))
    flat_step = FlatStep(model, cache)
    with CountOps() as flat:
        flat_step(token.view(1, 1), len(prompt))
    return c.ops, flat.ops


@torch.inference_mode()
def decode_logits(model: tinymoe.MoETransformer, ids: list[int], compiled: bool = False):
    """The logits of ids[PROMPT_LEN:], one decode step each after a prefill (teacher-forced)."""
    cfg, dtype = model.cfg, model.embed_tokens.weight.dtype
    cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, len(ids), cfg.head_dim, "cpu", dtype)
    prefill(model, torch.tensor([ids[:PROMPT_LEN]]), cache)
    with compiled_steps(model) if compiled else nullcontext():
        steps = [
            decode_one_token(model, torch.tensor([[ids[p]]]), cache, p)
            for p in range(PROMPT_LEN, len(ids))
        ]
    return torch.cat(steps).double()  # (steps, V)


@torch.inference_mode()
def logits_apart(tm, tm64, hf: OlmoeForCausalLM, ids: list[int]) -> dict[str, float]:
    """Max |logits| differences over ids' decode steps: tinymoe compiled, tinymoe eager and
    transformers, each against eager tinymoe and against tinymoe in float64 (the exact answer,
    up to float64's own rounding), which says how much of a difference is fp32 rounding."""
    hf_cache = transformers.DynamicCache(config=hf.config)
    hf(torch.tensor([ids[:PROMPT_LEN]]), cache=hf_cache, use_cache=True)
    hf_steps = [
        hf(torch.tensor([[ids[p]]]), cache=hf_cache, use_cache=True).logits[:, -1]
        for p in range(PROMPT_LEN, len(ids))
    ]
    cfg = tm.cfg
    cache = KVCache(
        cfg.num_layers, 1, cfg.num_kv_heads, len(ids), cfg.head_dim, "cpu", torch.float32
    )
    prefill(tm, torch.tensor([ids[:PROMPT_LEN]]), cache)
    flat = FlatStep(tm, cache)
    runs = {
        "compiled": decode_logits(tm, ids, compiled=True),
        "flat": torch.cat(
            [flat(torch.tensor([ids[p]]), p) for p in range(PROMPT_LEN, len(ids))]
        ).double(),
        "eager": decode_logits(tm, ids),
        "transformers": torch.cat(hf_steps).double(),
    }
    exact = decode_logits(tm64, ids)
    apart = {f"{a} vs eager": (runs[a] - runs["eager"]).abs().max().item() for a in runs}
    apart |= {f"{a} vs fp64": (run - exact).abs().max().item() for a, run in runs.items()}
    del apart["eager vs eager"]
    apart["largest |logit|"] = exact.abs().max().item()
    return apart


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    # One thread by default: on a small shared machine, two multi-threaded runs fight each other
    # and the background load, and the noise swamps the difference being measured.
    p.add_argument("--threads", type=int, default=1, help="torch threads, for every run")
    p.add_argument("--expert-dim", type=int, default=512, help="I, each expert's SwiGLU width")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    hf = build_model(args)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        tm = tinymoe.load_model(d, device="cpu", dtype=torch.float32)
        tm64 = tinymoe.load_model(d, device="cpu", dtype=torch.float64)
    prompt = torch.randint(0, args.vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    floor_args = floor_inputs(tm)

    runners = {
        "tinymoe eager": lambda: run_tinymoe(tm, prompt),
        "transformers generate": lambda: run_hf_generate(hf, prompt),
        "transformers forward loop": lambda: run_hf_forward_loop(hf, prompt),
        "flat eager step": lambda: run_flat(tm, prompt),
        "matmul floor": lambda: run_matmul_floor(floor_step, floor_args),
        "read floor": lambda: run_matmul_floor(read_step, floor_args),
    }
    compile_s = {}
    if not args.no_compile:
        runners["tinymoe compiled"] = lambda: run_tinymoe(tm, prompt, compile=True)
        t0 = time.perf_counter()
        out = generate(tm, prompt, 3, eos_ids=(), compile=True)  # compiles
        compile_s["tinymoe"] = (out.compile_s, time.perf_counter() - t0)
    tokens = {name: run()[1] for name, run in runners.items()}  # warm-up
    engines = [n for n in runners if "floor" not in n]  # (the flat step too: same tokens)
    same = all(tokens[n] == tokens["tinymoe eager"] for n in engines)
    mean: dict[str, list[float]] = {name: [] for name in runners}  # per repeat, ms
    p50: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order
            steps = runners[name]()[0]
            mean[name].append(statistics.fmean(steps) * 1e3)
            p50[name].append(statistics.median(steps) * 1e3)

    print(
        f"OLMoE-shaped: 8 layers, hidden 256, 16 experts top-2, I={args.expert_dim}, "
        f"vocab {args.vocab}; fp32 CPU batch 1, {args.threads} thread(s); prompt {PROMPT_LEN}, "
        f"{NEW_TOKENS} new tokens, {args.repeats} alternating repeats; greedy tokens identical "
        f"({', '.join(engines)}): {same}"
    )
    print("TPOT in ms: median over repeats of each repeat's mean (and p50) over its decode steps")
    med = {name: statistics.median(v) for name, v in mean.items()}
    med50 = {name: statistics.median(v) for name, v in p50.items()}
    for name in names:
        runs = ", ".join(f"{x:.2f}" for x in mean[name])
        print(f"{name:>26}: {med[name]:6.2f} (p50 {med50[name]:6.2f})   repeats: {runs}")
    ratios = [
        ("tinymoe eager", "matmul floor"),
        ("tinymoe eager", "transformers generate"),
        ("tinymoe eager", "transformers forward loop"),
        ("flat eager step", "matmul floor"),
        ("flat eager step", "transformers generate"),
        ("tinymoe eager", "flat eager step"),
        ("tinymoe compiled", "matmul floor"),
        ("tinymoe compiled", "read floor"),
        ("matmul floor", "read floor"),
        ("tinymoe compiled", "transformers generate"),
    ]
    for a, b in ratios:
        if a in med and b in med:
            print(f"ratio {a} / {b}: {med[a] / med[b]:.2f}x (p50: {med50[a] / med50[b]:.2f}x)")
    if compile_s:
        counters = torch._dynamo.utils.counters
        print(
            f"compiled decode step: {counters['stats']['unique_graphs']} graph(s), "
            f"{sum(counters['graph_break'].values())} graph break(s)"
        )
    for what, (first, total) in compile_s.items():
        print(
            f"compile time, {what}: {first:.1f} s (the first compiled step; {total:.1f} s in all)"
        )
    ops, flat_ops = count_ops(tm, prompt)
    print(f"aten operations in one flat eager step: {sum(flat_ops.values())}")
    print(
        f"aten operations in one eager decode step: {sum(ops.values())} "
        f"({ops.get('linear', 0)} matmuls, {ops.get('scaled_dot_product_attention', 0)} "
        f"attentions; most common: "
        + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
        + ")"
    )
    if not args.no_compile:
        apart = logits_apart(tm, tm64, hf, prompt + tokens["tinymoe eager"][:16])
        print(
            "max |logits difference| over 16 decode steps (fp32 unless named): "
            + ", ".join(f"{k} {v:.2e}" for k, v in apart.items())
        )


if __name__ == "__main__":
    main()
