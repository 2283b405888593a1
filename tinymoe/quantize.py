"""Quantize a checkpoint's experts once: `tinymoe quantize --model DIR --expert-quant int4`.

Writes DIR/experts-int4-g64.safetensors (offload/quant_file.py: the codes and scales, with a
format version), which every later `--expert-quant int4` load of DIR reads instead of quantizing
the experts again (OLMoE-1B-7B: about half a minute on one core, each time). The experts are
quantized exactly as a load does (`load_model(expert_quant=...)`, read in fp32 whatever the
--dtype), so a run from the file computes with the very same experts.
"""

import argparse
import os
import sys

import torch

from tinymoe.cli import (
    OneLineParser,
    add_model_flag,
    add_threads_flag,
    dtype_from_args,
    model_dir_from_args,
    run_cli,
)
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.loader import load_model
from tinymoe.errors import TinyMoeError
from tinymoe.offload.quant_file import quant_path, save_quantized
from tinymoe.quant_flags import add_quant_flags, quant_from_args


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser("quantize", description=__doc__.splitlines()[0])
    add_model_flag(p)
    add_quant_flags(p)
    p.add_argument("--force", action="store_true", help="replace a file written before")
    add_threads_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = ModelConfig.from_file(model_dir_from_args(args) / "config.json")
    fmt = quant_from_args(args, cfg)
    if fmt is None:
        raise TinyMoeError("--expert-quant int8 or int4: the format to write")
    out = quant_path(args.model, fmt)
    if out.exists() and not args.force:
        raise TinyMoeError(f"{out} exists; add --force to write it again")
    if not os.access(out.parent, os.W_OK):
        raise TinyMoeError(f"--model {args.model}: not writable, the file goes beside the weights")
    torch.set_num_threads(args.threads)
    # Fits in memory? The other weights (bf16: only loaded on the way) and the codes.
    args.dtype = "bfloat16"
    dtype = dtype_from_args(args, torch.device("cpu"), experts_on_host=True)
    model = load_model(args.model, dtype=dtype, expert_device="cpu", expert_quant=fmt.name,
                       group_size=fmt.group_size, use_saved=False)  # fmt: skip
    part = out.with_name(out.name + ".part")  # complete or absent: never half a file
    save_quantized(model.experts.quantized, cfg, part)
    part.replace(out)
    gb = model.experts.quantized.nbytes / 1e9
    print(f"wrote {out} ({fmt}: {gb:.2f} GB)", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)  # a user mistake: one `error: ...` line on stderr, exit status 2


if __name__ == "__main__":
    sys.exit(cli())
