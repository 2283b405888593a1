"""`tinymoe simulate` (and `tinymoe bench`, which shares its run flags): every user mistake is one
`error:` line and exit status 2 before the model loads; the CUDA branch's arguments (no simulated
link there: the real one, measured); sweeps."""

import json

import pytest
import torch
from conftest import make_checkpoint

from tinymoe import bench, simulate
from tinymoe.offload.link import LinkSpec
from tinymoe.simulator import record


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sim") / "m", max_position_embeddings=64)


@pytest.fixture
def no_loading(monkeypatch):
    """load_model raises if called: a refusal must come before it."""
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("load_model was called")

    monkeypatch.setattr(simulate, "load_model", refuse)
    monkeypatch.setattr(bench, "load_model", refuse)
    return calls


def status(cli, argv: list[str]) -> int:
    """cli(argv)'s exit status: returned (a TinyMoeError) or raised (argparse's SystemExit)."""
    try:
        return cli(argv)
    except SystemExit as e:
        return e.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


BAD = [
    (["--copy-share", "1"], "--copy-share"),
    (["--copy-share", "0"], "--copy-share"),
    (["--validate", "--repeat", "0"], "--repeat"),
    (["--max-new-tokens", "1"], "--max-new-tokens"),
    (["--max-new-tokens", "70"], "max_position_embeddings"),  # 32 + 70 > 64 positions
    (["--lookahead", "3"], "lookahead"),  # the model has 3 layers: 1 or 2
]


@pytest.mark.parametrize("flags,named", BAD)
def test_simulate_refuses_before_loading(ckpt, capsys, no_loading, flags, named):
    argv = ["--model", str(ckpt), "--device", "cpu", "--policies", "on-demand", *flags]
    assert status(simulate.cli, argv) == 2
    assert named in one_error_line(capsys)
    assert no_loading == []


@pytest.mark.parametrize("flags,named", BAD[:5])
def test_bench_refuses_before_loading(ckpt, capsys, no_loading, flags, named):
    flags = [f for f in flags if f != "--validate"]
    assert status(bench.cli, ["--model", str(ckpt), "--device", "cpu", *flags]) == 2
    assert named in one_error_line(capsys)
    assert no_loading == []


# ---------------------------------------------------------------- CUDA: the real link


def test_no_simulated_link_on_cuda(monkeypatch):
    """The recording's runtime gets no link on CUDA (its real copy engine); the trace records the
    real link as measured. On a CPU both are the simulated link."""
    measured = LinkSpec(12.5, 3.0, "measured: pinned host-to-device")
    monkeypatch.setattr(
        record, "measure_h2d_link", lambda device, nbytes: (measured.gbps, measured.latency_us)
    )
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert record.recording_link(cuda, None, 1000) == (None, measured)
    with pytest.raises(record.TinyMoeError, match="real link"):
        record.recording_link(cuda, LinkSpec(1.0, 0.0, "x"), 1000)
    given = LinkSpec(2.0, 5.0, "given")
    assert record.recording_link(cpu, given, 1000) == (given, given)
    assert record.recording_link(cpu, None, 1000)[0].gbps > 0  # the default preset


@pytest.mark.parametrize("flags", [["--copy-share", "0.5"], ["--link-gbps", "4"]])
def test_simulate_on_cuda_refuses_simulated_link_flags_before_loading(
    ckpt, capsys, no_loading, monkeypatch, flags
):
    monkeypatch.setattr(simulate, "device_from_args", lambda args: torch.device("cuda"))
    assert status(simulate.cli, ["--model", str(ckpt), *flags]) == 2
    assert flags[0] in one_error_line(capsys) and no_loading == []


def test_run_record_on_cuda_refuses_link_flags_before_loading(ckpt, capsys, monkeypatch, tmp_path):
    from tinymoe import run

    monkeypatch.setattr(run, "device_from_args", lambda args: torch.device("cuda"))
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("loaded"))
    argv = ["--model", str(ckpt), "--prompt", "x", "--offload-policy", "lru"]
    argv += ["--link-gbps", "4", "--record", str(tmp_path / "t.json")]
    assert status(run.cli, argv) == 2
    assert "--link-gbps" in one_error_line(capsys)


def test_device_copies_provider_gives_the_resident_tokens(ckpt):
    """The recording pass's provider where experts live in host memory (CUDA offloading): each
    expert copied to the compute device. On a CPU the copy is a no-op; the tokens must match."""
    from tinymoe import generate, load_model

    model = load_model(ckpt, device="cpu")
    want = generate(model, [1, 2, 3], 5, eos_ids=()).tokens
    model.provider = record.DeviceCopies(model)
    try:
        got = generate(model, [1, 2, 3], 5, eos_ids=()).tokens
    finally:
        model.provider = None
    assert got == want


# ---------------------------------------------------------------- sweeps


def test_sweep_one_table_a_row_per_policy_and_point(ckpt, capsys, monkeypatch):
    recorded = []
    real = simulate.record_run
    monkeypatch.setattr(
        simulate, "record_run", lambda *a: recorded.append(a[-1]) or real(*a)
    )  # a trace per lookahead, none per cache size
    argv = ["--model", str(ckpt), "--device", "cpu", "--policies", "on-demand,prefetch+oracle+lru"]
    argv += ["--max-new-tokens", "4", "--sweep", "expert-slots=2,5", "--sweep", "lookahead=1,2"]
    assert simulate.cli([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(recorded) == [1, 2]
    assert len(result["points"]) == 4 and len(result["rows"]) == 8
    for r in result["rows"]:
        assert r["expert_slots"] == r["expert-slots"] and r["lookahead"] in (1, 2)
    assert simulate.cli(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert sum(" prefetch+oracle+lru " in line for line in table) == 4


SWEEP_BAD = [
    (["--sweep", "slots=1,2"], "AXIS"),
    (["--sweep", "expert-slots=2", "--expert-slots", "3"], "give one"),
    (["--sweep", "lookahead=1", "--sweep", "lookahead=2"], "twice"),
    (["--plot", "x.png"], "--sweep"),
    (["--sweep", "hardware=a6000,tpu"], "tpu"),
]


@pytest.mark.parametrize("flags,named", SWEEP_BAD)
def test_sweep_mistakes_are_one_line_before_loading(ckpt, capsys, no_loading, flags, named):
    assert status(simulate.cli, ["--model", str(ckpt), "--device", "cpu", *flags]) == 2
    assert named in one_error_line(capsys) and no_loading == []


def test_plot_without_matplotlib_names_the_extra(ckpt, capsys, request, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        no_loading = request.getfixturevalue("no_loading")
        argv = ["--model", str(ckpt), "--sweep", "expert-slots=2,4", "--plot", "p.png"]
        assert status(simulate.cli, argv) == 2
        assert 'pip install -e ".[plot]"' in one_error_line(capsys) and no_loading == []
    else:  # with matplotlib: the plot is drawn
        out = tmp_path / "p.png"
        argv = ["--model", str(ckpt), "--device", "cpu", "--policies", "on-demand,lru"]
        argv += ["--max-new-tokens", "3", "--sweep", "expert-slots=2,4", "--plot", str(out)]
        assert simulate.cli(argv) == 0 and out.stat().st_size > 0
