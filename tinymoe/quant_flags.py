"""The quantized-experts flags, shared by `tinymoe run|bench|evaluate|simulate`.

`--expert-quant none|int8|int4` and `--expert-group-size G` (offload/quant.py). Here rather than
in tinymoe/cli.py, which is full; the checks are the same kind: a mistake is one `error:` line
before the model loads.
"""

import argparse

from tinymoe.cli import positive_int
from tinymoe.engine.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.offload.quant import DEFAULT_GROUP_SIZE, EXPERT_QUANTS, QuantFormat, quant_format

HELP = (
    "store the experts with fewer bits: the host store holds them quantized (symmetric, one fp16 "
    "scale per --expert-group-size weights), a copy moves those bytes and the device "
    "dequantizes them into the slot; without an offloading policy the resident experts are "
    "quantized too (docs/offloading.md, 'Bytes vs accuracy')"
)


def quant_list(s: str) -> list[str]:
    """argparse type: comma-separated --expert-quant values (bench: one set of rows each)."""
    names = [n.strip() for n in s.split(",") if n.strip()]
    bad = [n for n in names if n not in EXPERT_QUANTS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated values of {', '.join(EXPERT_QUANTS)}, got {s!r}"
        )
    return names


def add_quant_flags(parser: argparse._ActionsContainer, several: bool = False) -> None:
    """--expert-quant (several: a comma-separated list, e.g. bench's none,int8,int4) and
    --expert-group-size."""
    if several:
        kind = dict(type=quant_list, default=["none"], metavar="Q[,Q...]")
        extra = "; several, comma-separated: one set of rows each, over the same link"
    else:
        kind, extra = dict(choices=list(EXPERT_QUANTS), default="none"), ""
    parser.add_argument("--expert-quant", help=HELP + extra, **kind)
    parser.add_argument(
        "--expert-group-size",
        type=positive_int,
        default=DEFAULT_GROUP_SIZE,
        metavar="G",
        help="weights per scale with --expert-quant (even, dividing an expert's 3*I*D weights)",
    )


def quant_from_args(args: argparse.Namespace, cfg: ModelConfig, name: str | None = None):
    """The format --expert-quant (or `name`, one of its list) names, checked against cfg's
    experts before anything is loaded; None for none. -> QuantFormat | None"""
    name = args.expert_quant if name is None else name
    fmt: QuantFormat | None = quant_format(name, args.expert_group_size, cfg.expert_numel)
    if fmt is None and name == args.expert_quant and args.expert_group_size != DEFAULT_GROUP_SIZE:
        raise TinyMoeError("--expert-group-size needs --expert-quant int8 or int4")
    return fmt
