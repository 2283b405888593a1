"""--expert-quant on the tools: one `error:` line before loading, and runs end to end."""

import json

import pytest
from conftest import add_tokenizer, make_checkpoint

from tinymoe import bench, evaluate
from tinymoe import run as run_tool


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
