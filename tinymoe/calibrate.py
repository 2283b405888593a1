"""Calibration for speculation: `python -m tinymoe.calibrate --model DIR --text FILE`.

What the predictors in predict.py need from data, measured once per checkpoint. The calibration
sequences are split: most for measuring and training, the rest (--val-fraction) held back.
    1. an exact run over calibration text records every layer's r_l, routing and router logits,
       and sums each expert's output over the tokens routed to it;
    2. default vectors v[l, e] = that sum / that count (the mean output of expert e at layer l;
       an expert never routed keeps the zero vector);
    3. the estimators (estimator.py) are trained on pairs (q_{t-d}, true logits of layer t),
       for each lookahead d;
    4. on the held-back sequences, every predictor's recall per layer is measured, and the hybrid
       predictor's estimator layers are chosen: layers where the router's recall is below a
       threshold and the estimator's is higher.
Everything is saved as speculation.safetensors (tensors) + speculation.json (metadata) beside
the checkpoint, or in --out; `load_speculation` reads them back for the runtime.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tinymoe.cli import OneLineParser, run_cli
from tinymoe.engine.config import ModelConfig
from tinymoe.engine.experts import expert_forward
from tinymoe.engine.loader import DTYPES, load_model
from tinymoe.engine.model import MoETransformer, Routing
from tinymoe.engine.tokenizer import load_tokenizer
from tinymoe.errors import TinyMoeError
from tinymoe.progress import Progress
from tinymoe.speculation.estimator import (
    EstimatorConfig,
    LinearEstimator,
    Pairs,
    build_estimator,
    mean_kl,
    train_estimator,
)
from tinymoe.speculation.predictors import RouterPredictor, quasi_hidden, recall_at_k

TENSORS_FILE, META_FILE = "speculation.safetensors", "speculation.json"
FORMAT_VERSION = 1
CHARS_PER_TOKEN = 200  # how much text read_token_ids reads: ~50x more tokens than it keeps

# ---------------------------------------------------------------- calibration text


def read_token_ids(
    model_dir: str | Path, text_path: str | Path, tokens: int, seq_len: int
) -> Tensor:
    """`tokens` tokens of a UTF-8 file as (B, seq_len) windows, B = tokens // seq_len.

    The windows are spread evenly over the text (at most its first CHARS_PER_TOKEN * tokens
    characters), so they sample many documents rather than the first few.
    """
    if seq_len < 2:
        raise TinyMoeError(f"--seq-len must be >= 2, got {seq_len}")
    if tokens < seq_len:
        raise TinyMoeError(f"--tokens ({tokens}) must be at least --seq-len ({seq_len})")
    tok = load_tokenizer(model_dir)
    path = Path(text_path)
    if not path.is_file():
        raise TinyMoeError(f"--text {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(CHARS_PER_TOKEN * tokens)
    except UnicodeDecodeError as e:
        raise TinyMoeError(f"--text {path}: not UTF-8 text ({e})") from None
    ids = torch.tensor(tok.encode(text).ids)  # (n,)
    B = min(len(ids), tokens) // seq_len
    if B == 0:
        raise TinyMoeError(
            f"--text {path}: encodes to {len(ids)} tokens, fewer than one --seq-len ({seq_len})"
        )
    starts = torch.linspace(0, len(ids) - seq_len, B).long().tolist()  # never overlapping
    return torch.stack([ids[s : s + seq_len] for s in starts])  # (B, T)


# ---------------------------------------------------------------- the exact run, recorded


@dataclass
class Trace:
    """Every layer's state over N = B*T tokens of an exact run, on the host, in fp32."""

    resid: list[Tensor]  # per layer: r_l (N, D)
    ids: list[Tensor]  # per layer: the router's experts (N, K)
    weights: list[Tensor]  # per layer: their weights (N, K)
    logits: list[Tensor]  # per layer: the router's logits (N, E)
    expert_sum: Tensor  # (L, E, D) sum of expert e's output over the tokens routed to it
    expert_count: Tensor  # (L, E) how many tokens were routed to expert e


