"""Holes cut from the live engine: a starter is written from the source as it is *now*.

Each target's def (exercise.py) is found in its engine module's source with `ast` and copied with
the body replaced by a marked hole: the signature, decorators and docstring stay (they are the
specification); the body's comments go with the body (they explain the answer). A method goes
into a subclass of the engine's class, carrying the class's own docstring. A starter imports
torch (`torch`, `F`, `Tensor`), the names its signatures need and the helpers its exercise gives
(`Exercise.given`), as the engine module imports them: nothing the body used, which would hand
out the answer's pieces. answers.py decides what counts as the student's answer.
"""

import ast
import builtins
import contextlib
import importlib
import inspect
import textwrap
from pathlib import Path
from types import ModuleType

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
    if ast.get_docstring(node) is not None:
        head = lines[first : body[0].end_lineno]
    else:
        head = lines[first : body[0].lineno - 1]
        while head and head[-1].strip().startswith("#"):
            head.pop()  # a comment above the first statement belongs to the answer
    label = name if node.name == name else f"{name}.{node.name}"
    hole = [BEGIN.format(name=label), HOLE.format(name=label, id=exercise_id), END]
    indent = " " * body[0].col_offset
    return textwrap.dedent("\n".join(head + [indent + line for line in hole])) + "\n"


BASE_IMPORTS = ["import torch", "import torch.nn.functional as F", "from torch import Tensor"]


def _signature_names(node: ast.FunctionDef) -> set[str]:
    """The names a def's decorators, annotations and defaults use (string annotations too)."""
    a = node.args
    parts = [*node.decorator_list, node.returns, *a.defaults, *a.kw_defaults]
    parts += [
        x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x
    ]
    names = set()
    for part in filter(None, parts):
        for n in ast.walk(part):
            if isinstance(n, ast.Name):
                names.add(n.id)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str):
                with contextlib.suppress(SyntaxError):
                    names |= {m.id for m in ast.walk(ast.parse(n.value)) if isinstance(m, ast.Name)}
    return names


def _imports_for(module: ModuleType, tree: ast.Module, used: set[str]) -> tuple[list, set]:
    """Import lines for the names in `used` that `module` binds at its top level, and those
    names."""
    lines, bound = [], set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                local = a.asname or a.name.split(".")[0]
                if local in used:
                    lines.append(f"import {a.name}" + (f" as {a.asname}" if a.asname else ""))
                    bound.add(local)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [a for a in node.names if (a.asname or a.name) in used]
            if names:
                parts = [a.name + (f" as {a.asname}" if a.asname else "") for a in names]
                lines.append(f"from {node.module} import {', '.join(parts)}")
                bound.update(a.asname or a.name for a in names)
    own = sorted(
        n
        for n in used - bound
        if hasattr(module, n) and not hasattr(builtins, n) and not n.startswith("__")
    )
    if own:
        lines.append(f"from {module.__name__} import {', '.join(own)}")
    return lines, bound | set(own)


def starter_source(ex: Exercise) -> str:
    """The whole starter file for an exercise, cut from the engine's current source."""
    imports: list[str] = list(BASE_IMPORTS)
    blocks: list[str] = []
    classes: dict[tuple[str, str], list[str]] = {}  # (module, class) -> its holed methods
    skip = {t.name for t in ex.targets} | {"torch", "F", "Tensor"}
    given = set(ex.given)
    for t in ex.targets:
        module = importlib.import_module(t.module)
        source = inspect.getsource(module)
        tree = ast.parse(source)
        try:
            node = find_def(tree, t.qualname)
        except LookupError as e:
            raise TinyMoeError(
                f"exercise {ex.id}: {t.path} has {e} any more; the engine changed, so "
                "tinymoe/exercises must be updated to name what replaced it"
            ) from None
        lines, bound = _imports_for(module, tree, (_signature_names(node) | given) - skip)
        given -= bound
        imports += [line for line in lines if line not in imports]
        text = cut_hole(source, node, t.name, ex.id)
        if t.is_method:
            classes.setdefault((t.module, t.name), []).append(text)
        else:
            blocks.append(text)
    if given:
        raise TinyMoeError(f"exercise {ex.id}: no target's module has {sorted(given)} to give")
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
    engine_doc = vars(getattr(importlib.import_module(module), cls)).get("__doc__")
    if engine_doc:  # its own docstring, not one inherited from a base class (nn.Module's)
        engine_doc = inspect.cleandoc(engine_doc)
        lines += ["", "The engine's docstring of the class:", "", *engine_doc.splitlines()]
    text = "\n".join(lines).replace("\\", "\\\\")
    text = textwrap.indent(text, "    ").replace("    \n", "\n")
    return f'    """{text.lstrip()}\n    """\n' if engine_doc else f'    """{text.lstrip()}"""\n'


def _sorted_imports(lines: list[str]) -> str:
    """Other packages first, then tinymoe; `import x` before `from x import y`, one `from x`
    line per module, its names constants first, then classes, then the rest (isort's order)."""
    names: dict[str, list[str]] = {}  # module -> the names its `from` lines import
    for line in lines:
        if line.startswith("from "):
            module, _, what = line[5:].partition(" import ")
            names.setdefault(module, []).extend(what.split(", "))

    def by_type(name: str) -> tuple[bool, bool, str]:
        return not name.isupper(), not name[:1].isupper(), name

    merged = [line for line in lines if not line.startswith("from ")]
    merged += [
        f"from {m} import {', '.join(sorted(dict.fromkeys(n), key=by_type))}"
        for m, n in names.items()
    ]

    def key(line: str) -> tuple[bool, bool, str]:
        module = line.split()[1]
        return module.split(".")[0] == "tinymoe", line.startswith("from"), module

    groups = [
        [line for line in sorted(merged, key=key) if key(line)[0] == ours] for ours in (False, True)
    ]
    return "\n\n".join("\n".join(g) for g in groups if g) + "\n"


def _header(ex: Exercise) -> str:
    where = "\n".join(f"    {t.qualname:<28} from {t.path}" for t in ex.targets)
    return (
        f'"""Exercise {ex.id}: {ex.title}.\n\n'
        "Fill in every marked hole below. Each one is cut from the engine itself, as it is today:\n"
        f"{where}\n"
        "The signatures and docstrings are the engine's and, with the page, say what to\n"
        "compute (the engine's file holds the answer: leave it closed). The bodies are yours: a\n"
        "method sits in a subclass of the engine's class, the rest is inherited. A hole left out\n"
        "(so the engine's is inherited), answered by calling the engine's own\n"
        "(`super().NAME(...)`), or untouched is rejected before any check runs.\n\n"
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
