"""What a new user meets (issue 9): mistakes caught before the long work, as one stderr line;
destructive defaults refused; Ctrl-C and closed pipes; help text; sampling and prompt flags.
The `tinymoe` command and README.md's commands: tests/test_commands.py."""

import hashlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import add_tokenizer, make_checkpoint
from test_calibrate import write_text

from tinymoe import bench, calibrate, evaluate, train
from tinymoe import run as run_tool
from tinymoe.engine.generate import sample
from tinymoe.engine.tokenizer import StopStrings
from tinymoe.speculation.calibration import META_FILE, TENSORS_FILE

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "pydoc-moe"
PROMPT = "the cat sat on the"


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    return add_tokenizer(make_checkpoint(tmp_path_factory.mktemp("surface") / "baby"))


def call(tool, argv: list[str], capsys) -> tuple[int, str, str]:
    """A tool's cli(argv) in this process: (exit status, stdout, stderr)."""
    try:
        rc = tool.cli(argv)
    except SystemExit as e:  # argparse exits by itself
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc: int, err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


# ---------------------------------------------------------------- caught before the long work


def test_trace_to_a_missing_folder_fails_before_generating(baby, tmp_path, capsys):
    argv = ["--model", str(baby), "--prompt", PROMPT, "--trace", str(tmp_path / "no" / "t.json")]
    rc, out, err = call(run_tool, argv, capsys)
    assert out == ""  # not even the prompt: nothing was generated
    one_error_line(rc, err, "--trace", "does not exist")


def test_huge_max_new_tokens_is_one_line_before_the_prompt_is_printed(baby, capsys):
    argv = ["--model", str(baby), "--prompt", PROMPT, "--max-new-tokens", "1000000000"]
    rc, out, err = call(run_tool, argv, capsys)
    assert out == ""
    one_error_line(rc, err, "max_position_embeddings (4096)", "--allow-long")
    # Past the position limit on purpose: then the KV cache (384 GB here) is what is refused.
    rc, out, err = call(run_tool, [*argv, "--allow-long"], capsys)
    assert rc == 2 and out == "" and "warning:" in err
    assert err.strip().splitlines()[-1].startswith("error: the KV cache for 1000000005 positions")


def test_prompt_longer_than_the_model_allows(tmp_path, capsys):
    short = add_tokenizer(make_checkpoint(tmp_path / "short", max_position_embeddings=16))
    long_prompt = " ".join(["the cat sat on the mat ."] * 3)  # 21 tokens
    argv = ["--model", str(short), "--prompt", long_prompt, "--max-new-tokens", "2", "--json"]
    rc, _, err = call(run_tool, argv, capsys)
    one_error_line(rc, err, "prompt (21 tokens)", "max_position_embeddings (16)")
    rc, out, err = call(run_tool, [*argv, "--allow-long"], capsys)
    assert rc == 0 and len(json.loads(out)["tokens"]) == 2 and err.startswith("warning:")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--lookahead", "2"], ["--lookahead needs a predictor"]),
        (["--prefetch-depth", "2"], ["--prefetch-depth needs a predictor"]),
        (["--top-k", "5"], ["--top-k only matters when sampling"]),
        (["--seed", "1"], ["--seed only matters when sampling"]),
        (["--threads", "0"], ["--threads: expected a positive integer, got '0'"]),
        (["--max-new-tokens", "x"], ["--max-new-tokens: expected a positive integer, got 'x'"]),
        (["--stop", ""], ["--stop"]),
    ],
)
def test_run_flags_that_would_mean_nothing_are_refused(baby, capsys, flags, words):
    rc, out, err = call(run_tool, ["--model", str(baby), "--prompt", PROMPT, *flags], capsys)
    assert out == ""
    one_error_line(rc, err, *words)


@pytest.mark.parametrize("tool", [bench, evaluate, calibrate])
def test_threads_zero_is_one_line_in_every_tool(baby, capsys, tool):
    argv = ["--model", str(baby), "--threads", "0"]
    if tool is not bench:
        argv += ["--text", "x"]
    rc, _, err = call(tool, argv, capsys)
    one_error_line(rc, err, "--threads: expected a positive integer, got '0'")


