"""Running an exercise's checks and telling the student, property by property, how it went.

First the answer itself (answers.py): a hole that is missing, delegates to the engine's own code,
or (every hole) is untouched is rejected, one line each, before any check runs. Then every check
runs, even after one fails, so a student sees all that is left to do (`fail_fast` stops at the
first failure: for tests). A check that raises anything but CheckFailed is reported as a failure
of its property: an error in the student's file with its line there, an error the engine raised
on the student's code without the engine's file and line (they would lead to the answer).
"Well done: the engine runs on your code" is said only when the exercise's `engine_checks` ran
and passed.
"""

import re
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from tinymoe.errors import TinyMoeError
from tinymoe.exercises.answers import load_code, problems, still_a_hole
from tinymoe.exercises.catalog import get
from tinymoe.exercises.exercise import REPO, CheckFailed, Exercise

ENGINE = REPO / "tinymoe"


def _what(exc: BaseException, path: Path | None, raised: str = "") -> str:
    """'Type: message' (after `raised`), with the line of the student's file it came from, if
    any; or, raised by the engine on the student's code, the property it broke."""
    what = f"{type(exc).__name__}: {exc}"
    frames, e = [], exc
    while e is not None:  # the engine may re-raise a failure wrapped (`raise ... from e`)
        frames += traceback.extract_tb(e.__traceback__)
        e = e.__cause__
    mine = [f for f in frames if path is not None and Path(f.filename).resolve() == path.resolve()]
    if mine:
        return f"{raised}{what} ({path.name}, line {mine[-1].lineno})"
    files = [Path(f.filename).resolve() for f in frames]
    if any(f.is_relative_to(ENGINE) and not f.is_relative_to(ENGINE / "exercises") for f in files):
        return (
            f"running the engine on your code raised {what}; your code broke an assumption the "
            "engine makes"
        )
    return raised + what


def run_checks(
    ex: Exercise, code: SimpleNamespace, path: Path | None, fail_fast: bool = False, holes: int = 0
) -> bool:
    """Run the checks on `code`, print one line per property; True when all pass (and no hole
    is left: `holes` counts those found before, already reported)."""
    passed: list[str] = []
    t0 = time.perf_counter()
    for prop, check in ex.checks:
        try:
            note = check(code)
        except CheckFailed as e:
            print(f"  FAIL  {prop}: {e}")
        except Exception as e:  # the student's code raised, or the engine did on it
            hole = re.search(r"hole: (\S+) \(exercise", str(e))
            why = still_a_hole(hole[1]) if hole else _what(e, path, raised="raised ")
            print(f"  FAIL  {prop}: {why}")
        else:
            passed.append(prop)
            print(f"  ok    {prop}" + (f": {note}" if note else ""))
            continue
        if fail_fast:
            print("  (stopped at the first failure: fail_fast)")
            break
    total, took = len(ex.checks), f"({time.perf_counter() - t0:.1f} s)"
    if len(passed) < total:
        print(
            f"{len(passed)} of {total} checks pass {took}. Each FAIL names the property that "
            f"does not hold yet; the hints in {ex.doc} may help. Keep going!"
        )
    elif holes:
        print(f"All {total} checks pass {took}, but {holes} hole(s) are left to fill.")
    else:
        runs = ex.engine_checks and set(ex.engine_checks) <= set(passed)
        well_done = ": the engine runs on your code." if runs else "."
        print(f"All {total} checks pass {took}. Well done{well_done}")
    return len(passed) == total and not holes


def check_file(exercise_id: str, path: str | Path | None, fail_fast: bool = False) -> int:
    """Check the student's file at `path` (None: the engine's own code); exit status 0 or 1."""
    ex = get(exercise_id)
    torch.set_num_threads(1)  # baby models: threads only add overhead (and noise on busy CPUs)
    if path is None:
        print(f"exercise {ex.id}: {ex.title}\nchecking the engine's own code (--solution)")
        return 0 if run_checks(ex, ex.solution(), None, fail_fast) else 1
    path = Path(path)
    print(f"exercise {ex.id}: {ex.title}\nchecking {path}")
    try:
        code = load_code(ex, path)
    except TinyMoeError:
        raise  # no file: a usage mistake, one line from the command line
    except Exception as e:  # a syntax error, or the file raised while importing
        syntax = isinstance(e, SyntaxError)
        what = f"SyntaxError: {e.msg} ({path.name}, line {e.lineno})" if syntax else _what(e, path)
        print(f"  FAIL  your file does not import: {what}")
        return 1
    rejected, holes = problems(ex, code, path)
    for line in rejected + holes:
        print(f"  FAIL  {line}")
    if rejected or len(holes) == len(ex.targets):
        print("No check ran: each hole must be answered by your own code first.")
        return 1
    sys.stdout.flush()
    return 0 if run_checks(ex, code, path, fail_fast, holes=len(holes)) else 1
