"""Running an exercise's checks and telling the student, property by property, how it went.

Every check runs, even after one fails, so a student sees all that is left to do. A check that
raises anything but CheckFailed is reported with the exception and the line of the student's
file it came from: an untouched hole reads "still a hole", not a traceback.
"""

import re
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from tinymoe.errors import TinyMoeError
from tinymoe.exercises.catalog import get
from tinymoe.exercises.exercise import CheckFailed, Exercise
from tinymoe.exercises.holes import load_code, missing_targets


def _where(exc: BaseException, path: Path | None) -> str:
    """' (your_file.py, line N)' for the deepest frame in the student's file, else the engine's."""
    frames = traceback.extract_tb(exc.__traceback__)
    if path is not None:
        mine = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
        if mine:
            return f" ({path.name}, line {mine[-1].lineno})"
    engine = [f for f in frames if "tinymoe" in f.filename and "exercises" not in f.filename]
    if engine:
        return f" ({Path(engine[-1].filename).name}, line {engine[-1].lineno})"
    return ""


def _describe(exc: BaseException, path: Path | None) -> str:
    # A hole may surface wrapped: the simulated link re-raises a failed copy as TinyMoeError.
    hole = re.search(r"hole: (\S+) \(exercise", str(exc))
    if hole:
        return (
            f"{hole.group(1)} is still a hole: replace the `raise NotImplementedError` with "
            "your code"
        )
    return f"raised {type(exc).__name__}: {exc}{_where(exc, path)}"


def run_checks(ex: Exercise, code: SimpleNamespace, path: Path | None) -> bool:
    """Run every check on `code`, print one line per property; True when all pass."""
    passed = 0
    t0 = time.perf_counter()
    for prop, check in ex.checks:
        try:
            note = check(code)
        except CheckFailed as e:
            print(f"  FAIL  {prop}: {e}")
        except Exception as e:  # the student's code raised: say what and where
            print(f"  FAIL  {prop}: {_describe(e, path)}")
        else:
            passed += 1
            print(f"  ok    {prop}" + (f": {note}" if note else ""))
    total = len(ex.checks)
    took = f"({time.perf_counter() - t0:.1f} s)"
    if passed == total:
        print(f"All {total} checks pass {took}. Well done: the engine runs on your code.")
        return True
    print(
        f"{passed} of {total} checks pass {took}. Each FAIL names the property that does not "
        f"hold yet; the hints in {ex.doc} may help. Keep going!"
    )
    return False


def check_file(exercise_id: str, path: str | Path | None) -> int:
    """Check the student's file at `path` (None: the engine's own code); exit status 0 or 1."""
    ex = get(exercise_id)
    torch.set_num_threads(1)  # baby models: threads only add overhead (and noise on busy CPUs)
    if path is None:
        print(f"exercise {ex.id}: {ex.title}\nchecking the engine's own code (--solution)")
        return 0 if run_checks(ex, ex.solution(), None) else 1
    path = Path(path)
    print(f"exercise {ex.id}: {ex.title}\nchecking {path}")
    try:
        code = load_code(ex, path)
    except TinyMoeError:
        raise  # no file: a usage mistake, one line from the command line
    except Exception as e:  # a SyntaxError, or the file raised while importing
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else _where(e, path)
        print(f"  FAIL  your file does not import: {type(e).__name__}: {e}{where}")
        return 1
    problems = missing_targets(ex, code)
    if problems:
        for p in problems:
            print(f"  FAIL  {p}")
        return 1
    sys.stdout.flush()
    return 0 if run_checks(ex, code, path) else 1
