"""The quantized-experts exercise: int4 packing and symmetric group-wise quantization.

What the format fixes is checked bit for bit: the bytes of packed codes, the fp16 scales, the
codes themselves and what they read back as (the host store's bytes are what a copy moves, and
every device must read them back as the same bits for an offloaded run to be exact). Then the
student's quantize and dequantize run together (the round trip's error bound), and the engine
runs on them: the student's four functions put into tinymoe.offload.quant, a resident run of
the quantized experts computes what the engine's does, and an offloaded run, whose copies the
student's code dequantizes into the slots, generates the resident run's tokens.
"""

import contextlib
import functools

import torch
from torch import Tensor

from tinymoe.engine.generate import generate
from tinymoe.exercises.exercise import (
    CheckFailed,
    Exercise,
    expect,
    expect_equal,
    expect_tensor,
    patched,
    targets,
)
from tinymoe.exercises.fixtures import baby_model, demo_model, randn, random_ids
from tinymoe.exercises.offload_checks import FAST
from tinymoe.offload import quant as engine
from tinymoe.offload.quant import QuantFormat
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.offload.store import quantized_resident

NAMES = ("pack_int4", "unpack_int4", "quantize", "dequantize")
FORMATS = [QuantFormat(8, 64), QuantFormat(4, 64), QuantFormat(8, 32), QuantFormat(4, 32)]


# ---------------------------------------------------------------- int4: two codes a byte


def _every_pair() -> Tensor:
    """(4, 128) int8: all 256 pairs (a, b) of codes in [-8, 7], a at an even index."""
    a, b = torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], dim=-1).view(4, 128).to(torch.int8)


def check_pack(code) -> str:
    q = _every_pair()
    got, want = code.pack_int4(q), engine.pack_int4(q)
    expect_tensor(got, "pack_int4 of (4, 128) codes", (4, 64), torch.uint8)
    swapped = engine.pack_int4(q.view(4, 64, 2).flip(-1).reshape(4, 128))
    expect(
        not torch.equal(got, swapped),
        "the two codes of each byte are in each other's place",
        "code 2j goes in the low nibble (bits 0-3), code 2j+1 in the high one (bits 4-7)",
    )
    hint = "each code is stored as q + 8 (0..15), code 2j in bits 0-3, code 2j+1 in bits 4-7"
    expect_equal(got, want, "the tensor of packed bytes", hint)
    return "all 256 pairs of codes, two a byte, low nibble first"


def check_unpack(code) -> str:
    b = torch.arange(256, dtype=torch.uint8).view(4, 64)
    got = code.unpack_int4(b)
    expect_tensor(got, "unpack_int4 of (4, 64) bytes", (4, 128), torch.int8)
    expect_equal(
        got, engine.unpack_int4(b), "the tensor of codes of all 256 bytes", "pack_int4 undone"
    )
    q = _every_pair()
    expect_equal(code.unpack_int4(engine.pack_int4(q)), q, "unpack_int4(packed codes)")
    return "all 256 bytes; unpacking undoes packing"


# ---------------------------------------------------------------- quantize


def _weights(groups: int, g: int, seed: int) -> Tensor:
    """(groups * g,) weights whose groups differ in size by 3000x, one with an outlier."""
    w = randn(groups * g, seed=seed) * torch.logspace(-3, 0.5, groups).repeat_interleave(g)
    w[3 * g + 5] = 40 * w[3 * g : 4 * g].abs().max()  # one large weight: its group's scale
    return w


def _quantized(quantize, w: Tensor, fmt: QuantFormat) -> tuple[Tensor, Tensor]:
    """quantize(w) into fresh codes and scales, filled first with what no answer writes."""
    codes = torch.full((fmt.code_bytes(w.numel()),), 0xA5, dtype=torch.uint8)
    scales = torch.full((fmt.groups(w.numel()),), float("nan"), dtype=engine.SCALE_DTYPE)
    out = quantize(w, fmt, codes, scales)
    expect(out is None, "quantize writes into `codes` and `scales` and returns None")
    return codes, scales


def _cases():
    """(what, w, fmt): int8 and int4, groups of 64 and 32, fp32 and bf16 weights."""
    for fmt in FORMATS:
        for dtype in (torch.float32, torch.bfloat16):
            w = _weights(12, fmt.group_size, seed=fmt.bits + fmt.group_size).to(dtype)
            yield f"{fmt.name}, groups of {fmt.group_size}, {str(dtype)[6:]} weights", w, fmt


