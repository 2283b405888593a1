"""Checkpoint I/O: Hugging Face safetensors in, a `MoETransformer` out (and back, for training).

Reads `model.safetensors`, or the shards a `model.safetensors.index.json` lists, memory-mapped,
one tensor at a time, cast straight into the model's preallocated parameters (so peak host memory
is the model plus one tensor). Safetensors only: a pickle is never unpickled.

Experts kept on the host (`expert_device="cpu"`) are read, expert by expert, into ONE
(L, E, 3*I*D) buffer from `host_buffer` (offload/store.py), page-locked exactly when the model
computes on CUDA; each layer's parameter is a view of it, so the offloading runtime's host store
adopts them as they are and the host never holds the experts twice. Quantized experts
(`expert_quant`, offload/quant.py) are read one expert at a time and quantized into the host
buffers the store adopts: only their codes and scales, plus one expert, are ever on the host
(and, kept resident, what they read back as on the device); or read, quantized before, from the
file `tinymoe quantize` saves beside the checkpoint (offload/quant_file.py). The dtype to compute in
is decided here too, in one place (resolve_dtype): the tools give it their check of what fits in
memory (tinymoe/cli.py, dtype_from_args, before anything is read; weight_bytes counts the weights).

Key mapping (checkpoint key -> tinymoe name): drop the leading `model.`; Mixtral's
`block_sparse_moe` is our `mlp`; `self_attn.{q,k,v}_proj` are the three row blocks of our fused
`self_attn.qkv_proj`. Experts come in two layouts, both packed into one contiguous buffer per
expert (see experts.py):
- published, per expert: `mlp.experts.E.{gate_proj,up_proj,down_proj}.weight` (OLMoE, Qwen3-MoE)
  or `block_sparse_moe.experts.E.{w1,w3,w2}.weight` (Mixtral);
- fused, as transformers 5 may save: `mlp.experts.gate_up_proj` (E, 2I, D), gate rows then up
  rows, and `mlp.experts.down_proj` (E, D, I).
"""

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tinymoe.engine.config import ModelConfig
from tinymoe.engine.experts import expert_views
from tinymoe.engine.model import MoETransformer
from tinymoe.errors import TinyMoeError
from tinymoe.offload.quant import DEFAULT_GROUP_SIZE, quant_format
from tinymoe.offload.quant_file import quant_path, read_quantized
from tinymoe.offload.store import host_buffer, quantized_buffers
from tinymoe.progress import Progress

# The --dtype choices. "auto" is resolved per checkpoint and device by resolve_dtype.
DTYPES = ("auto", "float32", "bfloat16", "float16")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors header dtype names -> torch's, for the ones tinymoe computes in
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Per-expert tensor names: (gate, up, down) for each architecture's published layout.
EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),
    "olmoe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
}
# Experts of at least this many weights in all show a progress bar while they are quantized.
PROGRESS_NUMEL = 2**28
# The fused attention projection (model.py) and the checkpoint tensors it is made of, row blocks
# in this order: q (H*Dh rows), k and v (Hkv*Dh rows each).
QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def qkv_rows(cfg: ModelConfig) -> tuple[int, int, int]:
    """Rows of q, k and v in `self_attn.qkv_proj` (its weight and, with attention_bias, bias)."""
    kv = cfg.num_kv_heads * cfg.head_dim
    return cfg.num_heads * cfg.head_dim, kv, kv


