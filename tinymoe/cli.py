"""Command-line plumbing shared by run.py and the `python -m tinymoe.*` tools.

A user mistake (a bad flag, path, checkpoint or value) ends as one `error: ...` line on stderr
and exit status 2, never a traceback; a bug still shows its traceback.

The flags every tool shares are defined here once, each with its check: `add_model_flag`
(--model), `add_device_flags` (--device, --dtype, --threads), `add_link_flags` (the simulated
link: --link-preset, --link-gbps, --link-latency-us); `model_dir_from_args`, `device_from_args`
and `link_from_args` check them and turn them into what the library takes.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from tinymoe.engine.loader import DTYPES
from tinymoe.errors import TinyMoeError
from tinymoe.offload.link import PRESETS, LinkSpec

DEFAULT_LINK = "pcie4-x16"  # the simulated link when a link flag is given without a preset


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one `error: ...` line on stderr (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_model_flag(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--model DIR: required, unless the tool has a default (run.py: the shipped demo model)."""
    what = "checkpoint directory (config.json, *.safetensors, tokenizer.json)"
    if default is None:
        parser.add_argument("--model", required=True, help=what)
    else:
        parser.add_argument("--model", default=default, help=f"{what}; default: {default}")


def model_dir_from_args(args: argparse.Namespace) -> Path:
    """--model, checked to be a directory before anything is read from it."""
    path = Path(args.model)
    if not path.is_dir():
        raise TinyMoeError(f"--model {args.model}: not a directory (expected a checkpoint dir)")
    return path


def add_threads_flag(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """--threads N (>= 1): torch's CPU threads for this process."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=default,
        help=f"torch CPU threads (default: {default or 'torch, one per core'}); on a shared or "
        "busy machine 1 thread can be 10-60x faster than the default (OpenMP threads spin-wait "
        "for each other)",
    )


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --threads."""
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="auto",
        help="weights and activations; auto: the checkpoint's dtype on CUDA, float32 on CPU "
        "(CPU bf16 matmuls are slow)",
    )
    add_threads_flag(parser)


def device_from_args(args: argparse.Namespace) -> torch.device:
    """--device, checked; and --threads, applied to this process (torch.set_num_threads)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TinyMoeError("--device cuda: no CUDA device is available; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def add_link_flags(group: argparse._ActionsContainer) -> None:
    """The simulated host-to-device link (CPU only; a GPU has its own)."""
    group.add_argument(
        "--link-preset",
        choices=list(PRESETS),
        default=None,
        help=f"simulated link, CPU only (default: {DEFAULT_LINK})",
    )
    group.add_argument("--link-gbps", type=float, default=None, help="bandwidth, GB/s")
    group.add_argument("--link-latency-us", type=float, default=None, help="per-copy latency, us")


def link_from_args(args: argparse.Namespace) -> LinkSpec | None:
    """The link the flags describe: a preset, with --link-gbps/--link-latency-us overriding its
    figures; None when no link flag is given (the tool picks)."""
    if args.link_preset is None and args.link_gbps is None and args.link_latency_us is None:
        return None
    preset = PRESETS[args.link_preset or DEFAULT_LINK]
    return LinkSpec(  # checks its figures: a TinyMoeError names the flag
        preset.gbps if args.link_gbps is None else args.link_gbps,
        preset.latency_us if args.link_latency_us is None else args.link_latency_us,
        preset.name if args.link_gbps is None else "custom",
    )


def lookahead_list(s: str) -> tuple[int, ...]:
    """argparse type: comma-separated lookaheads such as "1" or "1,2,3", each >= 1."""
    try:
        values = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lookaheads must be >= 1, got {s!r}")
    return values


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call main(argv); turn TinyMoeError into one stderr line and exit status 2."""
    try:
        return main(argv)
    except TinyMoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
