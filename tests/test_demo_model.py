"""The shipped demo model (weights/pydoc-moe) and the script that trains it (tinymoe/train.py).

The checkpoint tests use the committed weights; training never runs here except for a seconds-long
smoke run of `tinymoe.train.main` on a toy corpus. tests/fixtures/heldout_sample.txt is the start
of library/bisect.rst.txt as train.py cleans it: a held-out file, never seen in training.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinymoe import MoETransformer, load_model
from tinymoe.corpus import EOS, clean_rst
from tinymoe.engine.tokenizer import load_tokenizer
from tinymoe.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "weights" / "pydoc-moe"
SAMPLE = (Path(__file__).parent / "fixtures" / "heldout_sample.txt").read_text(encoding="utf-8")


def perplexity(model: MoETransformer, ids: list[int], seq_len: int = 256) -> float:
    """exp(mean next-token loss) over consecutive seq_len windows of ids."""
    t = torch.tensor(ids)
    n = (len(ids) - 1) // seq_len
    x = t[: n * seq_len].view(n, seq_len)  # (n, T)
    y = t[1 : n * seq_len + 1].view(n, seq_len)  # (n, T)
    with torch.no_grad():
        logits = model(x)  # (n, T, V)
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item())


@pytest.fixture(scope="module")
def demo() -> MoETransformer:
    torch.set_num_threads(2)
    return load_model(DEMO, dtype=torch.float32)


def test_shape_meets_the_brief(demo: MoETransformer) -> None:
    cfg = demo.cfg
    total = sum(p.numel() for p in demo.parameters())
    experts = sum(p.numel() for p in demo.experts.parameters())
    assert experts / total >= 0.85
    assert cfg.num_layers >= 6 and cfg.num_experts >= 16 and cfg.top_k >= 2
    assert (DEMO / "model.safetensors").stat().st_size <= 30e6
    assert cfg.model_type == "qwen3_moe"


def test_tokenizer_round_trips_and_knows_eos(demo: MoETransformer) -> None:
    tok = load_tokenizer(DEMO)
    for text in (SAMPLE, "déjà vu ✓ — \t tabs\n\nand ünïcode 🐍"):
        assert tok.decode(tok.encode(text).ids) == text
    assert demo.cfg.eos_token_ids == (tok.token_to_id(EOS),)


def test_trained_model_beats_untrained_on_heldout_text(demo: MoETransformer) -> None:
    ids = load_tokenizer(DEMO).encode(SAMPLE).ids
    trained = perplexity(demo, ids)
    untrained = perplexity(MoETransformer(demo.cfg).init_weights(seed=0, std=0.02).eval(), ids)
    print(f"held-out sample perplexity: trained {trained:.1f}, untrained {untrained:.1f}")
    assert trained < 0.2 * untrained


def test_transformers_loads_checkpoint_and_logits_match(demo: MoETransformer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(DEMO).encode(SAMPLE).ids[:96]])  # (1, T)
    with torch.no_grad():
        ours, theirs = demo(ids), hf(ids).logits  # (1, T, V) each
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_clean_rst_keeps_prose_and_code_drops_markup() -> None:
    rst = (
        ".. _label:\n\nTitle\n=====\n\n.. index:: single: foo\n   pair: bar\n\n"
        ".. function:: spam(x, *, eggs=None)\n   :noindex:\n\n"
        "   Call :func:`print` on ``x``; see :ref:`the guide <guide>` and :pep:`8`.\n"
        "   Example::\n\n      spam(1)\n\n   .. versionadded:: 3.10\n\n"
        ".. toctree::\n   :maxdepth: 2\n\n   intro.rst\n\n\n\nThe end.\n"
    )
    assert clean_rst(rst) == (
        "Title\n\nspam(x, *, eggs=None)\n\n"
        "   Call print on x; see the guide and PEP 8.\n"
        "   Example:\n\n      spam(1)\n\n   New in version 3.10.\n\nThe end.\n"
    )


@pytest.mark.slow
def test_train_script_runs_resumes_and_exports(tmp_path: Path) -> None:
    corpus = tmp_path / "sources"
    corpus.mkdir()
    for n in range(4):
        (corpus / f"doc{n}.rst.txt").write_text(
            f"Doc {n}\n=====\n\nThe :func:`len` of a list is its size.\n" * 20
        )
    common = [
        *("--corpus-dir", str(corpus), "--data-dir", str(tmp_path / "data")),
        *("--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")),
        *("--holdout-every", "2", "--vocab-size", "300", "--layers", "2", "--hidden", "32"),
        *("--head-dim", "16", "--kv-heads", "1", "--experts", "4", "--top-k", "2"),
        *("--expert-dim", "16", "--batch-size", "2", "--seq-len", "16", "--warmup", "2"),
        *("--save-every", "2", "--eval-tokens", "64", "--threads", "1"),
    ]
    assert train_main([*common, "--steps", "3"]) == 0
    assert train_main([*common, "--steps", "5", "--resume"]) == 0
    metrics = json.loads((tmp_path / "out" / "training_metrics.json").read_text())
    assert metrics["steps"] == 5 and math.isfinite(metrics["heldout_loss"])
    assert len(metrics["expert_usage_percent"]) == 2
    assert "PSF" in (tmp_path / "out" / "README.md").read_text()
    model = load_model(tmp_path / "out")
    assert model.cfg.num_experts == 4 and model.cfg.eos_token_ids == (0,)