def resolve_dtype(
    name: str | torch.dtype,
    checkpoint_dtype: str,
    device: str | torch.device,
    fits: Callable[[torch.dtype], bool] | None = None,
) -> torch.dtype:
    """The dtype to compute in: `name`, where "auto" means the checkpoint's own dtype on an
    accelerator and float32 on the CPU when it fits in memory, else the checkpoint's dtype.

    Why float32 on the CPU: bf16 matmuls there are slow (often emulated) and not every CPU kernel
    supports bf16 well. But a bf16 checkpoint widened to fp32 takes twice its size in memory
    (OLMoE-1B-7B: 27.7 GB instead of 13.8), and a run that fits is worth more than a fast one
    that cannot start. Why the checkpoint's dtype on a GPU: widening bf16 to fp32 would double
    the memory and the bytes of every expert copy, for no accuracy gained over the stored weights.
    checkpoint_dtype: e.g. "bfloat16", as Checkpoint.storage_dtype names it.
    fits: whether everything a run allocates fits in memory in a dtype (the tools pass
    tinymoe.cli's check, made before loading); None: assume it does (load_model's own "auto").
    """
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise TinyMoeError(f"dtype {name!r} is not supported; expected one of {', '.join(DTYPES)}")
    if name != "auto":
        return _TORCH_DTYPES[name]
    stored = _TORCH_DTYPES.get(checkpoint_dtype)
    if torch.device(device).type == "cpu":
        # A stored dtype tinymoe does not compute in (fp8) stays float32: if that does not fit,
        # the caller's memory check names --dtype bfloat16.
        return torch.float32 if stored is None or fits is None or fits(torch.float32) else stored
    if stored is None:
        raise TinyMoeError(
            f"dtype 'auto': the checkpoint stores {checkpoint_dtype}, which tinymoe does not "
            f"compute in; choose one of {', '.join(_TORCH_DTYPES)} (--dtype)"
        )
    return stored


