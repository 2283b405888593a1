"""What an exercise is: its holes, its checks, and the small vocabulary checks are written in.

An exercise names *targets*, engine functions or methods ("tinymoe.engine.moe:route_topk",
"tinymoe.offload.cache:ExpertCache._victim"). `start` cuts each one's body out of the live source
(holes.py); `check` runs the checks on a `code` namespace of the targets' top-level names: the
student's function or subclass of the engine's class (with `--solution`, the engine's own).

A check, `check(code) -> str`, returns a one-line note (a figure) or raises `CheckFailed` naming
the property that failed, never the answer. Checks compare behaviour with the engine's own code,
never source text, so the engine may change underneath them.
"""

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from tinymoe.errors import TinyMoeError

REPO = Path(__file__).resolve().parents[2]  # the checkout: tinymoe/, docs/, weights/, tests/


class CheckFailed(Exception):
    """A property of the student's code does not hold; the message says which, not the answer."""


Check = Callable[[SimpleNamespace], str]


@dataclass(frozen=True)
class Target:
    """One hole: an engine function ("route_topk") or method ("ExpertCache._victim")."""

    module: str  # "tinymoe.engine.model"
    qualname: str  # "route_topk" | "ExpertCache._victim"

    @property
    def name(self) -> str:
        """The top-level name the starter defines: the function, or the class of a method."""
        return self.qualname.split(".")[0]

    @property
    def is_method(self) -> bool:
        return "." in self.qualname

    @property
    def path(self) -> str:
        """The engine file, relative to the checkout: tinymoe/engine/model.py."""
        return self.module.replace(".", "/") + ".py"

    def engine_object(self) -> object:
        return getattr(importlib.import_module(self.module), self.name)

    def engine_function(self) -> object:
        """The engine's own function: the target itself, or the class's method."""
        obj = self.engine_object()
        if self.is_method:
            obj = inspect.getattr_static(obj, self.qualname.split(".", 1)[1])
        return getattr(obj, "__func__", obj)  # a staticmethod's or classmethod's function


@dataclass(frozen=True)
class Exercise:
    id: str  # kebab-case; the starter file is the id with underscores, .py
    title: str
    concepts: tuple[str, ...]
    targets: tuple[Target, ...]
    minutes: int  # an estimate for a student who has read the docs page
    prerequisites: tuple[str, ...]  # exercise ids to do first
    checks: tuple[tuple[str, Check], ...]  # (property, check) in the order they run
    # The properties (names in `checks`) whose check runs the engine on the student's code: a
    # model, runtime or scheduler, not just the student's function on its own.
    engine_checks: tuple[str, ...] = ()
    # Engine names the starter imports besides torch, F, Tensor and what the signatures need:
    # the helpers the page lets the student use (nothing that computes the answer).
    given: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.engine_checks) - {prop for prop, _ in self.checks}
        if unknown:
            raise ValueError(f"exercise {self.id}: engine_checks {sorted(unknown)} are not checks")

    @property
    def starter_name(self) -> str:
        return self.id.replace("-", "_") + ".py"

    @property
    def doc(self) -> str:
        return f"docs/exercises/{self.id}.md"

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.path for t in self.targets))

    def solution(self) -> SimpleNamespace:
        """The engine's own objects under the names the starter defines (check --solution)."""
        return SimpleNamespace(**{t.name: t.engine_object() for t in self.targets})


def targets(*specs: str) -> tuple[Target, ...]:
    """Targets from "module:qualname" specs."""
    return tuple(Target(*spec.split(":")) for spec in specs)


# ---------------------------------------------------------------- helpers for checks


@contextlib.contextmanager
def patched(module: str, name: str, value: object) -> Iterator[None]:
    """Replace `module.name` while the block runs, so the engine calls the student's code."""
    mod = importlib.import_module(module)
    saved = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, saved)


def expect(condition: bool, message: str, hint: str = "") -> None:
    if not condition:
        raise CheckFailed(message + (f"; {hint}" if hint else ""))


def expect_tensor(got: object, what: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """`got` is a tensor of this shape and dtype; the message names what differs."""
    expect(isinstance(got, Tensor), f"{what} should be a tensor, got {type(got).__name__}")
    expect(
        tuple(got.shape) == tuple(shape),
        f"{what} has shape {tuple(got.shape)}, expected {tuple(shape)}",
    )
    expect(got.dtype == dtype, f"{what} has dtype {got.dtype}, expected {dtype}")


def expect_view(got: Tensor, base: Tensor, message: str) -> None:
    """`got` is a view of `base`'s memory, not a copy."""
    expect(got.untyped_storage().data_ptr() == base.untyped_storage().data_ptr(), message)


def expect_user_error(action: Callable[[], object], what: str) -> str:
    """`action()` raises TinyMoeError (a message the user can act on) and nothing else."""
    try:
        action()
    except TinyMoeError:
        return f"{what} raises TinyMoeError"
    except NotImplementedError:
        raise  # an untouched hole: the runner says so
    except Exception as e:
        raise CheckFailed(
            f"{what} raised {type(e).__name__}, expected TinyMoeError (a message the user can "
            "act on)"
        ) from None
    raise CheckFailed(f"{what} should raise TinyMoeError, and nothing was raised")


def expect_close(
    got: Tensor, want: Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-5, hint: str = ""
) -> None:
    """Values match the reference within tolerance; the message gives the largest error."""
    expect_tensor(got, what, tuple(want.shape), want.dtype)
    got, want = got.double(), want.double()
    worst = (got - want).abs().max().item() if got.numel() else 0.0
    message = f"{what} differs from the reference (largest error {worst:.3g})"
    expect(torch.allclose(got, want, atol=atol, rtol=rtol), message, hint)


def expect_equal(got: Tensor, want: Tensor, what: str, hint: str = "") -> None:
    """Bit-for-bit equality (same shape, dtype and values)."""
    expect_tensor(got, what, tuple(want.shape), want.dtype)
    n = (got != want).sum().item()
    expect(
        n == 0,
        f"{what} is not bit-identical to the reference ({n} of {want.numel()} values differ)",
        hint,
    )


# Tensor methods that hand a tensor's values to Python: on a GPU each one waits for the device
# (a host-device sync); on a CPU they cost nothing, so a check must count them to see them.
HOST_READS = frozenset(
    {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
)


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values (HOST_READS) made inside the `with` block. Reading a
    tensor that `.cpu()` brought over (or one made from it) is free: on a GPU only the `.cpu()`
    waits, so `x.cpu().tolist()` is one read, as `x.tolist()` is, and `x.cpu(); x.tolist()` two.

    with HostReads() as reads:
        code.moe_forward(...)
    expect(reads.count <= 1, ...)
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.on_host: list[Tensor] = []  # what .cpu() returned, and what was made from it

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        out = func(*args, **(kwargs or {}))
        if args and any(args[0] is t for t in self.on_host):  # on the host already: free
            if isinstance(out, Tensor):
                self.on_host.append(out)
        elif name in HOST_READS:
            self.calls.append(name)
            if name == "cpu":  # (a CPU's .cpu() returns x itself: copy, as a GPU's would)
                out = out.clone() if out is args[0] else out
                self.on_host.append(out)
        return out
