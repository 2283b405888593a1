"""Command-line plumbing shared by the tools (`tinymoe run|bench|calibrate|evaluate|train`).

A user mistake (a bad flag, path, checkpoint or value) ends as one `error: ...` line on stderr
and exit status 2, never a traceback; a bug still shows its traceback. Ctrl-C exits 130 and a
closed pipe (`tinymoe run ... | head -1`) ends quietly, with status 141 as for a C tool.

The flags every tool shares are defined here once (`add_*`), each with the function that checks
it and turns it into what the library takes (`*_from_args`); the `check_*` functions check where
a tool will write, and what it will allocate (`dtype_from_args`: weights, expert slots and KV
cache from config.json, against the memory free), before it starts its long work.
"""

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from tinymoe.engine.config import ModelConfig
from tinymoe.engine.loader import DTYPES, Checkpoint, resolve_dtype
from tinymoe.engine.memory import free_host_bytes, memory_needs, shortfall, with_headroom
from tinymoe.errors import TinyMoeError
from tinymoe.offload.link import DEFAULT_LINK, PRESETS, LinkSpec
from tinymoe.offload.policy import Policy, resolve_slots
from tinymoe.offload.quant import DEFAULT_GROUP_SIZE, quant_format


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, plus "(default: X)" after every flag whose help does not give it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default in ([], argparse.SUPPRESS))
        shown = shown and not action.required  # (0 == False, hence `is`)
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one `error: ...` line on stderr (no usage block), and
    help shows every default. `tool` names the command in usage lines: `tinymoe TOOL`."""

    def __init__(self, tool: str | None = None, **kwargs) -> None:
        if tool is not None:  # (None: a subcommand's parser, argparse gives its prog)
            kwargs["prog"] = f"tinymoe {tool}"
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        # "argument --x: expected ..." reads better as "--x: expected ..."
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {message} (see --help)\n")


# ---------------------------------------------------------------- argparse types
# Each raises ArgumentTypeError, which argparse prints as "--flag: <message>".


def _number(cast: Callable[[str], float], ok: Callable[[float], bool], what: str, auto=False):
    """An argparse type: `cast(s)` if `ok` of it (and "auto" -> None when `auto`), else the
    error "expected {what}, got 's'"."""

    def parse(s: str):
        if auto and s == "auto":
            return None
        try:
            v = cast(s)
        except ValueError:
            v = None
        if v is None or not ok(v):  # (`not ok` also refuses nan)
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
positive_int_or_auto = _number(int, lambda v: v >= 1, "a positive integer or auto", auto=True)
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
open_fraction = _number(float, lambda v: 0 < v < 1, "a number between 0 and 1")


def lookahead_list(s: str) -> tuple[int, ...]:
    """argparse type: comma-separated lookaheads such as "1" or "1,2,3", each >= 1."""
    try:
        values = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lookaheads must be >= 1, got {s!r}")
    return values


# ---------------------------------------------------------------- the shared flags


def add_model_flag(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--model DIR: required, unless the tool has a default (run: the shipped demo model)."""
    what = "checkpoint directory (config.json, *.safetensors, tokenizer.json)"
    parser.add_argument(
        "--model", required=default is None, default=default, metavar="DIR", help=what
    )


def model_dir_from_args(args: argparse.Namespace) -> Path:
    """--model, checked to be a directory before anything is read from it."""
    path = Path(args.model)
    if not path.is_dir():
        raise TinyMoeError(f"--model {args.model}: not a directory (expected a checkpoint dir)")
    return path


def default_threads() -> int:
    """Half the cores this process may run on (at least 1); OMP_NUM_THREADS when it is set.

    torch's own default is one thread per core. Its OpenMP threads spin-wait for each other at
    every operation, so as soon as anything else wants a core (another process, or the
    simulated link's copy thread) each small matmul waits for a descheduled thread (measured in
    docs/results.md). Half the cores leaves room for that, and on a big machine still gives the
    large matmuls of a real model many threads.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """--threads N (>= 1): torch's CPU threads for this process; default_threads() otherwise."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=default_threads(),
        metavar="N",
        help="torch CPU threads (default: %(default)s, half the cores here, or OMP_NUM_THREADS; "
        "not torch's one per core: where cores are shared, 1 thread can be 10-60x faster than "
        "one per core, as OpenMP threads spin-wait for each other)",
    )


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --threads."""
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="auto",
        help="weights and activations; auto: the checkpoint's dtype on CUDA; on CPU float32 "
        "(CPU bf16 matmuls are slow) where it fits in memory, else the checkpoint's dtype (said "
        "on stderr)",
    )
    add_threads_flag(parser)


def device_from_args(args: argparse.Namespace) -> torch.device:
    """--device, checked; and --threads, applied to this process (torch.set_num_threads)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TinyMoeError("--device cuda: no CUDA device is available; use --device cpu")
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def add_link_flags(group: argparse._ActionsContainer) -> None:
    """The simulated host-to-device link (CPU only; a GPU has its own)."""
    group.add_argument(
        "--link-preset",
        choices=list(PRESETS),
        help=f"simulated link, CPU only (default: {DEFAULT_LINK} when a --link-* flag is given)",
    )
    group.add_argument(  # a float, not positive_float: LinkSpec checks it, naming the flag
        "--link-gbps", type=float, metavar="GBPS", help="bandwidth, GB/s (over the preset's)"
    )
    group.add_argument(
        "--link-latency-us", type=float, metavar="US", help="per-copy latency (over the preset's)"
    )


