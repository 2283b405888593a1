"""The calibration files: what the predictors need from data, saved beside the checkpoint.

`python -m tinymoe.calibrate` measures them once per checkpoint (default vectors, trained
estimators, the hybrid predictor's layers); the runtime and the tools only read them back here:

    speculation.safetensors   tensors: default_vectors (L, E, D), expert_counts (L, E), and each
                              estimator's weights under "{kind}.d{lookahead}.{name}"
    speculation.json          metadata: format_version, every estimator's kind, lookahead and
                              config, the hybrid layers per lookahead, and what calibrate measured

A file written by another format version is refused with a message, never half-read.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tinymoe.engine.config import ModelConfig
from tinymoe.errors import TinyMoeError
from tinymoe.speculation.estimator import EstimatorConfig, build_estimator

TENSORS_FILE, META_FILE = "speculation.safetensors", "speculation.json"
FORMAT_VERSION = 1  # bump when the files change meaning; load_speculation reads this one only


@dataclass
class Calibration:
    """Everything the learned and default-vector predictors need for one checkpoint."""

    default_vectors: Tensor  # (L, E, D) fp32: v[l, e], the mean output of expert e at layer l
    expert_counts: Tensor  # (L, E) calibration tokens routed to each expert
    estimators: dict[tuple[str, int], nn.Module]  # (kind, lookahead) -> trained estimator
    hybrid_layers: dict[int, list[int]]  # lookahead -> predicted layers that use the estimator
    meta: dict = field(default_factory=dict)  # what speculation.json records besides

    def estimator(self, kind: str, lookahead: int) -> nn.Module:
        if (kind, lookahead) not in self.estimators:
            have = sorted(d for k, d in self.estimators if k == kind)
            raise TinyMoeError(
                f"{META_FILE}: no {kind} trained for lookahead {lookahead} (have: "
                f"{have or 'none'}); rerun `python -m tinymoe.calibrate --lookahead ...`"
            )
        return self.estimators[(kind, lookahead)]


def save_speculation(cal: Calibration, out_dir: str | Path) -> None:
    """Write speculation.{safetensors,json} into `out_dir` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"default_vectors": cal.default_vectors, "expert_counts": cal.expert_counts}
    entries = []
    for (kind, d), est in cal.estimators.items():
        for name, p in est.state_dict().items():
            tensors[f"{kind}.d{d}.{name}"] = p.detach().float().cpu().contiguous()
        params = sum(p.numel() for p in est.parameters())
        entries.append({"kind": kind, "lookahead": d, "config": asdict(est.cfg), "params": params})
    save_file(tensors, str(out / TENSORS_FILE), metadata={"format": "pt"})
    meta = {
        **cal.meta,
        "format_version": FORMAT_VERSION,
        "estimators": entries,
        "hybrid_layers": {str(d): layers for d, layers in cal.hybrid_layers.items()},
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_speculation(path: str | Path, cfg: ModelConfig | None = None) -> Calibration | None:
    """Read speculation.{json,safetensors} from directory `path`; None if neither is there.

    With `cfg`, every tensor's shape is checked against the model it will be used with.
    """
    path = Path(path)
    meta_path, tensors_path = path / META_FILE, path / TENSORS_FILE
    if not meta_path.exists() and not tensors_path.exists():
        return None
    for p in (meta_path, tensors_path):
        if not p.exists():
            raise TinyMoeError(f"{p}: missing (the two speculation files go together)")
    try:
        meta = json.loads(meta_path.read_text())
        version = meta.get("format_version")
        entries = meta.pop("estimators")
        hybrid = {int(d): list(v) for d, v in meta.pop("hybrid_layers").items()}
    except (json.JSONDecodeError, KeyError, AttributeError, ValueError) as e:
        raise TinyMoeError(f"{meta_path}: not a valid speculation metadata file ({e})") from None
    if version != FORMAT_VERSION:
        raise TinyMoeError(
            f"{meta_path}: format_version {version!r} is not supported (this tinymoe reads "
            f"version {FORMAT_VERSION}); recalibrate with `python -m tinymoe.calibrate`"
        )
    try:
        with safe_open(str(tensors_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise TinyMoeError(f"{tensors_path}: not a readable safetensors file ({e})") from None
    for key in ("default_vectors", "expert_counts"):
        if key not in tensors:
            raise TinyMoeError(f"{tensors_path}: missing tensor {key!r}")
    dv = tensors["default_vectors"]
    expected = None if cfg is None else (cfg.num_layers, cfg.num_experts, cfg.hidden_size)
    if expected is not None and tuple(dv.shape) != expected:
        raise TinyMoeError(
            f"{tensors_path}: default_vectors has shape {tuple(dv.shape)}, expected "
            f"{expected} (layers, experts, hidden) for this model; recalibrate"
        )
    estimators = {}
    for entry in entries:
        try:
            kind, d = entry["kind"], int(entry["lookahead"])
            est = build_estimator(EstimatorConfig(**entry["config"]))
        except (KeyError, TypeError, ValueError, TinyMoeError) as e:
            raise TinyMoeError(f"{meta_path}: bad estimator entry {entry!r} ({e})") from None
        prefix = f"{kind}.d{d}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            est.load_state_dict(state)
        except RuntimeError as e:
            raise TinyMoeError(f"{tensors_path}: {kind} for lookahead {d}: {e}") from None
        shape = (est.cfg.num_layers, est.cfg.num_experts, est.cfg.hidden_size)
        if expected is not None and shape != expected:
            raise TinyMoeError(f"{tensors_path}: {kind} for lookahead {d} is for another model")
        estimators[(kind, d)] = est.eval()
    return Calibration(dv, tensors["expert_counts"], estimators, hybrid, meta)
