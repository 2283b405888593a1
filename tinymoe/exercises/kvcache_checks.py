"""The KV cache exercise: a preallocated cache and the attention masks, so that decoding step by
step (with an int position, or the compiled step's tensor one) gives one full forward's logits."""

import torch
from torch import Tensor

from tinymoe.engine.kvcache import KVCache
from tinymoe.exercises.exercise import (
    Exercise,
    HostReads,
    expect,
    expect_close,
    expect_user_error,
    expect_view,
    targets,
)
from tinymoe.exercises.fixtures import baby_model, randn, random_ids


def _cache(cls, max_len: int = 10) -> KVCache:
    return cls(2, 2, 2, max_len, 4, "cpu", torch.float32)  # L, B, Hkv, max_len, Dh


def check_update_values(code) -> str:
    cache = _cache(code.KVCache)
    k1, v1 = randn(2, 2, 3, 4, seed=1), randn(2, 2, 3, 4, seed=2)
    k, v = cache.update(1, 0, k1, v1)
    expect_close(k, k1, "keys after a 3-token prefill")
    expect_close(v, v1, "values after a 3-token prefill")
    k2, v2 = randn(2, 2, 1, 4, seed=3), randn(2, 2, 1, 4, seed=4)
    k, v = cache.update(1, 3, k2, v2)
    expect_close(k, torch.cat([k1, k2], dim=2), "keys after one more token at position 3")
    expect_close(v, torch.cat([v1, v2], dim=2), "values after one more token at position 3")
    k, _ = cache.update(0, 0, k2, v2)
    expect_close(k, k2, "layer 0's keys (layers must not share positions)")
    return "returns every cached position 0..start+T-1 of its layer, (B, Hkv, S, Dh)"


def check_update_views(code) -> str:
    cache = _cache(code.KVCache)
    k, v = cache.update(0, 0, randn(2, 2, 5, 4), randn(2, 2, 5, 4))
    for got, buf, what in ((k, cache.k, "keys"), (v, cache.v, "values")):
        expect_view(
            got,
            buf,
            f"the returned {what} are a copy: return views of the preallocated buffer, so a "
            "decode step does not copy the whole cache",
        )
    return "views of the preallocated buffers, no copy"


def check_update_tensor_start(code) -> str:
    """The compiled decode step's form: start a (1,) tensor, the whole cache back, no sync."""
    mine, ref = _cache(code.KVCache), _cache(KVCache)
    k1, v1, k2, v2 = (randn(2, 2, T, 4, seed=s) for T, s in ((3, 1), (3, 2), (1, 3), (1, 4)))
    for cache in (mine, ref):
        cache.update(1, 0, k1, v1)
    with HostReads() as reads:
        k, v = mine.update(1, torch.tensor([3]), k2, v2)
    expect(
        reads.count == 0,
        f"update with a tensor start read values to the host ({', '.join(reads.calls)}): the "
        "compiled decode step keeps the position on the device (no sync, one graph)",
    )
    want_k, want_v = ref.update(1, torch.tensor([3]), k2, v2)
    expect_close(k, want_k, "keys after a step with a tensor start (the whole cache)")
    expect_close(v, want_v, "values after a step with a tensor start (the whole cache)")
    expect_view(
        k, mine.k, "with a tensor start the returned keys are a copy: return views of the buffer"
    )
    return "writes at the (1,) tensor position, returns the whole cache, no host read"


def check_update_full(code) -> str:
    cache = _cache(code.KVCache, max_len=4)
    cache.update(0, 0, randn(2, 2, 3, 4), randn(2, 2, 3, 4))
    past = (randn(2, 2, 2, 4), randn(2, 2, 2, 4))
    return expect_user_error(lambda: cache.update(0, 3, *past), "writing past max_len")


def _implied(mask: Tensor | None, T: int, S: int) -> Tensor:
    """The boolean (T, S) mask attention applies; None means causal (T > 1) or everything."""
    if mask is None:
        return torch.ones(T, S, dtype=torch.bool).tril(S - T)
    return mask.expand(T, S).bool()


