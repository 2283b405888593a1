"""The `tinymoe` command: `tinymoe TOOL [flags]` runs any of the tools in TOOLS below.

Each tool is also `python -m tinymoe.<tool>` (and `tinymoe run` is `python run.py` in a
checkout); all of them end in the tool's `cli()`. This module imports only the standard library,
and `import tinymoe` loads nothing heavy (tinymoe/__init__.py), so a Ctrl-C while torch is
still loading, a second or two after the command starts, is a quiet exit 130 like any other
Ctrl-C (cli.run_cli), not a traceback from deep inside torch's import.
"""

import importlib
import os
import sys
from types import TracebackType

# tool -> (module, one line for `tinymoe --help`)
TOOLS = {
    "run": ("tinymoe.run", "generate text, print timing (run.py)"),
    "bench": ("tinymoe.bench", "offloading policies side by side"),
    "calibrate": ("tinymoe.calibrate", "default vectors and estimators for speculation"),
    "evaluate": ("tinymoe.evaluate", "predictors' hit rates, what speculation costs"),
    "train": ("tinymoe.train", "train the demo model"),
    "simulate": ("tinymoe.simulate", "replay a recorded run on other hardware (what if)"),
    "quantize": ("tinymoe.quantize", "save a checkpoint's experts quantized, for --expert-quant"),
    "corpus": ("tinymoe.corpus", "the out-of-domain held-out text (man pages)"),
    "exercises": ("tinymoe.exercises.__main__", "classroom exercises: list, start, check"),
}

USAGE = "usage: tinymoe {" + ",".join(TOOLS) + "} [flags]   (tinymoe TOOL --help for its flags)"


def main(argv: list[str] | None = None) -> int:
    """`tinymoe TOOL [flags]`: run TOOL's command line with the flags."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [USAGE, "", "tools:"] + [f"  {t:<10} {h}" for t, (_, h) in TOOLS.items()]
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in TOOLS:
        print(
            f"error: unknown tool {argv[0]!r}; expected one of {', '.join(TOOLS)}", file=sys.stderr
        )
        return 2
    return run_tool(argv[0], argv[1:])


def run_tool(tool: str, argv: list[str]) -> int:
    """Import the tool's module (torch with it) and call its cli(argv)."""
    try:
        module = importlib.import_module(TOOLS[tool][0])
    except KeyboardInterrupt:
        return _interrupted()
    return module.cli(argv)


def quiet_interrupt_while_importing() -> None:
    """For `python -m tinymoe.<tool>`, whose module imports torch before any tinymoe code runs:
    an uncaught Ctrl-C prints a newline and exits 130 instead of a traceback. Installed by
    tinymoe/__init__.py only when Python is starting a module with -m."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            os._exit(_interrupted())  # nothing of the tool ran yet: no cleanup to skip
        previous(kind, value, tb)

    sys.excepthook = hook


def _interrupted() -> int:
    print("\ninterrupted", file=sys.stderr, flush=True)
    return 130
