"""Shared fixtures: baby checkpoints built with tinymoe itself (no transformers, no network),
and the helpers that write exercise answers (a starter with its holes filled)."""

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch.utils._python_dispatch import TorchDispatchMode

from tinymoe import ModelConfig, MoETransformer, save_model


def make_checkpoint(
    path: Path, seed: int = 0, model_type: str = "olmoe", std: float = 0.2, **overrides
) -> Path:
    """Write a random baby checkpoint (config.json + model.safetensors) to path; return path.

    std is large enough that routing is not uniform and experts differ (unlike a 0.02 init).
    """
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
        qk_norm={"olmoe": "full", "qwen3_moe": "head", "mixtral": "none"}[model_type],
        norm_topk_prob=model_type == "mixtral",
        eos_token_ids=(),
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    torch.manual_seed(seed)
    model = MoETransformer(cfg).init_weights(seed=seed, std=std)
    with torch.no_grad():  # non-trivial norm weights, so tests notice a norm applied wrongly
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    return path


def count_host_reads(monkeypatch, names: tuple[str, ...]) -> dict[str, int]:
    """Count the calls of the Tensor methods `names` (those that turn a tensor into host
    values: on CUDA each one synchronises), until monkeypatch undoes it. Returns the live
    counts, name -> calls; zero them with `.update(dict.fromkeys(counts, 0))`."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Baby models gain nothing from threads, and where cores are shared (or oversubscribed)
    OpenMP threads spin-waiting for each other make every small matmul take milliseconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def baby_dir(tmp_path: Path) -> Path:
    """A 3-layer, 8-expert, top-2 OLMoE-shaped checkpoint."""
    return make_checkpoint(tmp_path / "baby")


TOKENIZER_TEXT = [
    "the cat sat on the mat .",
    "a dog ran in the park and the cat ran after it .",
    "experts are routed per token , and each token uses two experts .",
]


def add_tokenizer(path: Path, vocab_size: int = 96) -> Path:
    """Write a tiny word-level tokenizer.json (at most vocab_size ids) into checkpoint dir path."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"])
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(path / "tokenizer.json"))
    return path


class CountOps(TorchDispatchMode):
    """Counts the aten operations run under it (views, casts and matmuls alike), by name
    (tests/test_decode_path.py and tests/bench_vs_transformers.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- exercise answers


def fill(text: str, name: str, body: str) -> str:
    """Replace the hole `name` in a starter with `body` (dedented; indented to fit)."""
    pattern = re.compile(rf'^( *)raise NotImplementedError\("hole: {re.escape(name)} \(.*$', re.M)
    match = pattern.search(text)
    assert match, f"no hole {name}"
    code = textwrap.indent(textwrap.dedent(body).strip("\n"), match.group(1)) + "\n"
    return text[: match.start()] + code + text[match.end() + 1 :]


def started(tmp_path: Path, exercise_id: str) -> Path:
    """Write exercise `exercise_id`'s starter into tmp_path (as `exercises start` does)."""
    from tinymoe.exercises.catalog import get
    from tinymoe.exercises.holes import write_starter

    return write_starter(get(exercise_id), tmp_path, force=True)