class _Recorder:
    """A route hook that lets the router decide and writes down what each layer saw."""

    def __init__(self, model: MoETransformer) -> None:
        cfg = model.cfg
        L, E, D = cfg.num_layers, cfg.num_experts, cfg.hidden_size
        self.model = model
        self.resid: list[list[Tensor]] = [[] for _ in range(L)]
        self.ids: list[list[Tensor]] = [[] for _ in range(L)]
        self.weights: list[list[Tensor]] = [[] for _ in range(L)]
        self.logits: list[list[Tensor]] = [[] for _ in range(L)]
        device = model.embed_tokens.weight.device
        self.expert_sum = torch.zeros(L, E, D, dtype=torch.float64, device=device)
        self.expert_count = torch.zeros(L, E, dtype=torch.long)

    @torch.no_grad()
    def __call__(self, layer: int, resid: Tensor, u: Tensor, router) -> Routing:
        routing = router(u)
        self.resid[layer].append(resid.reshape(u.shape).float().cpu())
        self.ids[layer].append(routing.ids.cpu())
        self.weights[layer].append(routing.weights.float().cpu())
        self.logits[layer].append(routing.logits.float().cpu())
        # Each routed expert's own output (unweighted): the numerator of its default vector.
        # SYNC: the host needs the used expert ids to ask the provider for them.
        used = torch.unique(routing.ids).tolist()
        for e, w in self.model.provider.experts(layer, used):
            rows = (routing.ids == e).any(dim=-1)  # (N,) tokens routed to e
            y = expert_forward(w, u[rows], self.model.cfg.expert_dim)  # (n_e, D)
            self.expert_sum[layer, e] += y.double().sum(dim=0)
            self.expert_count[layer, e] += y.shape[0]
        return routing

    def trace(self) -> Trace:
        return Trace(
            resid=[torch.cat(x) for x in self.resid],
            ids=[torch.cat(x) for x in self.ids],
            weights=[torch.cat(x) for x in self.weights],
            logits=[torch.cat(x) for x in self.logits],
            expert_sum=self.expert_sum.cpu(),
            expert_count=self.expert_count,
        )


@torch.no_grad()
def record_trace(model: MoETransformer, ids: Tensor, batch: int = 8) -> Trace:
    """Run `ids` (B, T) through the model in exact mode, `batch` sequences at a time."""
    recorder = _Recorder(model)
    previous_hook, model.route_hook = model.route_hook, recorder
    device = model.embed_tokens.weight.device
    bar = Progress(ids.shape[0], desc="exact run")
    try:
        for i in range(0, ids.shape[0], batch):
            model(ids[i : i + batch].to(device))
            bar.update(min(batch, ids.shape[0] - i))
    finally:
        model.route_hook = previous_hook
        bar.close()
    return recorder.trace()


def default_vectors(trace: Trace) -> Tensor:
    """v[l, e] = mean output of expert e at layer l over its routed tokens; zero if never routed."""
    count = trace.expert_count.clamp(min=1).unsqueeze(-1)  # (L, E, 1)
    return (trace.expert_sum / count).float()  # (L, E, D)


