"""The quantized-experts exercise (`quant`): an answer written differently from the engine
passes; lazy answers (a hole left out, or the engine's own function called) are rejected before
any check runs; plausibly wrong answers fail the property they break, with a message, not a
traceback. (tests/test_exercises.py runs the checks every exercise shares on it too.)"""

import pytest
from conftest import fill, started
from test_exercises import _answer_lines

from tinymoe.exercises.runner import check_file

# Written differently from the engine: int16 arithmetic with * 16 and % 16 instead of shifts and
# masks, codes written into a preallocated tensor by stride, the scale clamped with maximum, the
# read-back multiplied in a (G, g) float tensor and copied into `out` (copy_ rounds once).
RIGHT = {
    "pack_int4": """
        low = q[..., 0::2].to(torch.int16) + 8
        high = q[..., 1::2].to(torch.int16) + 8
        return (low + 16 * high).to(torch.uint8)
    """,
    "unpack_int4": """
        wide = b.to(torch.int16)
        q = torch.empty(*b.shape[:-1], 2 * b.shape[-1], dtype=torch.int8)
        q[..., 0::2] = wide % 16 - 8
        q[..., 1::2] = wide // 16 - 8
        return q
    """,
    "quantize": """
        groups = w.detach().to(torch.float32).reshape(fmt.groups(w.numel()), fmt.group_size)
        biggest = groups.abs().max(dim=1).values
        s = torch.maximum(biggest / fmt.qmax, torch.tensor(2.0**-24)).to(SCALE_DTYPE)
        scales[:] = s
        q = torch.round(groups / s.to(torch.float32).unsqueeze(1))
        q = torch.clamp(q, min=-fmt.qmax, max=fmt.qmax).to(torch.int8).flatten()
        if fmt.bits == 4:
            codes[:] = pack_int4(q)
        else:
            codes[:] = q.view(torch.uint8)
    """,
    "dequantize": """
        if fmt.bits == 4:
            q = unpack_int4(codes)
        else:
            q = codes.view(torch.int8)
        w = q.float().reshape(-1, fmt.group_size) * scales.float().reshape(-1, 1)
        out.copy_(w.flatten())
    """,
}

# Each with RIGHT's other holes: (hole, the wrong body, the property it must fail first).
WRONG = [
    (
        "pack_int4",
        "u = (q + 8).to(torch.uint8)\nreturn (u[..., 0::2] << 4) | u[..., 1::2]  # high first",
        "int4 packing",
    ),
    (
        "pack_int4",
        "u = q.to(torch.uint8) & 0x0F  # two's complement nibbles, not q + 8\n"
        "return u[..., 0::2] | (u[..., 1::2] << 4)",
        "int4 packing",
    ),
    (
        "unpack_int4",
        "return torch.stack([b & 15, b >> 4], dim=-1).flatten(-2) - 8  # still uint8",
        "int4 unpacking",
    ),
    (  # the int4 range is -8..7, so a scale of max/8 looks natural
        "quantize",
        RIGHT["quantize"].replace("biggest / fmt.qmax", "biggest / 2 ** (fmt.bits - 1)"),
        "scales",
    ),
    (  # one scale for the whole expert (per tensor), written to every group
        "quantize",
        RIGHT["quantize"].replace(
            "biggest = groups.abs().max(dim=1).values",
            "biggest = groups.abs().max().expand(groups.shape[0])",
        ),
        "scales",
    ),
    (  # groups cut the other way: weight j of every group (a strided group)
        "quantize",
        RIGHT["quantize"].replace(
            "biggest = groups.abs().max(dim=1).values",
            "biggest = w.detach().float().view(fmt.group_size, -1).abs().max(dim=0).values",
        ),
        "scales",
    ),
    (  # bf16 weights quantized in bf16
        "quantize",
        RIGHT["quantize"].replace("w.detach().to(torch.float32)", "w.detach()"),
        "scales",
    ),
    (  # the codes from the fp32 scale, the fp16 one stored
        "quantize",
        RIGHT["quantize"].replace(
            "groups / s.to(torch.float32).unsqueeze(1)", "groups / (biggest / fmt.qmax)[:, None]"
        ),
        "codes",
    ),
    (  # halfway rounded up (bf16 weights fall halfway now and then)
        "quantize",
        RIGHT["quantize"].replace("torch.round(groups", "torch.floor(0.5 + groups"),
        "codes",
    ),
    (  # always rounded down
        "quantize",
        RIGHT["quantize"].replace("torch.round(", "torch.floor("),
        "codes",
    ),
    (  # truncated toward zero
        "quantize",
        RIGHT["quantize"].replace("torch.round(", "("),
        "codes",
    ),
    (  # the scale rounded to the slot's dtype before the product: bf16 rounds twice
        "dequantize",
        RIGHT["dequantize"].replace(
            "w = q.float().reshape(-1, fmt.group_size) * scales.float().reshape(-1, 1)",
            "w = q.to(out.dtype).reshape(-1, fmt.group_size) * scales.to(out.dtype)[:, None]",
        ),
        "reading back",
    ),
    (  # a new tensor, not the slot
        "dequantize",
        RIGHT["dequantize"].replace("out.copy_(w.flatten())", "out = w.flatten().to(out.dtype)"),
        "reading back",
    ),
]


def _check(tmp_path, bodies: dict[str, str], fail_fast: bool = True) -> int:
    path = started(tmp_path, "quant")
    text = path.read_text()
    for name, body in bodies.items():
        text = fill(text, name, body)
    path.write_text(text)
    return check_file("quant", path, fail_fast=fail_fast)


def test_a_right_answer_written_differently_passes(tmp_path, capsys):
    assert _check(tmp_path, RIGHT, fail_fast=False) == 0, capsys.readouterr().out
    assert "the engine runs on your code" in capsys.readouterr().out


@pytest.mark.parametrize("name,body,fails", WRONG, ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)])
def test_a_wrong_answer_fails_the_property_it_breaks(name, body, fails, tmp_path, capsys):
    assert _check(tmp_path, {**RIGHT, name: body}) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("  FAIL  ")]
    assert failed and failed[0].startswith(f"  FAIL  {fails}: "), out
    assert "Traceback" not in out and " raised " not in failed[0], out
    assert not [line for line in _answer_lines("quant") if line in out]


@pytest.mark.parametrize(
    "name,body,says",
    [
        ("quantize", None, "quantize is missing"),
        (
            "quantize",
            "from tinymoe.offload.quant import quantize as q\nreturn q(w, fmt, codes, scales)",
            "quantize delegates to the engine's own quantize",
        ),
        (
            "pack_int4",
            "import tinymoe.offload.quant as engine\nreturn engine.pack_int4(q)",
            "pack_int4 delegates to the engine's own pack_int4",
        ),
    ],
)
def test_a_lazy_answer_gets_nothing(name, body, says, tmp_path, capsys):
    bodies = {n: b for n, b in RIGHT.items() if n != name or body is not None}
    if body is not None:
        bodies[name] = body
    path = started(tmp_path, "quant")
    text = path.read_text()
    if body is None:  # the def cut out: the engine's would be imported, not written
        start = text.index(f"def {name}(")
        text = text[:start] + text[text.index("\ndef ", start) + 1 :]
    for n, b in bodies.items():
        text = fill(text, n, b)
    path.write_text(text)
    assert check_file("quant", path) == 1
    out = capsys.readouterr().out
    assert f"  FAIL  {says}" in out and "No check ran" in out and " ok " not in out, out
