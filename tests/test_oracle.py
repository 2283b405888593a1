"""tinymoe against transformers (the oracle) on tiny random Mixtral, OLMoE and Qwen3-MoE models.

Each model is built and randomised with transformers, then written with `save_pretrained` in the
forms real checkpoints come in: one file, shards, the fused expert layout transformers 5 can
write, bf16 storage, and the published hub config.json. tinymoe loads each one itself (no
transformers at run time) and must reproduce transformers' fp32 logits and greedy tokens.

The models exercise every switch the architectures differ in: Mixtral's sliding window (shorter
than the sequence), OLMoE's clip_qkv and norm_topk_prob, Qwen3's per-head q/k norm with head_dim
!= hidden/heads and tied embeddings, and grouped-query attention (fewer KV heads) everywhere.
"""

import copy
import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import tinymoe

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ATOL = 1e-4
SEQ = 16  # longer than Mixtral's window below, so the window really masks something
WINDOW = 5
COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per KV head
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},  # not the default 1e4
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
    attn_implementation="eager",
)
# architecture -> (transformers config class, model class, the switches this test turns on)
ARCHS = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, intermediate_size=24, sliding_window=WINDOW),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_experts=8, intermediate_size=24, clip_qkv=0.8, norm_topk_prob=True),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=6,
            moe_intermediate_size=24,
            intermediate_size=24,
            head_dim=12,  # != hidden / heads = 8
            norm_topk_prob=False,
            tie_word_embeddings=True,
        ),
    ),
}
FORMS = ("single", "sharded", "fused", "bf16", "published")


@torch.no_grad()
def build_hf_model(arch: str, seed: int = 0):
    """A random transformers model whose every weight matters (no weight left at its init value).

    Matrices get std 0.2 (not 0.02) so attention is far from uniform and experts differ; norm
    weights ~ N(1, 0.5) and routers ~ N(0, 0.5) so a norm or router applied wrongly shows up.
    """
    cfg_name, model_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra)
    model = getattr(transformers, model_name)(cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
        elif name.endswith(".gate.weight"):  # the router
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def bf16_rounded(model):
    """A copy of model whose weights are rounded to bf16 and back: what a bf16 file holds."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return rounded


def to_published_config(path: Path) -> None:
    """Rewrite config.json the way checkpoints on the hub spell it (transformers 4 era)."""
    d = json.loads((path / "config.json").read_text())
    d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
    d["torch_dtype"] = d.pop("dtype")
    if d["model_type"] != "mixtral":  # OLMoE and Qwen3-MoE publish num_experts
        d["num_experts"] = d.pop("num_local_experts", d.get("num_experts"))
    if d.get("head_dim") is None:
        d.pop("head_dim", None)
    (path / "config.json").write_text(json.dumps(d))


def save(model, path: Path, form: str) -> Path:
    if form == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        assert len(list(path.glob("model-*.safetensors"))) > 1
    elif form == "fused":
        model.save_pretrained(path, save_original_format=False)
    elif form == "bf16":
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    else:
        model.save_pretrained(path)
        if form == "published":
            to_published_config(path)
    return path


def input_ids(vocab: int, batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


class Oracle(NamedTuple):
    hf: Any  # the transformers model, fp32
    ids: torch.Tensor  # (2, SEQ) input ids
    logits: torch.Tensor  # (2, SEQ, V) transformers' fp32 logits
    logits_bf16: torch.Tensor  # the same with every weight rounded to bf16 first


@functools.cache  # built once per architecture, shared by every test in this module
def oracle(arch: str) -> Oracle:
    hf = build_hf_model(arch)
    ids = input_ids(hf.config.vocab_size)
    with torch.no_grad():
        return Oracle(hf, ids, hf(ids).logits, bf16_rounded(hf)(ids).logits)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(arch, form, tmp_path):
    o = oracle(arch)
    path = save(o.hf, tmp_path / form, form)
    model = tinymoe.load_model(path, device="cpu", dtype=torch.float32)
    assert model.cfg.model_type == arch and model.cfg.rope_theta == 500.0
    want = o.logits
    if form == "bf16":
        assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
        want = o.logits_bf16
    with torch.no_grad():
        got = model(o.ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "arch, key, off",
    [
        ("mixtral", "sliding_window", None),
        ("olmoe", "clip_qkv", None),
        ("olmoe", "norm_topk_prob", False),
    ],
)
def test_switch_is_exercised(arch, key, off, tmp_path):
    """Turning the switch off in config.json changes the logits: the match above really tests it."""
    o = oracle(arch)
    path = save(o.hf, tmp_path, "single")
    d = json.loads((path / "config.json").read_text())
    assert d[key] not in (None, False)
    d[key] = off
    (path / "config.json").write_text(json.dumps(d))
    with torch.no_grad():
        got = tinymoe.load_model(path)(o.ids)
    assert (got - o.logits).abs().max() > 1e-2


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_generation_matches_transformers(arch, tmp_path):
    hf = oracle(arch).hf
    model = tinymoe.load_model(save(hf, tmp_path, "single"))
    prompt = input_ids(hf.config.vocab_size, batch=1, seq=7, seed=2)
    with torch.no_grad():
        want = hf.generate(
            prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, prompt.shape[1] :].tolist()
    out = tinymoe.generate(model, prompt[0].tolist(), max_new_tokens=32, eos_ids=())
    assert len(out.tokens) == 32 and len(want) == 32
    assert len(set(out.tokens)) > 1, "a constant continuation would hide most bugs"
    assert out.tokens == want


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bf16_moe_layers_match_transformers_bit_for_bit(arch, tmp_path):
    """In bf16, every MoE layer gives transformers' output bit for bit, on both moe_forward paths.

    tinymoe's router and experts get the very inputs transformers' MoE blocks saw (captured with
    forward hooks) and must return the same bf16 output: the grouped path over all tokens, and
    the one-token decode path token by token. This is where the routing weights' dtype shows:
    Mixtral scales expert outputs by fp32 weights and rounds the sum once, OLMoE and Qwen3-MoE
    round the weights to bf16 first. (Whole-model bf16 logits differ anyway, by attention's
    rounding, which would hide this.) transformers 5's default experts implementation,
    grouped_mm, is pinned; its eager loop rounds Mixtral's K contributions one by one instead.
    """
    from tinymoe.engine.moe import Routing, moe_forward

    hf = copy.deepcopy(oracle(arch).hf).to(torch.bfloat16)
    hf.set_experts_implementation("grouped_mm")
    seen = []
    hooks = [
        block.mlp.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
        for block in hf.model.layers
    ]
    with torch.no_grad():
        hf(oracle(arch).ids)
    for h in hooks:
        h.remove()
    model = tinymoe.load_model(save(hf, tmp_path, "single"), dtype=torch.bfloat16)
    I = model.cfg.expert_dim
    with torch.no_grad():
        for layer, (u, want) in enumerate(seen):
            u, want = u.flatten(0, 1), want.flatten(0, 1)  # (N, D) each
            r = model.layers[layer].mlp.route(u)
            grouped = moe_forward(u, r, model.provider, layer, I)
            one = [
                moe_forward(
                    u[i : i + 1],
                    Routing(r.ids[i : i + 1], r.weights[i : i + 1]),
                    model.provider,
                    layer,
                    I,
                )
                for i in range(len(u))
            ]
            assert grouped.dtype == torch.bfloat16
            assert torch.equal(grouped, want), f"layer {layer}, grouped path"
            assert torch.equal(torch.cat(one), want), f"layer {layer}, one-token path"