def link_from_args(args: argparse.Namespace) -> LinkSpec | None:
    """The link the flags describe: a preset, with --link-gbps/--link-latency-us overriding its
    figures; None when no link flag is given (the tool picks)."""
    if first_given(args, "--link-preset", "--link-gbps", "--link-latency-us") is None:
        return None
    preset = PRESETS[args.link_preset or DEFAULT_LINK]
    return LinkSpec(  # checks its figures: a TinyMoeError names the flag
        preset.gbps if args.link_gbps is None else args.link_gbps,
        preset.latency_us if args.link_latency_us is None else args.link_latency_us,
        preset.name if args.link_gbps is None else "custom",
    )


def first_given(args: argparse.Namespace, *flags: str) -> str | None:
    """The first of `flags` (e.g. "--top-k") given a value on the command line (or None)."""
    return next((f for f in flags if vars(args).get(f[2:].replace("-", "_")) is not None), None)


def check_real_link(args: argparse.Namespace, device: torch.device) -> None:
    """On CUDA copies take the real link: a flag shaping the simulated one is refused, now."""
    flag = first_given(args, "--copy-share", "--link-preset", "--link-gbps", "--link-latency-us")
    if device.type == "cuda" and flag:
        raise TinyMoeError(
            f"{flag} sets the simulated link of a CPU run; on CUDA the real host-to-device "
            "link is used (and measured): drop it, or use --device cpu"
        )


# ---------------------------------------------------------------- checks before long work


def check_output_file(path: str | Path, flag: str) -> Path:
    """`flag FILE` will be written: its folder must exist and be writable, FILE not a folder."""
    p = Path(path)
    if p.is_dir():
        raise TinyMoeError(f"{flag} {path}: is a directory; give a file name")
    folder = p.parent
    if not folder.is_dir():
        raise TinyMoeError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise TinyMoeError(f"{flag} {path}: not writable")
    return p