def check_mask(code) -> str:
    cases = [(None, 5, 0), (None, 1, 7), (None, 3, 4), (4, 6, 0), (4, 1, 9), (4, 3, 5), (64, 3, 5)]
    for window, T, start in cases:
        mine = baby_model("mixtral", cls=code.MoETransformer, num_layers=1, sliding_window=window)
        ref = baby_model("mixtral", num_layers=1, sliding_window=window)
        pos, S = torch.arange(start, start + T), start + T
        got = mine._mask(pos, S, torch.device("cpu"))
        want = ref._mask(pos, S, torch.device("cpu"))
        expect(
            torch.equal(_implied(got, T, S), _implied(want, T, S)),
            f"T={T} new tokens at start={start}, sliding window {window}: the positions "
            "attended to are wrong",
        )
    return "causal, chunk and one-token masks, with and without a sliding window"


def _stepwise(code, arch: str, seed: int, chunks: tuple, what: str, tensor_start=False, **config):
    """A baby model built from the student's classes, fed two sequences `chunks` at a time
    through the student's KV cache (the one-token steps at a (1,) tensor position when
    `tensor_start`, as the compiled step does), gives one full forward's logits."""
    model = baby_model(arch, seed=seed, cls=code.MoETransformer, **config)
    cfg, S = model.cfg, sum(chunks)
    ids = random_ids(cfg.vocab_size, (2, S), seed=seed - 1)
    cache = code.KVCache(cfg.num_layers, 2, cfg.num_kv_heads, S, cfg.head_dim, "cpu", torch.float32)
    steps, start = [], 0
    with torch.no_grad():
        full = model(ids)
        for T in chunks:
            at = torch.tensor([start]) if tensor_start and T == 1 else start
            steps.append(model(ids[:, start : start + T], cache=cache, start=at))
            start += T
    got = torch.cat(steps, dim=1)
    expect_close(got, full, f"{arch}: logits of {what}", atol=1e-5, rtol=1e-4)


DECODE = "prefill (5), chunk (3) and 4 one-token steps vs one full forward"


def check_decode_olmoe(code) -> str:
    _stepwise(code, "olmoe", 3, (5, 3, 1, 1, 1, 1), DECODE)
    return "prefill, a chunk and single tokens give the full forward's logits"


def check_decode_window(code) -> str:
    _stepwise(code, "mixtral", 3, (5, 3, 1, 1, 1, 1), DECODE, sliding_window=4)
    return "the same with a sliding window of 4 over 12 positions"


def check_static_step(code) -> str:
    what = "prefill (5) and 4 static-shape steps (tensor start) vs one forward"
    _stepwise(code, "qwen3_moe", 4, (5, 1, 1, 1, 1), what, tensor_start=True)
    return "prefill, then one-token steps at a tensor position, give the full forward's logits"


KV_CACHE = Exercise(
    id="kv-cache",
    title="The KV cache: decoding step by step equals one full forward",
    concepts=(
        "preallocated KV cache",
        "views, not copies",
        "causal and sliding-window masks",
        "prefill vs decode",
    ),
    targets=targets(
        "tinymoe.engine.kvcache:KVCache.update",
        "tinymoe.engine.model:MoETransformer._mask",
    ),
    minutes=35,
    prerequisites=("norm-rope",),
    checks=(
        ("cached values", check_update_values),
        ("no copies", check_update_views),
        ("a full cache", check_update_full),
        ("tensor start (the compiled step)", check_update_tensor_start),
        ("attention masks", check_mask),
        ("decode equals full forward", check_decode_olmoe),
        ("sliding window", check_decode_window),
        ("static-shape decode step", check_static_step),
    ),
    engine_checks=("decode equals full forward", "sliding window", "static-shape decode step"),
    given=("TinyMoeError",),
)