# ---------------------------------------------------------------- what gets saved


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
        entries = meta.pop("estimators")
        hybrid = {int(d): list(v) for d, v in meta.pop("hybrid_layers").items()}
    except (json.JSONDecodeError, KeyError, AttributeError, ValueError) as e:
        raise TinyMoeError(f"{meta_path}: not a valid speculation metadata file ({e})") from None
    try:
        with safe_open(str(tensors_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise TinyMoeError(f"{tensors_path}: not a readable safetensors file ({e})") from None
    for key in ("default_vectors", "expert_counts"):
        if key not in tensors:
            raise TinyMoeError(f"{tensors_path}: missing tensor {key!r}")
    dv = tensors["default_vectors"]
    if cfg is not None:
        expected = (cfg.num_layers, cfg.num_experts, cfg.hidden_size)
        if tuple(dv.shape) != expected:
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
        if cfg is not None and shape != (cfg.num_layers, cfg.num_experts, cfg.hidden_size):
            raise TinyMoeError(f"{tensors_path}: {kind} for lookahead {d} is for another model")
        estimators[(kind, d)] = est.eval()
    return Calibration(dv, tensors["expert_counts"], estimators, hybrid, meta)


# ---------------------------------------------------------------- training and choosing


@dataclass(frozen=True)
class CalibrationSettings:
    lookaheads: tuple[int, ...] = (1, 2, 3)  # one pair of estimators per lookahead
    steps: int = 1500  # estimator training steps
    batch_size: int = 256  # pairs per predicted layer per step
    lr: float = 2e-3
    reduction: int = 2  # the estimator's m: it works at width D/m
    ffn_mult: int = 4
    val_fraction: float = 0.1  # share of the sequences held back for hit rates and hybrid
    hybrid_threshold: float = 0.75  # hybrid considers the estimator where router recall is below
    forward_batch: int = 8  # sequences per forward pass of the exact run
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise TinyMoeError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.lookaheads:
            raise TinyMoeError("--lookahead: give at least one lookahead")


@torch.no_grad()
def quasi_pairs(model: MoETransformer, dv: Tensor, trace: Trace, lookahead: int) -> Pairs:
    """For each target layer t >= d: (q_{t-d}, the true router logits of layer t), every token."""
    device = model.embed_tokens.weight.device
    dv = dv.to(device, model.embed_tokens.weight.dtype)
    pairs: Pairs = {}
    for t in range(lookahead, model.cfg.num_layers):
        l = t - lookahead
        routing = Routing(trace.ids[l].to(device), trace.weights[l].to(device))
        resid = trace.resid[l].to(device, dv.dtype)
        q = quasi_hidden(model, dv, l, t, resid, routing).float()  # (N, D)
        pairs[t] = (q, trace.logits[t].to(device))
    return pairs


@torch.no_grad()
def estimator_recall(estimator: nn.Module, pairs: Pairs, top_k: int) -> dict[int, float]:
    """Recall@K of the estimator's top-K against the true router's top-K, per target layer."""
    return {
        t: recall_at_k(estimator(q, t).topk(top_k).indices, true.topk(top_k).indices).mean().item()
        for t, (q, true) in pairs.items()
    }


@torch.no_grad()
def router_recall(
    model: MoETransformer, dv: Tensor | None, trace: Trace, lookahead: int
) -> dict[int, float]:
    """Recall@K of Router-PF (with the given default vectors) per target layer."""
    device = model.embed_tokens.weight.device
    predictor = RouterPredictor(model, dv, lookahead)
    out = {}
    for t in range(lookahead, model.cfg.num_layers):
        l = t - lookahead
        routing = Routing(trace.ids[l].to(device), trace.weights[l].to(device))
        resid = trace.resid[l].to(device, model.embed_tokens.weight.dtype)
        pred = predictor.observe(l, resid, resid, routing)  # (u is not read by Router-PF)
        out[t] = recall_at_k(pred.ids.cpu(), trace.ids[t]).mean().item()
    return out


def calibrate(model: MoETransformer, ids: Tensor, s: CalibrationSettings) -> Calibration:
    """The whole procedure of the module docstring on token rows `ids` (B, T)."""
    cfg = model.cfg
    L, T = cfg.num_layers, ids.shape[1]
    n_val = max(1, round(ids.shape[0] * s.val_fraction))
    if n_val >= ids.shape[0]:
        raise TinyMoeError(
            f"calibration needs at least 2 sequences of --seq-len {T} tokens (one is held back "
            f"for hit rates); got {ids.shape[0]}: give more --tokens or a longer --text"
        )
    for d in s.lookaheads:
        if not 1 <= d < L:
            raise TinyMoeError(f"--lookahead {d}: must be between 1 and {L - 1} for {L} layers")
    trace = record_trace(model, ids[:-n_val], s.forward_batch)  # default vectors, training
    held = record_trace(model, ids[-n_val:], s.forward_batch)  # hit rates, hybrid choice
    dv = default_vectors(trace)
    never = int((trace.expert_count == 0).sum())
    if never:
        print(
            f"calibrate: {never} of {L * cfg.num_experts} experts were never routed; "
            "their default vectors are zero",
            file=sys.stderr,
        )

    def per_layer(values: dict[int, float], d: int) -> list[float | None]:
        return [None] * d + [values[t] for t in range(d, L)]

    estimators: dict[tuple[str, int], nn.Module] = {}
    hybrid: dict[int, list[int]] = {}
    hit_rates: dict[str, dict[str, list[float | None]]] = {}
    kl: dict[str, dict[str, float]] = {}
    for d in s.lookaheads:
        train, val = quasi_pairs(model, dv, trace, d), quasi_pairs(model, dv, held, d)
        rates = {
            "router": router_recall(model, dv, held, d),
            "router-nodefault": router_recall(model, None, held, d),
        }
        for kind in ("linear", "estimator"):
            ecfg = EstimatorConfig(
                kind, cfg.hidden_size, cfg.num_experts, L, s.reduction, s.ffn_mult
            )
            torch.manual_seed(s.seed)
            est = build_estimator(ecfg).to(train[d][0].device)
            if isinstance(est, LinearEstimator):
                est.init_from_routers([layer.mlp.gate.weight.float() for layer in model.layers])
            before = mean_kl(est, val)
            train_estimator(est, train, s.steps, s.batch_size, s.lr, s.seed, f"{kind} d={d}")
            after = mean_kl(est, val)
            name = "linear-estimator" if kind == "linear" else kind
            rates[name] = estimator_recall(est, val, cfg.top_k)
            estimators[(kind, d)] = est.cpu()
            kl[f"{name}@{d}"] = {
                "val_kl_before": sum(before.values()) / len(before),
                "val_kl_after": sum(after.values()) / len(after),
            }
        by_router, by_est = rates["router"], rates["estimator"]
        hybrid[d] = [
            t for t in by_router if by_router[t] < s.hybrid_threshold and by_est[t] > by_router[t]
        ]
        hit_rates[str(d)] = {name: per_layer(r, d) for name, r in rates.items()}

    meta = {
        "model": {
            "layers": L,
            "experts": cfg.num_experts,
            "hidden": cfg.hidden_size,
            "top_k": cfg.top_k,
        },
        "tokens": int(ids.numel()),  # default vectors and training use all but val_sequences
        "sequences": int(ids.shape[0]),
        "seq_len": T,
        "val_sequences": n_val,
        "never_routed_experts": never,
        "settings": asdict(s),
        "hybrid_rule": (
            f"estimator on target layers whose router recall@k on the held-back sequences is "
            f"below {s.hybrid_threshold} and lower than the estimator's"
        ),
        "val_recall_at_k": hit_rates,
        "val_kl": kl,
    }
    return Calibration(dv, trace.expert_count, estimators, hybrid, meta)


# ---------------------------------------------------------------- command line


def summary(cal: Calibration) -> str:
    """A per-layer table of held-back recall@k for each lookahead and predictor."""
    lines = []
    for d, rates in cal.meta["val_recall_at_k"].items():
        names = list(rates)
        L = len(rates[names[0]])
        lines.append(f"lookahead {d}: recall@k on held-back calibration sequences")
        lines.append("layer  " + "".join(f"{n:>18}" for n in names) + "   hybrid uses")
        for t in range(int(d), L):
            row = "".join(f"{rates[n][t]:>18.3f}" for n in names)
            use = "estimator" if t in cal.hybrid_layers[int(d)] else "router"
            lines.append(f"{t:>5}  {row}   {use}")
    return "\n".join(lines)


def lookahead_list(s: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lookaheads must be >= 1, got {s!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    a("--text", required=True, help="UTF-8 calibration text, e.g. the model's training split")
    a(
        "--out",
        default=None,
        help="where to write speculation.{safetensors,json} (default: --model)",
    )
    a("--tokens", type=int, default=65536, help="calibration tokens read from --text")
    a("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    a("--lookahead", type=lookahead_list, default=None, help="e.g. 1 or 1,2 (default: 1,2,3)")
    a("--estimator-steps", type=int, default=1500)
    a("--estimator-batch", type=int, default=256, help="pairs per predicted layer per step")
    a("--estimator-lr", type=float, default=2e-3)
    a("--reduction", type=int, default=2, help="estimator width D/m: this is m")
    a("--val-fraction", type=float, default=0.1, help="share of sequences held back")
    a(
        "--hybrid-threshold",
        type=float,
        default=0.75,
        help="router recall below which hybrid may switch",
    )
    a("--batch-size", type=int, default=8, help="sequences per forward pass")
    a("--seed", type=int, default=0)
    a("--device", choices=["cpu", "cuda"], default="cpu")
    a("--dtype", choices=list(DTYPES), default="float32")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m tinymoe.calibrate " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TinyMoeError("--device cuda: no CUDA device is available; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ids = read_token_ids(args.model, args.text, args.tokens, args.seq_len)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    L = model.cfg.num_layers
    settings = CalibrationSettings(
        lookaheads=args.lookahead or tuple(d for d in (1, 2, 3) if d < L),
        steps=args.estimator_steps,
        batch_size=args.estimator_batch,
        lr=args.estimator_lr,
        reduction=args.reduction,
        val_fraction=args.val_fraction,
        hybrid_threshold=args.hybrid_threshold,
        forward_batch=args.batch_size,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    cal = calibrate(model, ids, settings)
    cal.meta.update(command=command, text=str(args.text))
    out = Path(args.out or args.model)
    save_speculation(cal, out)
    print(summary(cal))
    print(f"wrote {out / TENSORS_FILE} and {out / META_FILE}", file=sys.stderr)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main(), with a user mistake turned into one `error: ...` line on stderr and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
