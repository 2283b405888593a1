"""run.py: a baby checkpoint end to end, and one stderr line (no traceback) for each user mistake.

Most cases call run.py's `cli()` in this process (fast); two run `python run.py` for real, to
check what a user sees: the exit status, stdout and stderr of a separate process.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import add_tokenizer, make_checkpoint

import tinymoe
from tinymoe.engine.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_cli", ROOT / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

PROMPT = "the cat sat on the"
JSON_KEYS = {
    "text",
    "tokens",
    "prompt_tokens",
    "ttft_ms",
    "tpot_ms",
    "tpot_p50_ms",
    "tpot_p90_ms",
    "tokens_per_s",
    "peak_memory_mb",
}


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    """A baby OLMoE checkpoint with a word-level tokenizer.json: everything run.py needs."""
    return add_tokenizer(make_checkpoint(tmp_path_factory.mktemp("cli") / "baby"))


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run run.py's cli(argv) in-process: (exit status, stdout, stderr)."""
    try:
        rc = run.cli(argv)
    except SystemExit as e:  # argparse exits by itself
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def run_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def assert_one_error_line(rc: int, err: str, *words: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


def test_json_end_to_end(baby):
    """`python run.py --json` prints one JSON object whose tokens are tinymoe's greedy ones."""
    p = run_process(
        "--model", str(baby), "--prompt", PROMPT, "--max-new-tokens", "6",
        "--device", "cpu", "--json",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out) >= JSON_KEYS
    tokenizer = load_tokenizer(baby)
    prompt_ids = tokenizer.encode(PROMPT).ids
    want = tinymoe.generate(tinymoe.load_model(baby), prompt_ids, max_new_tokens=6).tokens
    assert out["tokens"] == want
    assert out["text"] == tokenizer.decode(want)
    assert out["prompt_tokens"] == len(prompt_ids) == 5
    assert out["ttft_ms"] > 0 and out["tpot_ms"] > 0 and out["tokens_per_s"] > 0
    assert out["tpot_p50_ms"] <= out["tpot_p90_ms"] and out["peak_memory_mb"] > 0


def test_text_mode_streams_then_summarises(baby, capsys):
    rc, out, err = call(
        ["--model", str(baby), "--prompt", PROMPT, "--max-new-tokens", "4", "--device", "cpu"],
        capsys,
    )
    assert rc == 0
    assert out.startswith(PROMPT) and len(out.strip()) > len(PROMPT)
    assert "TTFT" in err and "TPOT" in err and "tokens/s" in err


def test_bad_model_path_in_a_real_process(tmp_path):
    p = run_process("--model", str(tmp_path / "nowhere"), "--prompt", "hi", "--device", "cpu")
    assert p.stdout == ""
    assert_one_error_line(p.returncode, p.stderr, "--model", "nowhere", "not a directory")


def test_bad_checkpoint(baby, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((baby / "tokenizer.json").read_bytes())
    (broken / "config.json").write_bytes((baby / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 7)
    rc, _, err = call(["--model", str(broken), "--prompt", PROMPT, "--device", "cpu"], capsys)
    assert_one_error_line(rc, err, "model.safetensors")


def test_missing_tokenizer(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "no-tokenizer")
    rc, _, err = call(["--model", str(ckpt), "--prompt", PROMPT, "--device", "cpu"], capsys)
    assert_one_error_line(rc, err, "tokenizer.json")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--top-p", "2"], ["--top-p", "2.0"]),
        (["--temperature", "-1"], ["--temperature"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens: expected a positive integer, got '0'"]),
        (["--max-new-tokens", "x"], ["--max-new-tokens: expected a positive integer, got 'x'"]),
        (["--dtype", "int8"], ["--dtype", "int8"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--threads", "0"], ["--threads: expected a positive integer, got '0'"]),
        (["--threads", "-3"], ["--threads: expected a positive integer, got '-3'"]),
        (["--no-such-flag"], ["--no-such-flag"]),
    ],
)
def test_bad_flag_value(baby, capsys, flags, words):
    argv = ["--model", str(baby), "--prompt", PROMPT, "--device", "cpu", *flags]
    rc, out, err = call(argv, capsys)
    assert out == ""
    assert_one_error_line(rc, err, *words)


def test_missing_required_flag(capsys):
    rc, _, err = call(["--model", "x"], capsys)
    assert_one_error_line(rc, err, "--prompt")


def test_shared_flags_in_help(capsys):
    """--dtype auto (the default) and --threads, with the reasons a user needs to choose."""
    with pytest.raises(SystemExit):
        run.cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    assert (
        "auto: the checkpoint's dtype on CUDA; on CPU float32 (CPU bf16 matmuls are slow) where "
        "it fits in memory, else the checkpoint's dtype" in text
    )
    assert "1 thread can be 10-60x faster" in text


def test_threads_and_dtype_flags_run(baby, capsys):
    argv = ["--model", str(baby), "--prompt", PROMPT, "--max-new-tokens", "3", "--json"]
    rc, out, _ = call([*argv, "--threads", "1", "--dtype", "auto"], capsys)
    assert rc == 0
    rc, out32, _ = call([*argv, "--dtype", "float32"], capsys)
    assert rc == 0 and json.loads(out)["tokens"] == json.loads(out32)["tokens"]  # auto on CPU
