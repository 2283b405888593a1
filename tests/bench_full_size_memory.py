"""Benchmark: a published full-size shape on this machine, tinymoe's memory beside transformers'.

    .venv/bin/python tests/bench_full_size_memory.py --dir /tmp/olmoe-full [--make]
        [--config docs/configs/olmoe-1b-7b.json] [--shards 3] [--new-tokens 8]

--make writes a random bf16 checkpoint with the config's published shape into --dir, in
--shards safetensors shards with an index (OLMoE-1B-7B: 6.9B parameters, 13.8 GB; never commit
one), plus the config and the demo model's tokenizer (its ids are valid in any larger vocab).
Then it runs, one after the other, each as its own process sampled every 20 ms from /proc:

- tinymoe's default command, `run.py --model DIR --prompt ... --max-new-tokens N`: on a CPU,
  `--dtype auto` takes float32 only where it fits, so it says which dtype it took, or stops in
  one line before loading;
- the same with `--offload-policy on-demand` (an offloading policy on a CPU keeps the experts
  where they are: only its slots are extra);
- the same with `--expert-quant int4`, and `int8`: the experts quantized at load, expert by
  expert, into the host store (their codes and scales are all there is of them; the memory
  check then lets `--dtype auto` take float32 for the rest); where DIR holds the experts saved
  quantized (`tinymoe quantize --model DIR --expert-quant int4` writes
  experts-int4-g64.safetensors), the load reads them instead, as the output says;
- transformers: `AutoModelForCausalLM.from_pretrained(DIR, dtype=bfloat16)` and `generate()`,
  greedy, the same number of new tokens.

Peak VmRSS (all resident memory, the memory-mapped checkpoint's pages included, which the kernel
may drop) and peak RssAnon (the process's own memory) per run, in GiB, and its wall time.
`--rows` picks runs by their names' words (e.g. `--rows int4,int8,default`); `--repeat N` runs
each N times in turn. Not collected by pytest; transformers is an oracle, never imported by
tinymoe. One heavy run at a time: each is a process of its own, run after the previous ended.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tinymoe import ModelConfig, MoETransformer  # noqa: E402
from tinymoe.engine.loader import EXPERT_NAMES, QKV_PARTS, qkv_rows  # noqa: E402

PROMPT = "The list type"
HF = """
import sys, torch
torch.set_num_threads(1)
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
d, n = sys.argv[1], int(sys.argv[2])
ids = torch.tensor([Tokenizer.from_file(d + "/tokenizer.json").encode(sys.argv[3]).ids])
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
with torch.inference_mode():
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
print("tokens", out[0, ids.shape[1]:].tolist())
"""


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published per-expert layout, by name, as save_model writes them."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    shapes = {}
    for name, p in model.named_parameters():
        if name.startswith("experts.") or name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key = name if name == "lm_head.weight" else "model." + name
        key = key.replace(".mlp.", ".block_sparse_moe." if cfg.model_type == "mixtral" else ".mlp.")
        if ".qkv_proj." in key:
            for part, rows in zip(QKV_PARTS, qkv_rows(cfg), strict=True):
                shapes[key.replace("qkv_proj", part)] = (rows, p.shape[1])
        else:
            shapes[key] = tuple(p.shape)
    gate, up, down = EXPERT_NAMES[cfg.model_type]
    moe = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    I, D = cfg.expert_dim, cfg.hidden_size
    for layer in range(cfg.num_layers):
        for e in range(cfg.num_experts):
            pre = f"model.layers.{layer}.{moe}.experts.{e}."
            shapes |= {pre + f"{gate}.weight": (I, D), pre + f"{up}.weight": (I, D)}
            shapes[pre + f"{down}.weight"] = (D, I)
    return shapes


def make(out: Path, config: Path, shards: int) -> None:
    """A random bf16 checkpoint (N(0, 0.02), unit norms) in `shards` files, shard by shard."""
    shapes = checkpoint_shapes(ModelConfig.from_file(config))
    total = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"{total:,} parameters, {2 * total / 1e9:.1f} GB in bf16", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, shard, done = {}, {}, 0
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("norm.weight"):
            shard[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            shard[key] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        done += shard[key].numel()
        index = len(set(weight_map.values()))
        if done >= total * (index + 1) / shards or i == len(shapes) - 1:
            save_file(shard, str(out / names[index]), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, names[index])
            print(f"wrote {names[index]}", file=sys.stderr)
            shard = {}
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(config, out / "config.json")
    shutil.copy(ROOT / "weights" / "pydoc-moe" / "tokenizer.json", out / "tokenizer.json")


def peak_memory(cmd: list[str]) -> tuple[dict[str, float], int, str]:
    """Run cmd; peak VmRSS and RssAnon in GiB (sampled every 20 ms), exit status, its output."""
    peak = {"VmRSS": 0, "RssAnon": 0}
    with tempfile.TemporaryFile("w+") as log:  # (not a pipe: a full pipe would stall the child)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        key = line.split(":")[0]
                        if key in peak:
                            peak[key] = max(peak[key], int(line.split()[1]))
            except FileNotFoundError:
                break
            time.sleep(0.02)
        p.wait()
        log.seek(0)
        out = log.read()
    return {k: v / 2**20 for k, v in peak.items()}, p.returncode, out


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--dir", type=Path, required=True, help="the checkpoint directory")
    a.add_argument("--make", action="store_true", help="write the random checkpoint first")
    a.add_argument("--config", type=Path, default=ROOT / "docs" / "configs" / "olmoe-1b-7b.json")
    a.add_argument("--shards", type=int, default=3)
    a.add_argument("--new-tokens", type=int, default=8)
    a.add_argument("--rows", default="", help="comma-separated words; runs whose name has one")
    a.add_argument("--repeat", type=int, default=1, help="times to run each, in turn")
    args = a.parse_args()
    if args.make:
        make(args.dir, args.config, args.shards)
    n, py = str(args.new_tokens), sys.executable
    run = [py, str(ROOT / "run.py"), "--model", str(args.dir), "--prompt", PROMPT, "--json"]
    run += ["--max-new-tokens", n]
    od = ["--offload-policy", "on-demand"]
    runs = {
        "tinymoe run.py (default)": run,
        "tinymoe run.py --offload-policy on-demand": [*run, *od],
        "tinymoe run.py on-demand --expert-quant int4": [*run, *od, "--expert-quant", "int4"],
        "tinymoe run.py on-demand --expert-quant int8": [*run, *od, "--expert-quant", "int8"],
        "transformers generate, bf16": [py, "-c", HF, str(args.dir), n, PROMPT],
    }
    if args.rows:
        words = args.rows.split(",")
        runs = {k: v for k, v in runs.items() if any(w in k for w in words)}
    for saved in sorted(args.dir.glob("experts-*.safetensors")):  # (offload/quant_file.py)
        print(f"{saved.name} in {args.dir}: its format's runs read it, quantizing nothing")
    for i in range(args.repeat):
        for name, cmd in runs.items():
            t0 = time.perf_counter()
            peak, rc, out = peak_memory(cmd)
            wall = time.perf_counter() - t0
            print(
                f"{name:<45} exit {rc}  peak VmRSS {peak['VmRSS']:6.2f} GiB  "
                f"RssAnon {peak['RssAnon']:6.2f} GiB  {wall:5.0f} s  (run {i + 1})",
                flush=True,
            )
            for line in out.splitlines():  # run.py's JSON object: tokens, dtype; every note
                if line.startswith("{"):
                    got = json.loads(line)
                    line = f"tokens {got['tokens']}, TPOT {got['tpot_ms']:.0f} ms"
                if line.startswith(("tokens", "dtype", "error", "warning", "quantizing")):
                    print(f"   {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