def check_scales(code) -> str:
    for what, w, fmt in _cases():
        _, got = _quantized(code.quantize, w, fmt)
        _, want = _quantized(engine.quantize, w, fmt)
        expect(
            not got.isnan().any(),
            f"{what}: quantize should write every scale into the `scales` it is given (in "
            "place: a row of the host store)",
        )
        ratio = (got.double() / want.double()).median().item()
        hint = (
            "one scale per group of g consecutive weights, max|w| / qmax over the group "
            f"(qmax = fmt.qmax = {fmt.qmax}: codes are symmetric), computed in fp32 and rounded "
            "to fp16"
        )
        expect_equal(
            got,
            want,
            f"{what}: the scale tensor (median ratio to the right scales {ratio:.3g})",
            hint,
        )
    return "max|w| / qmax in fp16: int8 and int4, groups of 64 and 32, fp32 and bf16 weights"


def check_codes(code) -> str:
    ties = 0
    for what, w, fmt in _cases():
        got, _ = _quantized(code.quantize, w, fmt)
        want, scales = _quantized(engine.quantize, w, fmt)
        if fmt.bits == 4:  # compared as codes, not bytes: the message counts codes
            got, want = engine.unpack_int4(got), engine.unpack_int4(want)
        else:
            got, want = got.view(torch.int8), want.view(torch.int8)
        x = w.float().view(-1, fmt.group_size) / scales.float()[:, None]  # (G, g)
        halfway = (x - x.floor() == 0.5).flatten()  # bf16 weights fall there now and then
        ties += int(halfway.sum())
        differ = got != want
        expect(
            not differ.any() or (differ & ~halfway).any(),
            f"{what}: {int(differ.sum())} code(s) with w / s exactly halfway between two "
            "integers differ",
            "ties round to the even integer, as torch.round (and Python's round) does",
        )
        hint = (
            "codes are round(w / s) with s the scale as stored (fp16), in fp32, clamped to "
            "[-qmax, qmax]; int8 codes are stored as their own bytes, int4 ones two a byte"
        )
        expect_equal(got, want, f"{what}: the code tensor", hint)
    return f"round(w / s) with the fp16 scale, {ties} ties to even; the same bytes"


# ---------------------------------------------------------------- dequantize


def check_dequantize(code) -> str:
    for fmt in FORMATS[:2]:
        w = _weights(12, fmt.group_size, seed=7)
        codes, scales = _quantized(engine.quantize, w, fmt)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            slots = torch.full((3, w.numel()), float("nan"), dtype=dtype)  # write into slot 1
            want = torch.empty(w.numel(), dtype=dtype)
            engine.dequantize(codes, scales, fmt, want)
            code.dequantize(codes, scales, fmt, slots[1])
            what = f"{fmt.name} read back into a {str(dtype)[6:]} slot"
            expect(
                slots[0].isnan().all() and slots[2].isnan().all(),
                f"{what}: dequantize wrote outside `out`",
            )
            expect(
                not slots[1].isnan().any(),
                f"{what}: dequantize should write into the `out` it is given (in place: the slot)",
            )
            hint = "q * s computed in fp32 (where it is exact), rounded once to out's dtype"
            expect_equal(slots[1], want, what, hint)
    return "q * s, exact in fp32, rounded once: the same bits in fp32, bf16 and fp16 slots"


def check_round_trip(code) -> str:
    notes = []
    for fmt in FORMATS[:2]:
        w = _weights(12, fmt.group_size, seed=11)
        w[:64] = 0  # an all-zero group (or two) and a group of tiny weights
        w[64 : 64 + fmt.group_size] *= 1e-9
        codes, scales = _quantized(code.quantize, w, fmt)
        back = torch.empty_like(w)
        code.dequantize(codes, scales, fmt, back)
        expect(back.isfinite().all(), f"{fmt.name}: weights read back as inf or NaN")
        expect_equal(back[:64], torch.zeros(64), f"{fmt.name}: an all-zero group read back")
        step = scales.float().repeat_interleave(fmt.group_size)  # (N,)
        err = (back.double() - w.double()).abs() / step.double()
        expect(
            err.max().item() <= 0.5 + 1e-3,
            f"{fmt.name}: a weight reads back {err.max().item():.3g} of its group's scale away "
            "(round to nearest: at most half a step)",
        )
        notes.append(f"{fmt.name} {100 * _demo_error(code, fmt):.2f}%")
    return "within half a step; the demo model's experts' relative error " + ", ".join(notes)


