"""The KV cache: decoding step by step with the cache gives the logits of one full forward pass.

The sequence is fed as a prefill, then a short chunk (new tokens that must not see each other's
future: the masked path with start > 0), then one token at a time, the way generate() runs.
"""

import pytest
import torch
from conftest import make_checkpoint

import tinymoe
from tinymoe.engine.kvcache import KVCache

SEQ = 14
CASES = {
    # Mixtral with a window shorter than the prefill and than the whole sequence.
    "mixtral-window": dict(model_type="mixtral", sliding_window=4),
    # Window longer than the sequence: attends to everything, like no window.
    "mixtral-long-window": dict(model_type="mixtral", sliding_window=64),
    "olmoe-clip": dict(model_type="olmoe", clip_qkv=0.5),
    "qwen3-head-dim": dict(model_type="qwen3_moe", head_dim=12),
}


def new_cache(model: tinymoe.MoETransformer, batch: int, max_len: int) -> KVCache:
    cfg = model.cfg
    return KVCache(
        cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, "cpu", torch.float32
    )


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_decoding_matches_full_forward(case, tmp_path):
    model = tinymoe.load_model(make_checkpoint(tmp_path, seed=3, **CASES[case]))
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0)
    )
    cache = new_cache(model, batch=2, max_len=SEQ)
    with torch.no_grad():
        full = model(ids)  # (2, SEQ, V)
        steps = [model(ids[:, :6], cache=cache, start=0)]  # prefill, longer than the window
        steps.append(model(ids[:, 6:9], cache=cache, start=6))  # a chunk of 3 new tokens
        for pos in range(9, SEQ):  # then one token at a time
            steps.append(model(ids[:, pos : pos + 1], cache=cache, start=pos))
    incremental = torch.cat(steps, dim=1)  # (2, SEQ, V)
    assert incremental.shape == full.shape
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_sliding_window_matters(tmp_path):
    """The window case above is not vacuous: the same weights without a window differ."""
    windowed = tinymoe.load_model(
        make_checkpoint(tmp_path / "w", seed=3, **CASES["mixtral-window"])
    )
    plain = tinymoe.load_model(make_checkpoint(tmp_path / "p", seed=3, model_type="mixtral"))
    ids = torch.randint(0, 96, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = windowed(ids), plain(ids)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-5, rtol=0)  # inside the window: same
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3  # beyond it: the window hides old tokens


def test_cache_overflow_is_an_error(tmp_path):
    model = tinymoe.load_model(make_checkpoint(tmp_path))
    cache = new_cache(model, batch=1, max_len=4)
    with torch.no_grad(), pytest.raises(tinymoe.TinyMoeError, match="KV cache holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache, start=0)