class Checkpoint:
    """The tensors of a checkpoint directory, by tinymoe name, read lazily from safetensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise TinyMoeError(f"{self.path}: not a directory; expected a checkpoint directory")
        self.config = ModelConfig.from_file(self.path / "config.json")
        self.files = self._shard_files()
        self.where: dict[str, tuple[Path, str]] = {}  # tinymoe name -> (file, checkpoint key)
        self._handles = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise TinyMoeError(
                    f"{f}: not a readable safetensors file; truncated or corrupt? ({e})"
                ) from None
            self._handles[f] = h
            for key in keys:  # renamed as the key mapping at the top says
                name = key.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
                self.where[name] = (f, key)

    def _shard_files(self) -> list[Path]:
        single, index = self.path / "model.safetensors", self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise TinyMoeError(f"{index}: not a valid safetensors index ({e})") from None
            files = [self.path / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.exists():
                    raise TinyMoeError(f"{index}: lists shard {f.name}, which does not exist")
            return files
        if single.exists():
            return [single]
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
            raise TinyMoeError(
                f"{self.path}: only pickle weights (*.bin/*.pt) found; tinymoe reads safetensors "
                "only (convert with transformers' save_pretrained)"
            )
        raise TinyMoeError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        if name not in self.where:
            raise TinyMoeError(f"{self.path}: missing tensor {name!r} (shape {shape})")
        f, key = self.where[name]
        try:
            t = self._handles[f].get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise TinyMoeError(
                f"{f}: cannot read tensor {key!r}; the file looks truncated or corrupt ({e})"
            ) from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise TinyMoeError(
                f"{f}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
            )
        return t

    def read_expert_layer(self, layer: int, out: Tensor) -> None:
        """Pack layer `layer`'s experts into out (E, 3*I*D), casting to out's dtype."""
        cfg = self.config
        E, I, D = cfg.num_experts, cfg.expert_dim, cfg.hidden_size
        prefix = f"layers.{layer}.mlp.experts."
        if prefix + "gate_up_proj" in self.where:  # fused layout
            out[:, : 2 * I * D].copy_(
                self.get(prefix + "gate_up_proj", (E, 2 * I, D)).reshape(E, -1)
            )
            out[:, 2 * I * D :].copy_(self.get(prefix + "down_proj", (E, D, I)).reshape(E, -1))
            return
        for e in range(E):  # per-expert tensors: one expert at a time, as read_expert does
            self.read_expert(layer, e, out[e])

    def read_expert(self, layer: int, expert: int, out: Tensor) -> None:
        """Pack one expert into out (3*I*D,), casting to out's dtype (a fused layout's tensor
        is sliced, not read whole)."""
        cfg = self.config
        I, D = cfg.expert_dim, cfg.hidden_size
        prefix = f"layers.{layer}.mlp.experts."
        gate_up, down_view = expert_views(out, I, D)
        if prefix + "gate_up_proj" in self.where:  # fused layout: (E, 2I, D) and (E, D, I)
            for name, view in (("gate_up_proj", gate_up), ("down_proj", down_view)):
                f, key = self.where[prefix + name]
                part = self._handles[f].get_slice(key)  # reads nothing yet
                if (got := tuple(part.get_shape())) != (want := (cfg.num_experts, *view.shape)):
                    raise TinyMoeError(f"{f}: tensor {key!r} has shape {got}, expected {want}")
                view.copy_(part[expert : expert + 1].reshape(view.shape))  # this expert's only
            return
        gate, up, down = EXPERT_NAMES[cfg.model_type]
        gate_up[:I].copy_(self.get(f"{prefix}{expert}.{gate}.weight", (I, D)))
        gate_up[I:].copy_(self.get(f"{prefix}{expert}.{up}.weight", (I, D)))
        down_view.copy_(self.get(f"{prefix}{expert}.{down}.weight", (D, I)))

    def storage_dtype(self) -> str:
        """The checkpoint's dtype, as transformers' dtype="auto" finds it: what config.json
        states, else the embedding's, from the safetensors header (the tensor is not read)."""
        if self.config.dtype is not None:
            return self.config.dtype
        name = "embed_tokens.weight"
        if name not in self.where:
            raise TinyMoeError(f"{self.path}: missing tensor {name!r}")
        f, key = self.where[name]
        with open(f, "rb") as fh:  # the header: 8 bytes of length, then JSON
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        stored = header[key]["dtype"]  # e.g. "BF16"
        return _SAFETENSORS_DTYPES.get(stored, stored)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    expert_device: str | torch.device | None = None,
    expert_quant: str = "none",
    group_size: int = DEFAULT_GROUP_SIZE,
    use_saved: bool = True,
) -> MoETransformer:
    """Build a MoETransformer from a checkpoint directory, every weight on `device` in `dtype`.

    dtype: a torch dtype or one of DTYPES; "auto" (the default) is the checkpoint's dtype on a
    GPU and float32 on the CPU (see resolve_dtype; the tools first check what fits in memory,
    tinymoe.cli.dtype_from_args, and pass the dtype it chose).

    expert_device: where the experts go (default: `device`); "cpu" reads them into the one host
    buffer the offloading runtime adopts (see the top), so they never have to fit on a GPU.

    expert_quant, group_size: "int8" | "int4" quantizes the experts as they are read, one at a
    time (offload/quant.py), into `model.experts.quantized` (host memory, pinned on CUDA), which
    an OffloadRuntime with that format adopts. With expert_device "cpu" that is all there is of
    them (the resident weights stay empty: offloading only); otherwise the resident weights are
    what the quantized experts read back as, so a resident run computes with the same experts.
    use_saved: read the experts quantized before, saved beside the checkpoint
    (`experts-int4-g64.safetensors`, offload/quant_file.py), instead of quantizing them again.
    """
    device = torch.device(device)
    expert_given, pin = expert_device is not None, device.type == "cuda"
    expert_device = device if expert_device is None else torch.device(expert_device)
    ckpt = Checkpoint(path)
    dtype = resolve_dtype(dtype, ckpt.storage_dtype(), device)
    cfg = ckpt.config
    with torch.device("meta"):
        model = MoETransformer(cfg)  # shapes only: no memory, no random init
    experts = model.experts
    del model.experts  # allocated on their own below: they may live on the host
    model = model.to(dtype).to_empty(device=device)
    fmt = quant_format(expert_quant, group_size, cfg.expert_numel)
    if fmt is not None:  # the host store's buffers, filled expert by expert below
        shape = (cfg.num_layers, cfg.num_experts, cfg.expert_numel)
        q = experts.quantized = quantized_buffers(*shape, fmt, pin)
    if fmt is not None and expert_given and expert_device.type == "cpu":
        for i in range(cfg.num_layers):  # offloading only: no expert in the model's dtype at all
            experts.weights[i] = nn.Parameter(torch.empty(0, dtype=dtype))
    elif expert_device.type == "cpu":
        buf = host_buffer((cfg.num_layers, cfg.num_experts, cfg.expert_numel), dtype, pin)
        for i in range(cfg.num_layers):
            experts.weights[i] = nn.Parameter(buf[i])  # a view: the buffer is shared
    else:
        for i, p in enumerate(experts.weights):
            w = torch.empty(p.shape, dtype=dtype, device=expert_device)
            experts.weights[i] = nn.Parameter(w)
    model.experts = experts
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty unties; tie again

    used: set[str] = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("experts."):
                continue
            if ".qkv_proj." in name:  # one fused parameter, three checkpoint tensors
                for part, rows in zip(QKV_PARTS, p.split(qkv_rows(cfg)), strict=True):
                    key = name.replace("qkv_proj", part)
                    rows.copy_(ckpt.get(key, tuple(rows.shape)))
                    used.add(key)
                continue
            p.copy_(ckpt.get(name, tuple(p.shape)))
            used.add(name)
        # Quantizing a full-size model's experts takes a while (OLMoE-1B-7B's 6.4B weights:
        # about half a minute on one core): shown, beyond a demo's size, as a progress bar.
        # Saved before (tinymoe quantize, offload/quant_file.py): read, not quantized again.
        saved = fmt is not None and use_saved and quant_path(path, fmt).exists()
        if saved:
            read_quantized(quant_path(path, fmt), cfg, q)
        big = cfg.num_layers * cfg.num_experts * cfg.expert_numel >= PROGRESS_NUMEL
        bar = Progress(cfg.num_layers, f"quantizing the experts ({fmt})", unit="layers")
        bar = bar if fmt and not saved and big else None
        for layer in range(cfg.num_layers):
            resident = model.experts.weights[layer]
            if fmt is None:
                ckpt.read_expert_layer(layer, resident)
            elif saved:  # the resident run's experts: what the saved codes read back as
                if resident.numel():
                    q.dequantize_layer(layer, resident)
            else:  # one expert at a time, into the host store's buffers; read in fp32 (exact
                # for a bf16, fp16 or fp32 checkpoint), so the codes do not depend on --dtype
                q.quantize_layer(layer, partial(ckpt.read_expert, layer), torch.float32, resident)
                if bar is not None:
                    bar.update()
            used |= {n for n in ckpt.where if n.startswith(f"layers.{layer}.mlp.experts.")}
        if bar is not None:
            bar.close()
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # some exporters store the tied copy too; it is the same tensor
    unexpected = sorted(set(ckpt.where) - used)
    if unexpected:
        f, key = ckpt.where[unexpected[0]]
        raise TinyMoeError(
            f"{f}: unexpected tensor {key!r} ({len(unexpected)} unexpected in all); "
            f"does config.json describe this checkpoint?"
        )
    return model.eval()