def _demo_error(code, fmt: QuantFormat) -> float:
    """||w - read back|| / ||w|| over the demo model's layer-0 experts."""
    w = demo_model().experts.weights[0].detach().flatten()  # (E * N,)
    codes, scales = _quantized(code.quantize, w, fmt)
    back = torch.empty_like(w)
    code.dequantize(codes, scales, fmt, back)
    return ((back - w).norm() / w.norm()).item()


# ---------------------------------------------------------------- the engine on your code

RUNS = [("olmoe", torch.float32), ("mixtral", torch.bfloat16)]  # (baby model, its dtype)
PROMPT, NEW = random_ids(96, (1, 12), seed=2)[0].tolist(), 8


@contextlib.contextmanager
def _yours(code):
    """tinymoe.offload.quant with the student's four functions (the engine's, for None)."""
    with contextlib.ExitStack() as stack:
        for name in NAMES if code is not None else ():
            stack.enter_context(patched("tinymoe.offload.quant", name, getattr(code, name)))
        yield


def _model(arch: str, dtype: torch.dtype):
    return baby_model(arch, seed=3).to(dtype)


def _resident(code, arch: str, dtype: torch.dtype, fmt: QuantFormat) -> tuple[Tensor, list]:
    """A resident run of the quantized experts: logits of a prompt and greedy tokens."""
    model = _model(arch, dtype)
    with _yours(code), quantized_resident(model, fmt), torch.no_grad():
        logits = model(torch.tensor([PROMPT]))
        return logits, generate(model, PROMPT, NEW, eos_ids=()).tokens


@functools.cache
def _engine_resident(arch: str, dtype: torch.dtype, fmt: QuantFormat) -> tuple[Tensor, list]:
    return _resident(None, arch, dtype, fmt)


def check_resident(code) -> str:
    for arch, dtype in RUNS:
        for fmt in FORMATS[:2]:
            logits, tokens = _resident(code, arch, dtype, fmt)
            want_logits, want_tokens = _engine_resident(arch, dtype, fmt)
            what = f"{arch} in {str(dtype)[6:]}, {fmt.name} experts"
            expect_equal(
                logits,
                want_logits,
                f"{what}: the logits tensor",
                "the format fixes the experts' bits",
            )
            expect(tokens == want_tokens, f"{what}: greedy tokens differ from the engine's")
    return "baby OLMoE (fp32) and Mixtral (bf16), int8 and int4: the engine's logits, bit for bit"


def check_offloaded(code) -> str:
    for arch, dtype in RUNS:
        for fmt in FORMATS[:2]:
            want = _resident(code, arch, dtype, fmt)[1]  # your quantized experts, resident
            model = _model(arch, dtype)
            with (
                _yours(code),
                OffloadRuntime(model, "lru", slots=3, link=FAST, expert_quant=fmt.name) as rt,
            ):
                got = generate(model, PROMPT, NEW, eos_ids=()).tokens
                copies = rt.report()["decode"]["bytes_copied"] // rt.store.expert_bytes
            if got != want:
                raise CheckFailed(
                    f"{arch} in {str(dtype)[6:]}, {fmt.name} experts: offloaded (lru, 3 slots) "
                    f"the model generates {got}, resident with the same quantized experts {want}"
                )
    return f"lru with 3 of 8 slots: the resident run's tokens ({copies} copies in decode)"


QUANT = Exercise(
    id="quant",
    title="Quantized experts: int4 packing and group-wise scales",
    concepts=(
        "bytes on the link",
        "symmetric group-wise quantization",
        "one fp16 scale per group",
        "two int4 codes a byte",
        "read back the same bits on every device",
    ),
    targets=targets(*(f"tinymoe.offload.quant:{name}" for name in NAMES)),
    minutes=35,
    prerequisites=("expert", "time-model"),
    checks=(
        ("int4 packing", check_pack),
        ("int4 unpacking", check_unpack),
        ("scales", check_scales),
        ("codes", check_codes),
        ("reading back", check_dequantize),
        ("round trip", check_round_trip),
        ("a resident run on your quantized experts", check_resident),
        ("offloaded equals resident", check_offloaded),
    ),
    engine_checks=("a resident run on your quantized experts", "offloaded equals resident"),
    given=("SCALE_DTYPE",),  # the scales' dtype, fp16
)
