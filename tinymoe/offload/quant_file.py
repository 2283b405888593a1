"""Quantized experts saved beside their checkpoint: quantized once, then read at every load.

Quantizing a full-size model's experts at load takes a while (OLMoE-1B-7B: about half a minute on
one core); their codes and scales are the same at every load, so they can be written once:

    DIR/experts-int4-g64.safetensors      (experts-{QuantFormat.tag}.safetensors)
        codes    (L, E, code_bytes(N)) uint8      as offload/quant.py lays them out
        scales   (L, E, N/g)           fp16
        metadata format "tinymoe-quantized-experts", version "1", bits, group_size,
                 num_layers, num_experts, expert_numel (all strings, as safetensors stores them)

`tinymoe quantize --model DIR --expert-quant int4` writes it (tinymoe/quantize.py);
`load_model(expert_quant=...)` reads it instead of quantizing again when it is there (the name
says the format and group size). A file of another format or version, or made for experts of
other shapes (a changed config.json), is refused in one line: write it again with --force. What
the file cannot tell is that the weights changed under the same shapes: after replacing a
checkpoint's weights, write it again too.
"""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tinymoe.engine.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.offload.quant import QuantFormat, QuantizedExperts

FORMAT, VERSION = "tinymoe-quantized-experts", 1
_ST = {torch.uint8: "U8", torch.float16: "F16"}  # the stored dtypes, as safetensors names them


def quant_path(model_dir: str | Path, fmt: QuantFormat) -> Path:
    """Where the experts of the checkpoint in model_dir, quantized as fmt, are saved."""
    return Path(model_dir) / f"experts-{fmt.tag}.safetensors"


def _metadata(cfg: ModelConfig, fmt: QuantFormat) -> dict[str, str]:
    return {
        "format": FORMAT,
        "version": str(VERSION),
        "bits": str(fmt.bits),
        "group_size": str(fmt.group_size),
        "num_layers": str(cfg.num_layers),
        "num_experts": str(cfg.num_experts),
        "expert_numel": str(cfg.expert_numel),
    }


def save_quantized(q: QuantizedExperts, cfg: ModelConfig, path: str | Path) -> None:
    """Write q, the quantized experts of a checkpoint with config cfg, to path."""
    tensors = {"codes": q.codes.contiguous(), "scales": q.scales.contiguous()}
    save_file(tensors, str(path), metadata=_metadata(cfg, q.fmt))


def read_quantized(path: str | Path, cfg: ModelConfig, into: QuantizedExperts) -> None:
    """Fill `into` (the host store's buffers, made for cfg's experts in into.fmt) from path,
    layer by layer; TinyMoeError, in one line, when path is not such a file."""
    redo = f"write it again: tinymoe quantize --model {Path(path).parent} --expert-quant "
    redo += f"{into.fmt.name} --expert-group-size {into.fmt.group_size} --force"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
                raise TinyMoeError(
                    f"{path}: not a {FORMAT} file of version {VERSION} (format "
                    f"{meta.get('format')!r}, version {meta.get('version')!r}); {redo}"
                )
            if meta != (want := _metadata(cfg, into.fmt)):
                diff = ", ".join(f"{k} {meta.get(k)} (not {v})" for k, v in want.items()
                                 if meta.get(k) != v)  # fmt: skip
                raise TinyMoeError(f"{path}: made for other experts: {diff}; {redo}")
            for name, buf in (("codes", into.codes), ("scales", into.scales)):
                part = f.get_slice(name)
                if (
                    tuple(part.get_shape()) != tuple(buf.shape)
                    or part.get_dtype() != _ST[buf.dtype]
                ):
                    raise TinyMoeError(f"{path}: tensor {name!r} is not {tuple(buf.shape)}; {redo}")
                for layer in range(buf.shape[0]):  # one layer at a time: no second whole copy
                    buf[layer].copy_(part[layer : layer + 1][0])
    except (SafetensorError, OSError) as e:
        raise TinyMoeError(f"{path}: not a readable safetensors file ({e}); {redo}") from None
