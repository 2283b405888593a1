"""What counts as an answer: the student's file, imported, each hole filled with their own code.

`load_code` imports the file and returns the `code` namespace the checks run on. Before any check
runs, `problems` looks at each target and names, in one line, the answers that would otherwise
pass with nothing written:

- missing: a function hole must be a function defined in the student's file, and a method hole
  a method in the `__dict__` of the student's own subclass. An inherited or imported one is the
  engine's, not the student's.
- still a hole: the body is still the starter's `raise NotImplementedError("hole: ...")`.
- delegating: the body reaches the engine's own implementation, by `super().NAME` or by a name
  or attribute chain that resolves (`is`) to the engine's object: `engine_moe.route_topk`,
  `_engine_cache.ExpertCache._victim`, `from tinymoe.engine.moe import route_topk as rt`.
  `self.other_method(...)` and the engine's other helpers are fine.

Code copied from the engine by hand is not caught: that is for the teacher to judge.
"""

import ast
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

from tinymoe.errors import TinyMoeError
from tinymoe.exercises.exercise import Exercise, Target

_MISSING = object()


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
    tree = ast.parse(path.read_text(encoding="utf-8"))
    engine = {}  # id of each target's engine function (and what it wraps) -> its qualname
    for t in ex.targets:
        fn = t.engine_function()
        engine[id(fn)] = engine[id(inspect.unwrap(fn))] = t.qualname
    rejected, holes = [], []
    for t in ex.targets:
        fn, problem = _own_function(t, getattr(code, t.name), path)
        node = None if fn is None else _def_node(tree, fn)
        if problem is None and node is not None:
            if _is_hole(node):
                holes.append(still_a_hole(t.qualname))
                continue
            methods = {  # the holed methods of this class, which super() reaches in the engine's
                u.qualname.split(".")[1]: u.qualname
                for u in ex.targets
                if u.is_method and u.name == t.name
            }
            how = _delegation(node, fn, engine, methods)
            if how:
                problem = f"{t.qualname} delegates to the engine's own {how}: write it yourself"
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


def _def_node(tree: ast.Module, fn) -> ast.FunctionDef | None:
    """The def of `fn` in the parsed file (matched by name and first line)."""
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == fn.__name__:
            first = min([d.lineno for d in n.decorator_list] + [n.lineno])
            if first == fn.__code__.co_firstlineno:
                return n
    return None


def _is_hole(node: ast.FunctionDef) -> bool:
    """The body (after the docstring) is the starter's raise and nothing else."""
    body = node.body[1:] if ast.get_docstring(node) is not None else node.body
    text = ast.unparse(body[0]) if len(body) == 1 else ""
    return text.startswith("raise NotImplementedError(") and "hole: " in text


def _delegation(node: ast.FunctionDef, fn, engine: dict[int, str], methods: dict[str, str]) -> str:
    """How the body reaches the engine's own code for a hole ("route_topk (`rt`)"), or ''.

    engine: the engine's functions for the exercise's holes, by id; methods: the holed methods
    of the body's class, by name (`super()` reaches the engine's).
    """
    scope = _scope(node, fn)
    for n in ast.walk(node):
        if (
            isinstance(n, ast.Attribute)
            and n.attr in methods
            and isinstance(n.value, ast.Call)
            and isinstance(n.value.func, ast.Name)
            and n.value.func.id == "super"
        ):
            return f"{methods[n.attr]} (`{ast.unparse(n)}`)"
        if isinstance(n, ast.Name | ast.Attribute):
            found = _resolve(n, scope)
            name = engine.get(id(getattr(found, "__func__", found)))
            if name:
                return f"{name} (`{ast.unparse(n)}`)"
    return ""


def _scope(node: ast.FunctionDef, fn) -> dict[str, object]:
    """What the body's free names mean: the file's globals and the body's own imports; names the
    body assigns (or takes as arguments) are local and resolve to nothing."""
    scope = dict(fn.__globals__)
    for n in ast.walk(node):
        if isinstance(n, ast.arg):
            scope.pop(n.arg, None)
        elif isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            scope.pop(n.id, None)
    for n in ast.walk(node):
        if isinstance(n, ast.Import | ast.ImportFrom):
            for a in n.names:
                scope[a.asname or a.name.split(".")[0]] = _imported(n, a)
    return scope


def _imported(node: ast.Import | ast.ImportFrom, alias: ast.alias) -> object:
    try:
        if isinstance(node, ast.Import):
            module = importlib.import_module(alias.name)
            return module if alias.asname else importlib.import_module(alias.name.split(".")[0])
        if node.level == 0 and node.module:
            return getattr(importlib.import_module(node.module), alias.name, _MISSING)
    except ImportError:
        pass
    return _MISSING


def _resolve(node: ast.expr, scope: dict[str, object]) -> object:
    """The object a Name or an attribute chain on modules and classes refers to (no code runs)."""
    if isinstance(node, ast.Name):
        return scope.get(node.id, _MISSING)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, scope)
        if isinstance(base, ModuleType | type):
            return inspect.getattr_static(base, node.attr, _MISSING)
    return _MISSING
