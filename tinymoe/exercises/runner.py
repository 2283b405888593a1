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


def _in_engine(filename: str) -> bool:
    path = Path(filename).resolve()
    return path.is_relative_to(ENGINE) and not path.is_relative_to(ENGINE / "exercises")


def _what(exc: BaseException, path: Path | None) -> str:
    """'Type: message', with the line of the student's file it came from, if any."""
    what = f"{type(exc).__name__}: {exc}"
    frames, e = [], exc
    while e is not None:  # the engine may re-raise a failure wrapped (`raise ... from e`)
        frames += traceback.extract_tb(e.__traceback__)
        e = e.__cause__
    mine = [f for f in frames if path is not None and Path(f.filename).resolve() == path.resolve()]
    if mine:
        return f"{what} ({path.name}, line {mine[-1].lineno})"
    if any(_in_engine(f.filename) for f in frames):
        return (
            f"running the engine on your code raised {what}; your code broke an assumption the "
            "engine makes"
        )
    return what


def _describe(exc: BaseException, path: Path | None) -> str:
    hole = re.search(r"hole: (\S+) \(exercise", str(exc))
    if hole:
        return still_a_hole(hole.group(1))
    what = _what(exc, path)
    return what if what.startswith("running the engine") else f"raised {what}"


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
            print(f"  FAIL  {prop}: {_describe(e, path)}")
        else:
            passed.append(prop)
            print(f"  ok    {prop}" + (f": {note}" if note else ""))
            continue
        if fail_fast:
            print("  (stopped at the first failure: fail_fast)")
            break
    total = len(ex.checks)
    took = f"({time.perf_counter() - t0:.1f} s)"
    if len(passed) == total and not holes:
        runs = ex.engine_checks and set(ex.engine_checks) <= set(passed)
        well_done = ": the engine runs on your code." if runs else "."
        print(f"All {total} checks pass {took}. Well done{well_done}")
        return True
    if len(passed) == total:
        print(f"All {total} checks pass {took}, but {holes} hole(s) are left to fill.")
        return False
    print(
        f"{len(passed)} of {total} checks pass {took}. Each FAIL names the property that does not "
        f"hold yet; the hints in {ex.doc} may help. Keep going!"
    )
    return False


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
    except SyntaxError as e:
        where = f"{path.name}, line {e.lineno}"
        print(f"  FAIL  your file does not import: SyntaxError: {e.msg} ({where})")
        return 1
    except Exception as e:  # the file raised while importing
        print(f"  FAIL  your file does not import: {_what(e, path)}")
        return 1
    rejected, holes = problems(ex, code, path)
    for line in rejected + holes:
        print(f"  FAIL  {line}")
    if rejected or len(holes) == len(ex.targets):
        print("No check ran: each hole must be answered by your own code first.")
        return 1
    sys.stdout.flush()
    return 0 if run_checks(ex, code, path, fail_fast, holes=len(holes)) else 1