def save_model(model: MoETransformer, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write model.safetensors in the published per-expert layout Hugging Face loaders expect."""
    cfg = model.cfg
    gate, up, down = EXPERT_NAMES[cfg.model_type]
    moe = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    I, D = cfg.expert_dim, cfg.hidden_size
    tensors: dict[str, Tensor] = {}

    def put(key: str, t: Tensor) -> None:
        t = t.detach()
        tensors[key] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()

    for name, p in model.named_parameters():
        if name.startswith("experts."):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key = name if name == "lm_head.weight" else "model." + name
        key = key.replace(".mlp.", f".{moe}.")
        if ".qkv_proj." in key:  # written as the three tensors checkpoints hold
            for part, rows in zip(QKV_PARTS, p.split(qkv_rows(cfg)), strict=True):
                put(key.replace("qkv_proj", part), rows)
            continue
        put(key, p)
    for layer, w in enumerate(model.experts.weights):
        for e in range(cfg.num_experts):
            gate_up, down_view = expert_views(w[e], I, D)
            prefix = f"model.layers.{layer}.{moe}.experts.{e}."
            put(prefix + f"{gate}.weight", gate_up[:I])
            put(prefix + f"{up}.weight", gate_up[I:])
            put(prefix + f"{down}.weight", down_view)
    Path(path).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(path) / "model.safetensors"), metadata={"format": "pt"})
