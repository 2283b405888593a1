"""Benchmark: tinymoe's decode speed (TPOT) against transformers on the same random checkpoint.

    .venv/bin/python tests/bench_vs_transformers.py [--repeats 7] [--threads 1] [--expert-dim 512]

Builds a random OLMoE-shaped model with transformers (8 layers, hidden 256, 16 experts, top-2),
saves it with save_pretrained, loads it with tinymoe, then decodes 64 tokens greedily after a
32-token prompt with both (fp32, CPU, batch 1, same thread count). After a warm-up, the two
alternate (the order flips each repeat) so background load hits both alike; each repeat's TPOT is
the mean over its 63 decode steps (the first token is prefill), and the medians are compared.

transformers is timed two ways: `generate()` as a user calls it (each step timed by a streamer),
and a bare loop of forward calls with its KV cache (the model without generate's machinery).
Not collected by pytest (the file name does not start with test_); transformers is an oracle.
"""

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import OlmoeConfig, OlmoeForCausalLM
from transformers.generation.streamers import BaseStreamer

import tinymoe
from tinymoe.engine.experts import expert_views
from tinymoe.engine.generate import generate

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


def run_tinymoe(model: tinymoe.MoETransformer, prompt: list[int]) -> tuple[list[float], list[int]]:
    out = generate(model, prompt, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_ids=())
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


@torch.no_grad()
def run_matmul_floor(model: tinymoe.MoETransformer) -> tuple[list[float], list[int]]:
    """Only the matrix-vector products of a decode step, on the same weights, fewest calls: a floor.

    Per layer: q, k and v as one matrix, o, the router, and K=2 experts' gate_up and down
    (different experts per layer); then the LM head. Every weight byte a decode step must read,
    one F.linear per matrix, nothing else: no norms, no attention, no routing, no copies. The
    matrices are cut out before the timed loop, so not even a view is taken inside it.
    """
    cfg = model.cfg
    D, I, E = cfg.hidden_size, cfg.expert_dim, cfg.num_experts
    x, h, a = torch.randn(1, D), torch.randn(1, cfg.num_heads * cfg.head_dim), torch.randn(1, I)
    layers = []
    for i, layer in enumerate(model.layers):
        experts = [
            expert_views(model.experts.weights[i][e], I, D) for e in (i % E, (i + E // 2) % E)
        ]
        attn = layer.self_attn
        layers.append((attn.qkv_proj.weight, attn.o_proj.weight, layer.mlp.gate.weight, experts))
    lm_head = model.lm_head.weight
    steps = []
    for _ in range(NEW_TOKENS - 1):
        t0 = time.perf_counter()
        for qkv, o, router, experts in layers:
            F.linear(x, qkv)
            F.linear(h, o)
            F.linear(x, router)
            for gate_up, down in experts:
                F.linear(x, gate_up)
                F.linear(a, down)
        F.linear(x, lm_head)
        steps.append(time.perf_counter() - t0)
    return steps, []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    # One thread by default: on a small shared machine, two multi-threaded runs fight each other
    # and the background load, and the noise swamps the difference being measured.
    p.add_argument("--threads", type=int, default=1, help="torch threads, for both engines")
    p.add_argument("--expert-dim", type=int, default=512, help="I, each expert's SwiGLU width")
    p.add_argument("--vocab", type=int, default=4096)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    hf = build_model(args)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        tm = tinymoe.load_model(d, device="cpu", dtype=torch.float32)
    prompt = torch.randint(0, args.vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()

    runners = {
        "tinymoe": lambda: run_tinymoe(tm, prompt),
        "transformers generate": lambda: run_hf_generate(hf, prompt),
        "transformers forward loop": lambda: run_hf_forward_loop(hf, prompt),
        "matmul floor": lambda: run_matmul_floor(tm),
    }
    tokens = {name: run()[1] for name, run in runners.items()}  # warm-up
    same = (
        tokens["tinymoe"] == tokens["transformers generate"] == tokens["transformers forward loop"]
    )
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
        f"{NEW_TOKENS} new tokens, {args.repeats} alternating repeats; greedy tokens identical: "
        f"{same}"
    )
    print("TPOT in ms: median over repeats of each repeat's mean (and p50) over its 63 steps")
    med = {name: statistics.median(v) for name, v in mean.items()}
    med50 = {name: statistics.median(v) for name, v in p50.items()}
    for name in names:
        runs = ", ".join(f"{x:.2f}" for x in mean[name])
        print(f"{name:>26}: {med[name]:6.2f} (p50 {med50[name]:6.2f})   repeats: {runs}")
    for ref in names[1:3]:
        print(
            f"ratio tinymoe / {ref}: {med['tinymoe'] / med[ref]:.2f}x "
            f"(p50: {med50['tinymoe'] / med50[ref]:.2f}x)"
        )


if __name__ == "__main__":
    main()