def test_unknown_format_version_is_refused_before_generating(baby, tmp_path, capsys):
    model = tmp_path / "v99"
    model.mkdir()
    for f in baby.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / TENSORS_FILE).write_bytes(b"")
    (model / META_FILE).write_text(json.dumps({"format_version": 99, "estimators": [],
                                               "hybrid_layers": {}}))  # fmt: skip
    rc, out, err = call(run_tool, ["--model", str(model), "--prompt", PROMPT,
                                   "--prefetch", "router"], capsys)  # fmt: skip
    one_error_line(rc, err, "format_version 99 is not supported")
    assert out == ""  # the predictor is built before the prompt is printed
    text = write_text(tmp_path / "held.txt")
    rc, out, err = call(evaluate, ["--model", str(model), "--text", str(text)], capsys)
    assert out == ""
    one_error_line(rc, err, "format_version 99 is not supported")


def test_plot_without_matplotlib_fails_before_evaluating(baby, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises
    argv = ["--model", str(baby), "--text", "/never/read.txt", "--plot", str(tmp_path / "p.png")]
    rc, out, err = call(evaluate, argv, capsys)
    assert out == ""
    one_error_line(rc, err, "--plot needs matplotlib")


def test_plot_to_a_missing_folder_fails_before_evaluating(baby, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["--model", str(baby), "--text", "/never/read.txt", "--plot", str(tmp_path / "x/p.png")]
    rc, out, err = call(evaluate, argv, capsys)
    one_error_line(rc, err, "--plot", "does not exist")


def test_evaluate_says_when_it_reads_fewer_tokens(baby, tmp_path, capsys):
    text = write_text(tmp_path / "short.txt", sentences=10)  # about 130 tokens
    argv = ["--model", str(baby), "--text", str(text), "--seq-len", "16", "--lookahead", "1"]
    rc, _, err = call(evaluate, [*argv, "--skip-speculative", "--predictors", "router"], capsys)
    assert rc == 0
    assert re.search(r"using \d+ tokens \(\d+ windows of 16\), fewer than --tokens 4,096", err)
    # One progress bar for the whole run (its lines all start "evaluate"), none per pass.
    bars = [line for line in err.splitlines() if "ETA" in line]
    assert bars and all(line.startswith("evaluate ") for line in bars)


# ---------------------------------------------------------------- destructive defaults


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join((folder / f).read_bytes() for f in (TENSORS_FILE, META_FILE)))


def test_the_shipped_calibration_cannot_be_overwritten_by_accident(tmp_path, capsys):
    before = digest(DEMO).hexdigest()
    text = ROOT / "tests" / "fixtures" / "heldout_sample.txt"
    rc, out, err = call(calibrate, ["--model", str(DEMO), "--text", str(text)], capsys)
    one_error_line(rc, err, "already holds a calibration", "--out", "--force")
    assert digest(DEMO).hexdigest() == before


def test_calibrate_replaces_files_only_with_force(baby, tmp_path, capsys):
    text = write_text(tmp_path / "cal.txt")
    out = tmp_path / "cal"
    argv = ["--model", str(baby), "--text", str(text), "--out", str(out), "--tokens", "256"]
    argv += ["--seq-len", "32", "--lookahead", "1", "--estimator-steps", "2"]
    assert call(calibrate, argv, capsys)[0] == 0
    first = digest(out).hexdigest()
    rc, _, err = call(calibrate, [*argv, "--seed", "1"], capsys)
    one_error_line(rc, err, "--out", "--force")
    assert digest(out).hexdigest() == first
    assert call(calibrate, [*argv, "--seed", "1", "--force"], capsys)[0] == 0
    assert digest(out).hexdigest() != first


def test_calibrate_out_that_cannot_be_made_fails_before_calibrating(baby, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["--model", str(baby), "--text", "/never/read.txt", "--out", str(blocker / "cal")]
    rc, _, err = call(calibrate, argv, capsys)
    one_error_line(rc, err, "--out", "cannot create")


def test_train_refuses_to_replace_a_checkpoint(baby, tmp_path, capsys):
    argv = ["--corpus-dir", "/never/read", "--out", str(baby), "--data-dir", str(tmp_path / "d")]
    rc, _, err = call(train, [*argv, "--run-dir", str(tmp_path / "r")], capsys)
    one_error_line(rc, err, "--out", "already holds a checkpoint", "--force")


# ---------------------------------------------------------------- Ctrl-C and closed pipes


def test_ctrl_c_while_generating_ends_the_line_writes_the_trace_and_exits_130(
    baby, tmp_path, capsys, monkeypatch
):
    real_generate = run_tool.generate

    def interrupted(*args, on_token, **kwargs):
        def tick(token: int) -> bool:
            if len(seen) == 3:
                raise KeyboardInterrupt  # what Ctrl-C raises, at the fourth token
            seen.append(token)
            return on_token(token)

        seen: list[int] = []
        return real_generate(*args, on_token=tick, **kwargs)

    monkeypatch.setattr(run_tool, "generate", interrupted)
    trace = tmp_path / "t.json"
    argv = ["--model", str(baby), "--prompt", PROMPT, "--max-new-tokens", "20"]
    rc, out, err = call(run_tool, [*argv, "--offload-policy", "lru", "--trace", str(trace)], capsys)
    assert rc == 130 and out.startswith(PROMPT) and out.endswith("\n")
    assert "interrupted" in err and "Traceback" not in err
    assert json.loads(trace.read_text())["traceEvents"]  # the trace so far


def test_ctrl_c_in_the_bench_writes_the_running_policys_trace(baby, tmp_path, capsys, monkeypatch):
    real_generate = bench.generate

    def interrupted(*args, **kwargs):
        def tick(token: int) -> None:
            if token is not None and len(seen) == 2:
                raise KeyboardInterrupt  # Ctrl-C at the third token of the first policy
            seen.append(token)

        seen: list[int] = []
        return real_generate(*args, on_token=tick, **kwargs)

    monkeypatch.setattr(bench, "generate", interrupted)
    argv = ["--model", str(baby), "--policies", "lru,resident", "--max-new-tokens", "8"]
    rc, _, err = call(bench, [*argv, "--trace-dir", str(tmp_path / "traces")], capsys)
    assert rc == 130 and "Traceback" not in err
    (written,) = (tmp_path / "traces").iterdir()  # the interrupted policy's; no later one ran
    assert f"wrote the trace so far to {written}" in err
    assert json.loads(written.read_text())["traceEvents"]


# A Ctrl-C during `import torch` made deterministic: an import hook raises KeyboardInterrupt
# where the signal would, at torch's import, in a real process started the way a user does.
INTERRUPT_TORCH_IMPORT = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
"""


@pytest.mark.parametrize(
    "start",
    [
        "sys.argv = ['-m', '--help']; import runpy; runpy.run_module('tinymoe.evaluate', "
        "run_name='__main__', alter_sys=True)",  # what `python -m tinymoe.evaluate` does
        "from tinymoe.launch import main; sys.exit(main(['bench', '--help']))",  # `tinymoe ...`
        f"sys.argv = ['run.py']; import runpy; runpy.run_path({str(ROOT / 'run.py')!r}, "
        "run_name='__main__')",  # `python run.py`
    ],
)
def test_ctrl_c_while_torch_imports_exits_130_quietly(start):
    p = subprocess.run(
        [sys.executable, "-c", INTERRUPT_TORCH_IMPORT + start],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip() == "interrupted" and p.stdout == ""


def test_a_closed_pipe_ends_quietly(baby):
    cmd = f"{shlex.quote(sys.executable)} run.py --model {shlex.quote(str(baby))} --prompt "
    cmd += f"'{PROMPT}' --max-new-tokens 400 --device cpu | head -c 20"
    p = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert len(p.stdout) == 20 and p.stdout.startswith(PROMPT)
    assert p.stderr == "" and p.returncode == 141  # 128 + SIGPIPE, as a C tool would


# ---------------------------------------------------------------- help


@pytest.mark.parametrize(
    "tool, shown",
    [
        (run_tool, ["--max-new-tokens N    new tokens (default: 64)", "--seed N"]),
        (
            bench,
            [
                "(default: 32)",
                "--seed N              for the random prompt (default: 0)",
                "--repeat N",
                "(default: 1)",
                "share S",
                "default: off",
                "prefetch+P",
                "previous-token",
            ],
        ),  # fmt: skip
        (
            evaluate,
            [
                "--tokens N            held-out tokens to read (default: 4096)",
                "--seq-len T           tokens per window (default: 256)",
            ],
        ),  # fmt: skip
        (calibrate, ["(default: 65536)", "--force"]),
        (train, ["(default: 1600)", "--force"]),
    ],
)
def test_help_shows_defaults_and_one_usage_style(tool, shown, capsys):
    rc, out, _ = call(tool, ["--help"], capsys)
    assert rc == 0
    name = tool.__name__.split(".")[-1]
    assert out.startswith(f"usage: tinymoe {name} ")
    flat = " ".join(out.split())
    for text in shown:
        assert " ".join(text.split()) in flat, text
    threads = re.search(r"--threads N torch CPU threads \(default: (\d+),", flat)
    assert threads and int(threads.group(1)) >= 1


# ---------------------------------------------------------------- sampling, stops, prompts


def test_top_k_samples_only_the_k_likeliest():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(3, dim=-1).indices
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        ids = sample(logits, 2.0, 1.0, gen, top_k=3)
        assert (allowed == ids[:, None]).any(dim=-1).all()
    assert torch.equal(sample(logits, 1.0, 1.0, gen, top_k=1), logits.argmax(-1))


def test_stop_strings_hold_back_a_possible_start_and_cut_at_the_match():
    s = StopStrings(["</s>", "\n\n"])
    assert s.push("hello <") == "hello "  # "<" may begin "</s>"
    assert s.push("b>") == "<b>"
    assert s.push(" end\n") == " end"
    assert s.push("\nmore") == "" and s.matched == "\n\n"
    assert s.push("ignored") == "" and s.flush() == ""
    t = StopStrings(["xyz"])
    assert t.push("abcx") == "abc" and t.flush() == "x" and t.matched is None


def test_run_stops_at_a_stop_string(baby, capsys):
    argv = ["--model", str(baby), "--prompt", PROMPT, "--max-new-tokens", "12", "--json"]
    full = json.loads(call(run_tool, argv, capsys)[1])
    words = full["text"].split()
    stop = words[len(words) // 2]
    rc, out, _ = call(run_tool, [*argv, "--stop", stop], capsys)
    got = json.loads(out)
    assert rc == 0 and got["stop"] == stop and stop not in got["text"]
    assert full["text"].startswith(got["text"]) and len(got["tokens"]) < len(full["tokens"])
    rc, out, _ = call(run_tool, argv[:-1] + ["--stop", stop], capsys)  # text mode
    assert rc == 0 and out == PROMPT + full["text"][: full["text"].find(stop)] + "\n\n"


def test_prompt_from_a_file_or_stdin(baby, tmp_path, capsys, monkeypatch):
    base = ["--model", str(baby), "--max-new-tokens", "4", "--json"]
    want = json.loads(call(run_tool, [*base, "--prompt", PROMPT], capsys)[1])["tokens"]
    (tmp_path / "p.txt").write_text(PROMPT, encoding="utf-8")
    got = json.loads(call(run_tool, [*base, "--prompt-file", str(tmp_path / "p.txt")], capsys)[1])
    assert got["tokens"] == want
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    assert json.loads(call(run_tool, [*base, "--prompt-file", "-"], capsys)[1])["tokens"] == want
    rc, _, err = call(run_tool, [*base, "--prompt-file", str(tmp_path / "none.txt")], capsys)
    one_error_line(rc, err, "--prompt-file", "none.txt")
    rc, _, err = call(run_tool, [*base, "--prompt", "x", "--prompt-file", "-"], capsys)
    one_error_line(rc, err, "not allowed with")
