"""Holes cut from the live engine: a starter is written from the source as it is *now*.

For each target (exercise.py) the engine module's source is parsed with `ast`, the function (or
method) is found by name, and its text is copied with the body replaced by a marked hole; the
signature, decorators and docstring stay, because they are the specification. The engine's
comments inside the body go with the body: they explain the answer. A method becomes a method of
a subclass of the engine's class, so everything else the class does is inherited unchanged.

The starter imports what the original body used: the module's own import lines (only the names
the target needs, and torch) and, from the engine module itself, any module-level name the
target refers to. So the student has what the engine had, and nothing is copied that could drift.

`load_code` imports a student's file back and returns the `code` namespace the checks run on.
"""

import ast
import builtins
import importlib
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace

from tinymoe.errors import TinyMoeError
from tinymoe.exercises.exercise import Exercise

HOLE = 'raise NotImplementedError("hole: {name} (exercise {id})")'
BEGIN = "# ===== your code: {name} " + "=" * 40
END = "# ===== end of your code " + "=" * 40


def find_def(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    """The function or method node for "f" or "Class.method" at the top of a module."""
    nodes: list[ast.stmt] = tree.body
    *classes, func = qualname.split(".")
    for cls in classes:
        found = [n for n in nodes if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            raise LookupError(f"no class {cls}")
        nodes = found[0].body
    for n in nodes:
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == func:
            return n
    raise LookupError(f"no function {qualname}")


def cut_hole(source: str, node: ast.FunctionDef, name: str, exercise_id: str) -> str:
    """The def's text, dedented, with everything after the docstring replaced by the hole."""
    lines = source.splitlines()
    first = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    body = node.body
    has_doc = (
        isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    )
    if has_doc:
        head = lines[first : body[0].end_lineno]
    else:
        head = lines[first : body[0].lineno - 1]
        while head and head[-1].strip().startswith("#"):
            head.pop()  # a comment above the first statement belongs to the answer
    indent = " " * body[0].col_offset
    label = name if node.name == name else f"{name}.{node.name}"
    hole = [
        indent + BEGIN.format(name=label),
        indent + HOLE.format(name=label, id=exercise_id),
        indent + END,
    ]
    return textwrap.dedent("\n".join(head + hole)) + "\n"


def _module_source(module: ModuleType) -> str:
    return Path(inspect.getsourcefile(module)).read_text(encoding="utf-8")


def _imports_for(module: ModuleType, tree: ast.Module, used: set[str], skip: set[str]) -> list:
    """Import lines for the names in `used` that `module` binds at its top level."""
    lines, bound = [], set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                local = a.asname or a.name.split(".")[0]
                if local in used and local not in skip:
                    lines.append(f"import {a.name}" + (f" as {a.asname}" if a.asname else ""))
                    bound.add(local)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [a for a in node.names if (a.asname or a.name) in used - skip]
            if names:
                parts = [a.name + (f" as {a.asname}" if a.asname else "") for a in names]
                lines.append(f"from {node.module} import {', '.join(parts)}")
                bound.update(a.asname or a.name for a in names)
    own = sorted(
        n
        for n in used - bound - skip
        if hasattr(module, n) and not hasattr(builtins, n) and not n.startswith("__")
    )
    if own:
        lines.append(f"from {module.__name__} import {', '.join(own)}")
    return lines


def starter_source(ex: Exercise) -> str:
    """The whole starter file for an exercise, cut from the engine's current source."""
    imports: list[str] = []
    blocks: list[str] = []
    classes: dict[tuple[str, str], list[str]] = {}  # (module, class) -> its holed methods
    skip = {t.name for t in ex.targets}
    for t in ex.targets:
        module = importlib.import_module(t.module)
        source = _module_source(module)
        tree = ast.parse(source)
        try:
            node = find_def(tree, t.qualname)
        except LookupError as e:
            raise TinyMoeError(
                f"exercise {ex.id}: {t.path} has {e} any more; the engine changed, so "
                "tinymoe/exercises must be updated to name what replaced it"
            ) from None
        # What the engine's body used, and torch, which every answer may want.
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {"torch"}
        for line in _imports_for(module, tree, used, skip):
            if line not in imports:
                imports.append(line)
        text = cut_hole(source, node, t.name, ex.id)
        if t.is_method:
            classes.setdefault((t.module, t.name), []).append(text)
        else:
            blocks.append(text)
    for (mod, cls), methods in classes.items():
        alias = "_engine_" + mod.rsplit(".", 1)[1]
        imports.append(f"import {mod} as {alias}")
        doc = _class_doc(mod, cls)
        body = "\n".join(textwrap.indent(m, "    ") for m in methods)
        blocks.append(f"class {cls}({alias}.{cls}):\n{doc}\n{body}")
    footer = (
        '\nif __name__ == "__main__":  # `python THIS_FILE` runs the same checks as `check`\n'
        "    from tinymoe.exercises.runner import check_file\n\n"
        f'    raise SystemExit(check_file("{ex.id}", __file__))\n'
    )
    return _header(ex) + _sorted_imports(imports) + "\n\n" + "\n\n".join(blocks) + "\n" + footer


def _class_doc(module: str, cls: str) -> str:
    """The subclass's docstring: what it is, and the engine class's own docstring (the
    context a method's task needs: what the class holds and promises)."""
    lines = [f"The engine's {cls} ({module.replace('.', '/')}.py), except for the method(s) below."]
    engine_doc = inspect.getdoc(getattr(importlib.import_module(module), cls))
    if engine_doc:
        lines += ["", "The engine's docstring of the class:", "", *engine_doc.splitlines()]
    text = "\n".join(lines).replace("\\", "\\\\")
    text = textwrap.indent(text, "    ").replace("    \n", "\n")
    return f'    """{text.lstrip()}\n    """\n' if engine_doc else f'    """{text.lstrip()}"""\n'


def _sorted_imports(lines: list[str]) -> str:
    """Other packages first, then tinymoe; `import x` before `from x import y` (isort's order)."""

    def key(line: str) -> tuple[bool, bool, str]:
        module = line.split()[1]
        return module.split(".")[0] == "tinymoe", line.startswith("from"), module

    groups = [
        [line for line in sorted(lines, key=key) if key(line)[0] == ours] for ours in (False, True)
    ]
    return "\n\n".join("\n".join(g) for g in groups if g) + "\n"


def _header(ex: Exercise) -> str:
    where = "\n".join(f"    {t.qualname:<28} from {t.path}" for t in ex.targets)
    return (
        f'"""Exercise {ex.id}: {ex.title}.\n\n'
        "Fill in every marked hole below. Each one is cut from the engine itself, as it is today:\n"
        f"{where}\n"
        "The signatures and docstrings are the engine's and say what to compute; the bodies are\n"
        "yours. A method sits in a subclass of the engine's class: the rest is inherited.\n\n"
        f"Read {ex.doc} first (goal, background, hints). Check your work with\n"
        f"    python -m tinymoe.exercises check {ex.id} --workdir DIR\n"
        f"(DIR is the folder this file is in), or simply `python {ex.starter_name}`.\n"
        '"""\n\n'
    )


def write_starter(ex: Exercise, workdir: Path, force: bool) -> Path:
    """Write the starter into workdir; never over a student's file without force."""
    path = workdir / ex.starter_name
    if path.exists() and not force:
        raise TinyMoeError(
            f"{path} already exists (your work?); pass --force to overwrite it with a fresh starter"
        )
    text = starter_source(ex)
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


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


def missing_targets(ex: Exercise, code: SimpleNamespace) -> list[str]:
    """What the student's file no longer defines, or defines as something else."""
    out = []
    for t in ex.targets:
        obj = getattr(code, t.name)
        if obj is None:
            out.append(f"{t.name} is not defined in your file any more")
        elif t.is_method and not (isinstance(obj, type) and issubclass(obj, t.engine_object())):
            out.append(f"{t.name} should stay a subclass of the engine's {t.name}")
    return list(dict.fromkeys(out))
