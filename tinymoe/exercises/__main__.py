"""`python -m tinymoe.exercises list | start ID | check ID`: hand out, and check, the exercises.

Exit status: 0 when the command did what was asked (for `check`: every check passes), 1 when a
check fails, 2 for a usage mistake (an unknown id, a starter that would overwrite a file),
reported on one line.
"""

import argparse
import json
from pathlib import Path

from tinymoe.cli import OneLineParser, run_cli
from tinymoe.exercises.catalog import EXERCISES, get
from tinymoe.exercises.holes import write_starter
from tinymoe.exercises.runner import check_file

DEFAULT_WORKDIR = "tinymoe-exercises"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        "exercises",
        description="Exercises cut from tinymoe's own code: start one, fill the holes, check it.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    ls = sub.add_parser("list", help="the exercises, in order")
    ls.add_argument("--json", action="store_true", help="one JSON list of objects")
    start = sub.add_parser("start", help="write an exercise's starter file")
    start.add_argument("id")
    start.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"default: ./{DEFAULT_WORKDIR}")
    start.add_argument("--force", action="store_true", help="overwrite an existing starter")
    check = sub.add_parser("check", help="run an exercise's checks on your code")
    check.add_argument("id")
    check.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"default: ./{DEFAULT_WORKDIR}")
    check.add_argument(
        "--solution", action="store_true", help="check the engine's own code instead of yours"
    )
    return p


def listing(as_json: bool) -> str:
    if as_json:
        fields = ("id", "title", "concepts", "files", "minutes", "prerequisites", "doc")
        rows = [
            {f: getattr(ex, f) for f in fields} | {"starter": ex.starter_name} for ex in EXERCISES
        ]
        return json.dumps(rows, indent=2)
    lines = []
    for i, ex in enumerate(EXERCISES, 1):
        after = f"; after {', '.join(ex.prerequisites)}" if ex.prerequisites else ""
        lines += [
            f"{i:>2}. {ex.id:<13} {ex.title} (~{ex.minutes} min{after})",
            f"    teaches: {'; '.join(ex.concepts)}",
            f"    touches: {', '.join(ex.files)}",
        ]
    lines.append("Start one with: python -m tinymoe.exercises start ID   (docs/exercises/)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(listing(args.json))
        return 0
    ex = get(args.id)
    workdir = Path(args.workdir)
    if args.command == "start":
        path = write_starter(ex, workdir, args.force)
        holes = ", ".join(t.qualname for t in ex.targets)
        print(f"wrote {path}: fill the holes in {holes}")
        print(f"read {ex.doc}, then: python -m tinymoe.exercises check {ex.id} --workdir {workdir}")
        return 0
    return check_file(ex.id, None if args.solution else workdir / ex.starter_name)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
