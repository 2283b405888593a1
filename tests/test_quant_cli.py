"""--expert-quant on the tools: one `error:` line before loading, and runs end to end."""

import json

import pytest
from conftest import add_tokenizer, make_checkpoint

from tinymoe import bench, evaluate, load_model, simulate
from tinymoe import run as run_tool
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.quant import QuantFormat
from tinymoe.simulator.record import RoutingTrace, record_run
from tinymoe.speculation.oracle import record_routing


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    return add_tokenizer(make_checkpoint(tmp_path_factory.mktemp("qcli") / "baby"))


def one_error(capsys, rc: int, *words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err


def test_mistakes_are_one_line_before_loading(baby, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("loaded the model before refusing")

    monkeypatch.setattr(run_tool, "load_model", no_load)
    base = ["--model", str(baby), "--prompt", "the cat", "--device", "cpu"]
    one_error(capsys, run_tool.cli([*base, "--expert-quant", "int4", "--expert-group-size", "40"]),
              "does not divide")  # fmt: skip
    one_error(capsys, run_tool.cli([*base, "--expert-group-size", "32"]), "needs --expert-quant")
    with pytest.raises(SystemExit):
        run_tool.cli([*base, "--expert-quant", "int3"])
    monkeypatch.setattr(bench, "load_model", no_load)
    with pytest.raises(SystemExit):  # argparse's own one line
        bench.cli(["--model", str(baby), "--expert-quant", "int4,int4", "--device", "cpu"])
    assert "distinct comma-separated" in capsys.readouterr().err


def test_run_with_quantized_experts_offloaded_equals_resident(baby, capsys):
    """`tinymoe run --expert-quant int4`: resident and offloaded give the same tokens."""
    base = ["--model", str(baby), "--prompt", "the cat sat", "--max-new-tokens", "6"]
    base += ["--device", "cpu", "--json", "--expert-quant", "int4"]
    assert run_tool.cli(base) == 0
    resident = json.loads(capsys.readouterr().out)
    assert run_tool.cli([*base, "--offload-policy", "lru", "--expert-slots", "3"]) == 0
    offloaded = json.loads(capsys.readouterr().out)
    assert offloaded["tokens"] == resident["tokens"] and offloaded["expert_quant"] == "int4"
    assert run_tool.cli(base[:-2] + ["--json"]) == 0  # unquantized: another model's tokens
    assert json.loads(capsys.readouterr().out)["expert_quant"] == "none"


def test_bench_rows_per_format_over_one_link(baby, capsys):
    argv = ["--model", str(baby), "--device", "cpu", "--json", "--max-new-tokens", "4"]
    argv += ["--policies", "on-demand,lru,resident", "--expert-quant", "none,int4"]
    argv += ["--link-gbps", "0.5", "--expert-slots", "3"]
    assert bench.cli(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["policy"], r["expert_quant"]) for r in rows] == [
        (p, q) for q in ("none", "int4") for p in ("on-demand", "lru", "resident")
    ]
    assert all(r["exact"] for r in rows)
    od = {r["expert_quant"]: r for r in rows if r["policy"] == "on-demand"}
    assert od["int4"]["gb_copied"] < od["none"]["gb_copied"] * 0.2


def test_evaluate_reports_the_cost_against_the_model_dtype(baby, tmp_path, capsys):
    text = tmp_path / "held.txt"
    text.write_text("the cat sat on the mat and the dog sat on the cat " * 20)
    argv = ["--model", str(baby), "--text", str(text), "--device", "cpu", "--json"]
    argv += ["--tokens", "64", "--seq-len", "16", "--skip-speculative", "--predictors", "router"]
    assert evaluate.cli([*argv, "--expert-quant", "int4"]) == 0
    q = json.loads(capsys.readouterr().out)["quantization"]
    assert q["format"] == "int4, group 64" and q["kl"] > 0 and q["top1_agreement"] <= 1
    assert q["perplexity"] != q["reference_perplexity"]


def test_simulate_records_and_replays_the_quantized_experts(baby, tmp_path, capsys):
    """`simulate --expert-quant int4 --record`: the recorded run copies the codes, and the trace
    holds their bytes, which a replay (here, or projected) takes; another format is refused."""
    trace = tmp_path / "int4.json"
    argv = ["--model", str(baby), "--device", "cpu", "--json", "--max-new-tokens", "4"]
    argv += ["--policies", "on-demand,lru", "--expert-slots", "3", "--link-gbps", "0.5"]
    assert simulate.cli([*argv, "--expert-quant", "int4", "--record", str(trace)]) == 0
    rows = {r["policy"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    recorded = RoutingTrace.load(trace)
    cfg = load_model(baby).cfg
    codes = QuantFormat(4, 64).expert_bytes(cfg.expert_numel)  # 816 B of the fp32 6,144
    assert recorded.model["expert_quant"] == "int4-g64" and recorded.model["expert_bytes"] == codes
    assert rows["on-demand"]["bytes_copied"] % codes == 0 and rows["on-demand"]["bytes_copied"]
    assert simulate.cli(["--trace", str(trace), "--json", "--policies", "on-demand"]) == 0
    replayed = json.loads(capsys.readouterr().out)["rows"][0]
    assert replayed["bytes_copied"] == rows["on-demand"]["bytes_copied"]
    assert simulate.cli(["--trace", str(trace), "--expert-quant", "int8"]) == 2
    one_error(capsys, 2, "recorded with experts 'int4-g64'")


def test_run_records_a_trace_of_experts_loaded_only_quantized(baby, tmp_path, capsys):
    """run.py --record with --expert-quant and offloading: the model holds the experts only as
    codes; the recording's resident pass dequantizes them, and routes as the run did."""
    trace = tmp_path / "t.json"
    argv = ["--model", str(baby), "--prompt", "the cat sat", "--max-new-tokens", "4", "--json"]
    argv += ["--device", "cpu", "--offload-policy", "lru", "--expert-slots", "3"]
    assert run_tool.cli([*argv, "--expert-quant", "int8", "--record", str(trace)]) == 0
    capsys.readouterr()
    recorded = RoutingTrace.load(trace)
    assert recorded.model["expert_quant"] == "int8-g64" and recorded.decode_steps == 3


def test_a_recording_of_quantized_experts_routes_as_their_resident_run(baby):
    """record_run on a model loaded with --expert-quant: the trace's routing is the quantized
    experts' (a resident run of them), not the model's own dtype's."""
    prompt, recorded = [5, 17, 3, 42, 8, 61, 23, 7], {}
    for quant in ("int4", "none"):
        model = load_model(baby, expert_quant=quant)
        trace = record_run(model, prompt, 6, LinkSpec(1.0, 0.0), [], str(baby), 1)
        _, routing = record_routing(model, prompt, 6, eos_ids=())
        recorded[quant] = [[lr.experts for lr in p.layers] for p in trace.passes]
        assert recorded[quant] == [[r.ids.tolist() for r in forward] for forward in routing]
        assert trace.model["expert_quant"] == ("int4-g64" if quant == "int4" else "none")
    assert recorded["int4"] != recorded["none"]  # (this baby routes differently in int4)
