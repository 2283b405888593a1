"""The fast decode path against the plain one: fused projections, the compiled step, op counts.

The eager forward pass is the reference (tests/test_oracle.py holds it to transformers); here
its fast variants are held to it: the compiled decode step (generate(compile=True)) within
1e-5 on every architecture, offloading runtime installed or not; experts_by_index, the compiled
path's experts, against the loop over experts; and the fused q/k/v matrix against the three
checkpoint tensors it is loaded from and saved back to.
"""

import json
import shutil
from contextlib import nullcontext

import pytest
import torch
from conftest import CountOps, add_tokenizer, make_checkpoint
from safetensors import safe_open

import tinymoe
from tinymoe.engine.experts import experts_by_index
from tinymoe.engine.generate import compiled_steps, decode_one_token, generate, prefill
from tinymoe.engine.kvcache import KVCache
from tinymoe.engine.moe import Routing, moe_forward
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.runtime import OffloadRuntime

ARCHS = {
    "mixtral-window": dict(model_type="mixtral", sliding_window=6),
    "olmoe-clip": dict(model_type="olmoe", clip_qkv=0.5),
    "qwen3-head-dim": dict(model_type="qwen3_moe", head_dim=12),
}
PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11]


def new_cache(model: tinymoe.MoETransformer, max_len: int) -> KVCache:
    cfg = model.cfg
    return KVCache(cfg.num_layers, 1, cfg.num_kv_heads, max_len, cfg.head_dim, "cpu", torch.float32)


def decode_logits(model: tinymoe.MoETransformer, steps: int, compiled: bool) -> list[torch.Tensor]:
    """Prefill PROMPT (eager), then `steps` greedy decode steps; every step's logits (1, V)."""
    cache = new_cache(model, len(PROMPT) + steps)
    token = prefill(model, torch.tensor([PROMPT]), cache).argmax(-1)
    out = []
    with compiled_steps(model) if compiled else nullcontext():
        for pos in range(len(PROMPT), len(PROMPT) + steps):
            out.append(decode_one_token(model, token.view(1, 1), cache, pos))
            token = out[-1].argmax(-1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ARCHS))
def test_compiled_decode_equals_eager(case, tmp_path):
    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=4, **ARCHS[case]))
    eager = decode_logits(model, 8, compiled=False)
    compiled = decode_logits(model, 8, compiled=True)
    for want, got in zip(eager, compiled, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # generate(compile=True): the same greedy tokens; the compiling step is kept out of TPOT
    want = generate(model, PROMPT, 12, eos_ids=())
    got = generate(model, PROMPT, 12, eos_ids=(), compile=True)
    assert got.tokens == want.tokens and len(set(want.tokens)) > 1
    assert got.compile_s is not None and len(got.step_s) == len(want.step_s) - 1
    assert "forward" not in vars(model)  # the eager forward is back after generate


@pytest.mark.slow
def test_compiled_decode_under_the_offloading_runtime(tmp_path):
    """With a runtime installed, its hooks still run and its experts are used; it is eager."""
    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=5))
    want = decode_logits(model, 5, compiled=False)
    with OffloadRuntime(model, "lru", slots=3, link=LinkSpec(100.0, 0.0)) as rt:
        got = decode_logits(model, 5, compiled=True)
        report = rt.report()
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert report["decode"]["steps"] == 5  # the runtime's forward hooks saw every step
    assert report["decode"]["bytes_copied"] > 0  # 3 slots for 8 experts: it had to copy
    # generate(compile=True): the compiling step is metered apart, as it is kept out of TPOT
    with OffloadRuntime(model, "lru", slots=3, link=LinkSpec(100.0, 0.0)) as rt:
        out = generate(model, PROMPT, 7, eos_ids=(), compile=True)
        report = rt.report()
    assert report["compile"]["steps"] == 1 and report["decode"]["steps"] == len(out.step_s) == 5
    assert report["compile"]["misses"] + report["compile"]["hits"] == model.cfg.num_layers * 2


@pytest.mark.parametrize("case", list(ARCHS))
def test_the_static_shape_step_equals_the_plain_one(case, tmp_path):
    """start as a tensor (index_copy_ into the cache, attention over all of it behind a mask,
    Mixtral's window included) against start as an int (the cache narrowed), eagerly. Within
    1e-5, as the compiled step: the masked attention kernel rounds in its own order."""
    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=8, **ARCHS[case]))
    caches = [new_cache(model, len(PROMPT) + 9) for _ in range(2)]
    token = [prefill(model, torch.tensor([PROMPT]), c).argmax(-1) for c in caches][0]
    for pos in range(len(PROMPT), len(PROMPT) + 9):  # past Mixtral's window of 6
        want = decode_one_token(model, token.view(1, 1), caches[0], pos)
        got = decode_one_token(model, token.view(1, 1), caches[1], torch.tensor([pos]))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # attention's rounding
        token = want.argmax(-1)
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=0)  # written in place
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-5, rtol=0)
    assert torch.equal(caches[0].k[0], caches[1].k[0])  # layer 0's keys: before any attention
    with pytest.raises(tinymoe.TinyMoeError, match="one new token"):
        model(torch.tensor([PROMPT[:2]]), caches[1], torch.tensor([3]))


@pytest.mark.slow
def test_the_compiled_step_compiles_once_for_every_position(tmp_path):
    """Static shapes: one graph for the whole decode, not one per position (what lets CUDA
    graphs capture the step), and no graph break when nothing is offloaded."""
    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=9, model_type="mixtral"))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    decode_logits(model, 10, compiled=True)
    generate(model, PROMPT, 6, eos_ids=(), compile=True)  # a new cache, a new prompt length
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0


