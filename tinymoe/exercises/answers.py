"""What counts as an answer: the student's file, imported, each hole filled with their own code.

`load_code` imports the file as the `code` namespace the checks run on. Before any check runs,
`problems` names, one line each, the answers that would pass with nothing written: a *missing*
hole (a function not defined in the student's file, a method not in their own subclass's
`__dict__`: inherited or imported is the engine's), one *still a hole* (the starter's raise),
one *delegating* (its compiled body reaches the engine's own code for a hole: `super().NAME`,
`engine_moe.route_topk`, `from tinymoe.engine.moe import route_topk as rt`; the engine's other
helpers are fine). Code copied from the engine by hand is for the teacher to judge.
"""

import importlib.util
import inspect
import sys
from pathlib import Path
from types import CodeType, ModuleType, SimpleNamespace

from tinymoe.errors import TinyMoeError
from tinymoe.exercises.exercise import Exercise, Target


def still_a_hole(label: str) -> str:
    return f"{label} is still a hole: replace the `raise NotImplementedError` with your code"


def load_code(ex: Exercise, path: Path) -> SimpleNamespace:
    """Import the student's file; the `code` namespace of its targets' names.

    Raises SyntaxError or whatever the file raises on import (the runner reports it as a failed
    check); TinyMoeError when the file is missing (a usage mistake, not a wrong answer).
    """
    if not path.is_file():
        raise TinyMoeError(
            f"{path}: no such file; run `python -m tinymoe.exercises start {ex.id}` first "
            "(or give --workdir)"
        )
    name = "tinymoe_exercise_" + ex.id.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(name, None)
    spec.loader.exec_module(module)
    return SimpleNamespace(**{t.name: getattr(module, t.name, None) for t in ex.targets})


def problems(ex: Exercise, code: SimpleNamespace, path: Path) -> tuple[list[str], list[str]]:
    """(rejections, holes): one line per target that is missing or delegates, and one per target
    that is still a hole."""
    engine = {}  # id of each target's engine function (and what it wraps) -> its qualname
    for t in ex.targets:
        fn = t.engine_function()
        engine[id(fn)] = engine[id(inspect.unwrap(fn))] = t.qualname
    rejected, holes = [], []
    for t in ex.targets:
        fn, problem = _own_function(t, getattr(code, t.name), path)
        if fn is not None and _is_hole(fn):
            holes.append(still_a_hole(t.qualname))
            continue
        if fn is not None:
            methods = {  # the holed methods of this class, which super() reaches in the engine's
                u.qualname.split(".")[1]: u.qualname
                for u in ex.targets
                if u.is_method and u.name == t.name
            }
            how = _delegation(fn, engine, methods)
            problem = how and f"{t.qualname} delegates to the engine's own {how}: write it yourself"
        if problem:
            rejected.append(problem)
    return list(dict.fromkeys(rejected)), holes


def _own_function(t: Target, obj: object, path: Path) -> tuple[object, str | None]:
    """The student's function for the target, or a one-line reason it is missing."""
    where = "your file"
    if t.is_method:
        base = t.engine_object()
        if not (isinstance(obj, type) and issubclass(obj, base) and obj is not base):
            return None, f"{t.name} is missing: define it in your file, a subclass of the engine's"
        obj = obj.__dict__.get(t.qualname.split(".", 1)[1])  # its own, not inherited
        where = f"your class {t.name}"
    fn = inspect.unwrap(getattr(obj, "__func__", obj)) if obj is not None else None
    if inspect.isfunction(fn) and Path(fn.__code__.co_filename).resolve() == path.resolve():
        return fn, None
    return None, f"{t.qualname} is missing: define it in {where} (the engine's does not count)"


def _is_hole(fn) -> bool:
    """The body (after the docstring) is the starter's raise: it names nothing else and says
    nothing else."""
    said = [c for c in fn.__code__.co_consts if isinstance(c, str) and c != fn.__doc__]
    names = fn.__code__.co_names
    return names == ("NotImplementedError",) and len(said) == 1 and said[0].startswith("hole: ")


def _delegation(fn, engine: dict[int, str], methods: dict[str, str]) -> str:
    """How `fn` reaches the engine's own code for a hole ("route_topk (`engine_moe.route_topk`)"),
    or ''. Read from the compiled code, so nothing runs: the names it uses (`co_names`: globals,
    imported modules, attributes; its locals are its own) are looked up in its globals and the
    loaded modules, then as attributes of every module or class reached; its defaults and
    closure count too. engine: the engine's functions for the exercise's holes, by id; methods:
    the holed methods of fn's class, by name (`super()` reaches the engine's).
    """
    names, codes = set(), [fn.__code__]
    while codes:  # fn's code and the code of the lambdas, functions and classes inside it
        code = codes.pop()
        names.update(code.co_names)
        codes += [c for c in code.co_consts if isinstance(c, CodeType)]
    if "super" in names and names & methods.keys():
        name = min(names & methods.keys())
        return f"{methods[name]} (`super().{name}`)"
    held = [*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()]
    held += [cell.cell_contents for cell in fn.__closure__ or ()]
    reached = [(n, fn.__globals__.get(n, sys.modules.get(n))) for n in sorted(names)]
    reached += [("its defaults and closure", obj) for obj in held]
    seen = set()
    for path, obj in reached:  # grows as modules and classes are reached
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        target = engine.get(id(getattr(obj, "__func__", obj)))  # (a staticmethod's function)
        if target:
            return f"{target} (`{path}`)"
        if isinstance(obj, ModuleType | type):
            reached += [(f"{path}.{n}", inspect.getattr_static(obj, n, None)) for n in names]
    return ""
