"""The exercises, in the order a course takes them: from the forward pass to the paper's idea.

Each exercise is defined next to its checks (the *_checks.py files); this file puts them in order.
"""

from tinymoe.errors import TinyMoeError
from tinymoe.exercises.distillation_checks import DISTILLATION
from tinymoe.exercises.exercise import Exercise
from tinymoe.exercises.forward_checks import NORM_ROPE, ROUTING
from tinymoe.exercises.kvcache_checks import KV_CACHE
from tinymoe.exercises.moe_checks import EXPERT, MOE_LAYER
from tinymoe.exercises.offload_checks import EVICTION
from tinymoe.exercises.prefetch_checks import PREFETCH, TIME_MODEL
from tinymoe.exercises.quant_checks import QUANT
from tinymoe.exercises.speculation_checks import ROUTER_PF
from tinymoe.exercises.speculative_checks import SPECULATIVE

EXERCISES: tuple[Exercise, ...] = (
    NORM_ROPE,
    ROUTING,
    EXPERT,
    MOE_LAYER,
    KV_CACHE,
    EVICTION,
    TIME_MODEL,
    PREFETCH,
    QUANT,
    ROUTER_PF,
    SPECULATIVE,
    DISTILLATION,
)


def get(exercise_id: str) -> Exercise:
    for ex in EXERCISES:
        if ex.id == exercise_id:
            return ex
    raise TinyMoeError(
        f"no exercise {exercise_id!r}; the exercises are: {', '.join(e.id for e in EXERCISES)} "
        "(python -m tinymoe.exercises list)"
    )