def check_output_dir(path: str | Path, flag: str) -> Path:
    """`flag DIR` will be created if needed and written into: check that it can be, now."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise TinyMoeError(f"{flag} {path}: exists and is not a directory")
    existing = p
    while not existing.exists():  # the nearest folder that exists is where mkdir starts
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise TinyMoeError(f"{flag} {path}: cannot create or write {existing}")
    return p


def check_positions(
    cfg: ModelConfig, prompt_len: int, new_tokens: int, allow_long: bool = False
) -> int:
    """Prompt + --max-new-tokens: within max_position_embeddings, unless the user asked to go
    beyond (--allow-long: rotary positions past what the model was trained on still run, but
    degrade). Returns the positions, what the KV cache will hold (dtype_from_args counts it)."""
    positions, limit = prompt_len + new_tokens, cfg.max_position_embeddings
    if positions > limit:
        msg = (
            f"the prompt ({prompt_len} tokens) + --max-new-tokens ({new_tokens}) = {positions} "
            f"positions, beyond this model's max_position_embeddings ({limit})"
        )
        if not allow_long:
            raise TinyMoeError(
                f"{msg}; lower --max-new-tokens, shorten the prompt, or add --allow-long"
            )
        print(f"warning: {msg}; going on (--allow-long): expect degraded text", file=sys.stderr)
    return positions


def dtype_from_args(
    args: argparse.Namespace,
    device: torch.device,
    positions: int = 0,
    policies: Sequence[Policy] = (),
    experts_on_host: bool = False,
    beside: str = "",
) -> torch.dtype:
    """--dtype for --model on `device`, checked to fit in the memory free before any weight is
    read, from config.json alone (a shard's header only where it states no dtype): the weights,
    a KV cache of `positions`, and the slots of the offloading `policies` the tool will run
    (--expert-slots, --expert-budget-gb, --lookahead, --expert-quant where it has them; bench's
    several formats: the largest). "auto" on a CPU takes float32 only where that fits
    (resolve_dtype) and says so on stderr when it does not; a dtype that does not fit is a
    TinyMoeError naming the way out. experts_on_host: the tool loads the experts into host
    memory (load_model(expert_device="cpu")). beside: with --expert-quant, what the tool also
    keeps unquantized to compare ("experts", "model": engine/memory.py, memory_needs)."""
    path = model_dir_from_args(args)
    cfg = ModelConfig.from_file(path / "config.json")
    stored = cfg.dtype if cfg.dtype is not None else Checkpoint(path).storage_dtype()
    offload = [p for p in policies if p.offload]
    placement = "host" if experts_on_host else "device+host" if offload else "device"
    free = {"host": free_host_bytes()}
    if device.type == "cuda":
        free["cuda"] = torch.cuda.mem_get_info(device)[0]
    flags = ("lookahead", "expert_slots", "expert_budget_gb", "expert_quant")  # where it has them
    ahead, slots, budget, quants = (getattr(args, f, None) for f in flags)
    ahead = ahead if isinstance(ahead, int) else 1  # with a predictor; (calibrate's is a list)
    group = getattr(args, "expert_group_size", DEFAULT_GROUP_SIZE)
    quants = [quants or "none"] if not isinstance(quants, list) else quants  # bench: a list
    fmts = [quant_format(q, group, cfg.expert_numel) for q in quants]

    def needs(dtype: torch.dtype) -> dict[str, dict[str, int]]:
        size = cfg.expert_bytes(dtype)
        n = [
            resolve_slots(p, cfg, size, ahead if p.predictor else 1, slots, budget) for p in offload
        ]
        each = [  # one per format (bench runs them in turn): in each pool, the largest
            memory_needs(cfg, dtype, device, positions, max(n, default=0), placement, f, beside)
            for f in fmts
        ]
        return {
            pool: max((e[pool] for e in each), key=lambda p: sum(p.values())) for pool in each[0]
        }

    dtype = resolve_dtype(args.dtype, stored, device, lambda d: shortfall(needs(d), free) is None)
    if short := shortfall(needs(dtype), free):
        raise TinyMoeError(refusal(args, dtype, needs, *short, free, positions))
    usual = resolve_dtype(args.dtype, stored, device)
    if dtype != usual and (short := shortfall(needs(usual), free)):  # said: it is not the usual
        pool, total = short
        print(
            f"dtype auto: {_name(dtype)}, the checkpoint's ({_name(usual)} would need "
            f"{_gb(with_headroom(total))} of {_POOL_NAME[pool]} with headroom, {_gb(free[pool])} "
            "available)",
            file=sys.stderr,
        )
    return dtype


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_POOL_NAME = {"host": "host memory", "cuda": "GPU memory"}  # memory_needs' pools, for people


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def refusal(
    args: argparse.Namespace,
    dtype: torch.dtype,
    needs: Callable[[torch.dtype], dict[str, dict[str, int]]],
    pool: str,
    total: int,
    free: dict[str, int],
    positions: int,
) -> str:
    """Why `dtype` does not fit in `pool`, and the way out, in one line."""
    parts, avail = needs(dtype)[pool], _gb(free[pool])
    flag = "--max-new-tokens" if hasattr(args, "max_new_tokens") else "--tokens"
    if (kv := parts.get("KV cache", 0)) > free[pool]:  # the sequence alone is too long
        return (
            f"the KV cache for {positions} positions needs {_gb(kv)}, more than the {avail} of "
            f"{_POOL_NAME[pool]} free; lower {flag}"
        )
    listed = ", ".join(f"{k} {_gb(v)}" for k, v in parts.items() if v >= 5e7)  # >= 0.1 GB
    msg = f"{_name(dtype)} needs {_gb(with_headroom(total))} of {_POOL_NAME[pool]} ({listed}, + "
    msg += f"headroom) and {avail} is available"
    if dtype.itemsize > 2 and shortfall(needs(torch.bfloat16), free) is None:
        return f"{msg}; use --dtype bfloat16"
    if pool != "host" and "experts" in parts:  # on the GPU: offloading keeps them on the host
        if getattr(args, "offload_policy", None) == "resident":
            return f"{msg}; keep the experts in host memory: --offload-policy lru (or another)"
        return f"{msg}: here every expert is on the GPU (tinymoe run can offload them)"
    if (slots := parts.get("expert slots")) and with_headroom(total - slots) <= free[pool]:
        return f"{msg}; give fewer --expert-slots"  # on a CPU too: slots there are extra copies
    if kv and with_headroom(total - kv) <= free[pool]:
        return f"{msg}; lower {flag}"
    ref = sum(v for k, v in parts.items() if k.startswith("reference"))  # (beside, with quant)
    if ref and with_headroom(total - ref) <= free[pool]:
        return f"{msg}: the unquantized reference does not fit; tinymoe run --expert-quant does"
    return f"{msg}: this checkpoint does not fit in this machine's {_POOL_NAME[pool]} in any dtype"


# ---------------------------------------------------------------- running a tool


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call main(argv): TinyMoeError -> one stderr line and exit 2; Ctrl-C -> exit 130; a closed
    stdout pipe -> a quiet exit 141."""
    try:
        return main(argv)
    except TinyMoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The interrupted output (a half-printed line, a progress bar) gets its newline first.
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read stdout has gone (`| head`). Point stdout at /dev/null so that Python's
        # final flush does not fail a second time, with a message, on the way out.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
