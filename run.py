"""Generate text with tinymoe: `python run.py --prompt "..."`, the same as `tinymoe run`.

The command's code is tinymoe/run.py, inside the package, so that the installed `tinymoe`
command has it too; this file keeps `python run.py` working in a checkout.
"""

import sys

from tinymoe.launch import run_tool


def cli(argv: list[str] | None = None) -> int:
    """`tinymoe run`'s command line: exit status 0, 2 (a user mistake, one stderr line), 130."""
    return run_tool("run", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(cli())