def test_compile_without_a_cpp_compiler_is_one_clear_error(tmp_path):
    import torch._inductor.config as inductor_config

    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=12))
    with (
        inductor_config.patch({"cpp.cxx": ("/no/such/c++",)}),
        pytest.raises(tinymoe.TinyMoeError, match="needs a C\\+\\+ compiler.*apt install g"),
    ):
        generate(model, PROMPT, 4, eos_ids=(), compile=True)


@pytest.mark.slow
def test_run_compile_keeps_the_resident_step_one_graph(tmp_path, capsys):
    """run.py --compile with the resident policy: no runtime is installed (its per-layer hooks
    would cut the compiled step into pieces); the tokens are eager's."""
    from tinymoe.run import cli

    model_dir = add_tokenizer(make_checkpoint(tmp_path / "baby", seed=11))
    base = ["--model", str(model_dir), "--prompt", "the cat sat", "--max-new-tokens", "6"]
    assert cli([*base, "--json"]) == 0
    eager = json.loads(capsys.readouterr().out)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert cli([*base, "--json", "--compile"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["tokens"] == eager["tokens"] and compiled["compile_s"] > 0
    assert eager["compile_s"] is None and eager["hit_rate"] is None  # the bare model: not metered
    assert compiled["hit_rate"] is None and compiled["layers"] is None
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.slow
def test_the_cuda_graph_branch_runs_on_the_cpu(tmp_path, monkeypatch):
    """What of the CUDA-graph setup the CPU can run (mode "reduce-overhead", static addresses,
    a graph step marked each call): no error, eager's tokens. Capturing needs a GPU (below)."""
    from tinymoe.engine import generate as generate_module

    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=13))
    want = generate(model, PROMPT, 8, eos_ids=())
    monkeypatch.setattr(generate_module, "cuda_graphs_apply", lambda model: True)
    got = generate(model, PROMPT, 8, eos_ids=(), compile=True)
    assert got.tokens == want.tokens and "reduce-overhead" in model.compiled


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_replay_the_compiled_step(tmp_path):
    """On CUDA, resident: the compiled step is captured as a CUDA graph (none skipped) and
    generates eager's greedy tokens; with an offloading runtime it still runs, uncaptured."""
    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=10), device="cuda")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    want = generate(model, PROMPT, 12, eos_ids=())
    got = generate(model, PROMPT, 12, eos_ids=(), compile=True)
    again = generate(model, PROMPT, 12, eos_ids=(), compile=True)  # a new cache: re-recorded
    assert got.tokens == want.tokens == again.tokens
    assert counters["inductor"]["cudagraph_skips"] == 0
    with OffloadRuntime(model, "lru", slots=3) as rt:
        offloaded = generate(model, PROMPT, 12, eos_ids=(), compile=True)
        assert rt.report()["decode"]["bytes_copied"] > 0
    assert offloaded.tokens == want.tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp32_weights", [True, False])
def test_experts_by_index_equals_the_loop_over_experts(dtype, fp32_weights, tmp_path):
    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=6), dtype=dtype)
    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    for layer in range(cfg.num_layers):
        u = torch.randn(1, cfg.hidden_size, generator=g).to(dtype)
        ids = torch.randperm(cfg.num_experts, generator=g)[: cfg.top_k].view(1, -1)
        w = torch.softmax(torch.randn(1, cfg.top_k, generator=g), -1)
        w = w if fp32_weights else w.to(dtype)  # Mixtral's fp32 weights, or the activations'
        want = moe_forward(u, Routing(ids, w), model.provider, layer, cfg.expert_dim)
        W = model.experts.weights[layer].detach()
        got = experts_by_index(u, ids, w, W, cfg.expert_dim)
        assert got.dtype == want.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe", "qwen3_moe"])
def test_a_decode_step_reads_each_matrix_with_one_matmul(model_type, tmp_path):
    """q, k and v are one matmul; per layer: qkv, o, router, K x (gate_up, down); then the head."""
    model = tinymoe.load_model(make_checkpoint(tmp_path, model_type=model_type))
    cfg = model.cfg
    cache = new_cache(model, len(PROMPT) + 1)
    token = prefill(model, torch.tensor([PROMPT]), cache).argmax(-1)
    with CountOps() as count:
        decode_one_token(model, token.view(1, 1), cache, len(PROMPT))
    assert count.ops["linear"] == cfg.num_layers * (3 + 2 * cfg.top_k) + 1
    assert count.ops["scaled_dot_product_attention"] == cfg.num_layers


def test_fused_qkv_is_loaded_from_and_saved_as_three_tensors(tmp_path):
    model = tinymoe.load_model(make_checkpoint(tmp_path / "a", seed=7))
    tinymoe.save_model(model, tmp_path / "b")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        v = f.get_tensor("model.layers.1.self_attn.v_proj.weight")
    assert not any("qkv" in k for k in keys)
    assert {
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.2.self_attn.v_proj.weight",
    } <= keys
    qkv = model.layers[1].self_attn.qkv_proj.weight
    H, Hkv, Dh = model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim
    assert torch.equal(qkv[: H * Dh], q) and torch.equal(qkv[(H + Hkv) * Dh :], v)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        again = tinymoe.load_model(tmp_path / "b")
        again_logits = again(ids)
        assert torch.equal(again_logits, model(ids))
