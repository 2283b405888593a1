"""The routing trace: what a real run routed and how long its parts took, in a versioned file.

A trace is what the simulator (replay.py) replays. It holds, for every forward pass (the prefill,
then one per decode step) and every layer:

    experts     the true routing: top-k expert ids per token (the router's, in an exact run)
    guesses     per predictor name, its guess for layer l + lookahead made at layer l from the
                exact state (ids per token); the oracle's guess is the truth and is not stored
    attention_s attention + norms of the layer, seconds (the meter's "attention" span)
    router_s    the router (the meter's "router" span)
    expert_s    one expert's compute on the device: the layer's experts span, stalls excluded,
                divided by the experts it ran
    guess_s     per predictor, what one guess cost (its observe() call, timed)

and per pass `head_s` (final norm + LM head). The file is JSON:

    {"format": "tinymoe-routing-trace", "version": 1, "model": {...}, "machine": {...},
     "lookahead": 1, "predictors": [...], "passes": [{"phase": ..., "head_s": ...,
     "layers": [{"experts": [[...]], "guesses": {"router": [[...]]}, "attention_s": ...,
                 "router_s": ..., "expert_s": ..., "guess_s": {"router": ...}}]}]}

`record_trace` makes one from two runs of the same prompt, which route identically because
offloading is exact: a timed run, then a resident pass that keeps the routing and every
predictor's guess (record_run, docs/simulator.md). On CUDA the timed run copies over the real
link, and the trace's machine["link"] is that link as measured here (measure_h2d_link).
"""

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tinymoe.engine.generate import GenerationResult, generate
from tinymoe.engine.model import MoETransformer
from tinymoe.errors import TinyMoeError
from tinymoe.offload.link import DEFAULT_LINK, PRESETS, LinkSpec
from tinymoe.offload.quant import QuantFormat
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.offload.transfer import measure_h2d_link
from tinymoe.speculation.calibration import load_speculation
from tinymoe.speculation.predictors import Predictor, make_predictor
from tinymoe.speculation.scoring import ScoringHook

FORMAT, VERSION = "tinymoe-routing-trace", 1


@dataclass
class LayerRecord:
    experts: list[list[int]]  # (N, K) the true routing's ids
    guesses: dict[str, list[list[int]]] = field(default_factory=dict)  # for layer + lookahead
    attention_s: float = 0.0
    router_s: float = 0.0
    expert_s: float = 0.0
    guess_s: dict[str, float] = field(default_factory=dict)


@dataclass
class PassRecord:
    phase: str  # "prefill" | "decode"
    layers: list[LayerRecord]
    head_s: float = 0.0


@dataclass
class RoutingTrace:
    model: dict  # model_type, num_layers, num_experts, top_k, hidden_size, expert_dim, ...
    machine: dict  # where the times were measured: device, threads, policy, link
    lookahead: int
    predictors: list[str]
    passes: list[PassRecord]

    @property
    def decode_steps(self) -> int:
        return sum(p.phase == "decode" for p in self.passes)

    def save(self, path: str | Path) -> None:
        doc = {"format": FORMAT, "version": VERSION, **asdict(self)}
        Path(path).write_text(json.dumps(doc))

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TinyMoeError(f"{path}: cannot read a routing trace ({e})") from None
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise TinyMoeError(
                f"{path}: not a {FORMAT} version {VERSION} file (format {doc.get('format')!r}, "
                f"version {doc.get('version')!r}); record it again with --record"
            )
        passes = [
            PassRecord(p["phase"], [LayerRecord(**lr) for lr in p["layers"]], p["head_s"])
            for p in doc["passes"]
        ]
        return cls(doc["model"], doc["machine"], doc["lookahead"], doc["predictors"], passes)


def model_info(model: MoETransformer) -> dict:
    """The recorded model's shape, and its experts' bytes as a copy moves them: in the model's
    dtype, or, quantized (load_model(expert_quant=...)), their codes and scales."""
    cfg, fmt = model.cfg, recorded_quant(model)
    dtype = model.embed_tokens.weight.dtype
    return {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_layers,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "hidden_size": cfg.hidden_size,
        "expert_dim": cfg.expert_dim,
        "dtype": str(dtype).removeprefix("torch."),
        "expert_bytes": fmt.expert_bytes(cfg.expert_numel) if fmt else cfg.expert_bytes(dtype),
        "expert_quant": fmt.tag if fmt else "none",  # as costs.EXPERT_DTYPES names it
    }


def recorded_quant(model: MoETransformer) -> QuantFormat | None:
    """The format of the experts a recording of `model` copies: the one it was loaded with."""
    q = model.experts.quantized
    return None if q is None else q.fmt


def times_from_spans(events: list[dict], num_layers: int) -> list[dict]:
    """Per forward pass, the layer times of a meter trace (trace.PerfettoTrace events, in the
    order the meter folded them: per layer attention, router, stalls, experts; then the head)."""
    passes, layers, stall = [], [], 0.0
    for ev in events:
        name, dur = ev["name"], ev["dur"] / 1e6
        if name == "stall":
            stall += dur
        elif name.endswith(" attention"):
            layers.append({"attention_s": dur})
        elif name.endswith(" router"):
            layers[-1]["router_s"] = dur
        elif name.endswith(" experts"):
            n = max(ev["args"].get("experts", 1), 1)
            layers[-1]["expert_s"] = max(dur - stall, 0.0) / n
            stall = 0.0
        elif name == "norm + lm_head":
            if len(layers) != num_layers:
                raise RuntimeError(f"trace: a pass with {len(layers)} of {num_layers} layers")
            passes.append({"layers": layers, "head_s": dur})
            layers = []
    return passes


def record_trace(
    model: MoETransformer,
    ids: list[int],
    max_new_tokens: int,
    timed: tuple[GenerationResult, list[dict]],
    predictors: dict[str, Predictor],
    lookahead: int,
    machine: dict,
) -> RoutingTrace:
    """The trace of generating `max_new_tokens` greedily after `ids`. `timed` is the timed run
    (its result and its meter's trace events); the routing and the predictors' guesses come
    from a resident pass here, which must generate the same tokens (offloading is exact)."""
    L = model.cfg.num_layers
    times = times_from_spans(timed[1], L)
    hook = ScoringHook(model, {(n, lookahead): p for n, p in predictors.items()}, set(), log=True)
    hook.reset()
    w = model.experts.weights[0]  # on the host, or only quantized: copied when asked
    host = w.device != model.embed_tokens.weight.device or w.numel() == 0
    model.provider = DeviceCopies(model) if host else None
    try:
        with model.routed_by(hook), torch.inference_mode():
            out = generate(model, ids, max_new_tokens, eos_ids=())
    finally:
        model.provider = None  # the resident experts again
    seen = hook.log
    if out.tokens != timed[0].tokens or len(seen) != len(times):
        raise TinyMoeError(
            "record: the timed run and the resident pass generated different tokens; record "
            "with an exact policy (not speculative) and greedy decoding"
        )
    passes = []
    for f, (forward, t) in enumerate(zip(seen, times, strict=True)):
        layers = [
            LayerRecord(
                experts=experts,
                guesses={n: rows for n, (rows, _) in guesses.items()},
                guess_s={n: s for n, (_, s) in guesses.items()},
                **tl,
            )
            for (experts, guesses), tl in zip(forward, t["layers"], strict=True)
        ]
        passes.append(PassRecord("prefill" if f == 0 else "decode", layers, t["head_s"]))
    return RoutingTrace(model_info(model), machine, lookahead, list(predictors), passes)


class DeviceCopies:
    """The resident pass's expert provider where the experts live in host memory (offloading on
    CUDA loads them there: run.py): each expert is copied to the compute device when asked, so
    it computes where the timed run computed it. (Left on the host, the engine would compute
    every expert there, as host experts: slow, and not the timed run's arithmetic.) Experts
    loaded only quantized (run.py --expert-quant, offloading) are dequantized into a new
    tensor on the device, as the timed run's copies dequantize them into its slots."""

    def __init__(self, model: MoETransformer) -> None:
        self.weights, self.quantized = model.experts.weights, model.experts.quantized
        self.device, self.dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
        self.numel = model.cfg.expert_numel

    def experts(self, layer: int, ids: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
        for e in ids:  # SYNC (CUDA): a blocking copy; this pass is not timed
            if self.weights[layer].numel():
                yield e, self.weights[layer][e].to(self.device)
                continue
            w = torch.empty(self.numel, dtype=self.dtype, device=self.device)  # (3*I*D,)
            self.quantized.expert(layer, e).copy_into(w)
            yield e, w


def recording_link(
    device: torch.device, link: LinkSpec | None, expert_bytes: int
) -> tuple[LinkSpec | None, LinkSpec]:
    """(the timed run's runtime link, the link the trace records). On a CPU both are the
    simulated `link` (default: the default preset). On CUDA the runtime gets None, its real
    copy engine (it refuses a simulated link there), and the trace the real link, measured."""
    if device.type == "cuda":
        if link is not None:
            raise TinyMoeError(
                "a simulated link on CUDA: the recording there copies over the real link"
            )
        gbps, latency_us = measure_h2d_link(device, expert_bytes)
        return None, LinkSpec(gbps, latency_us, "measured: pinned host-to-device")
    link = link or PRESETS[DEFAULT_LINK]
    return link, link


def record_run(
    model: MoETransformer,
    ids: list[int],
    new_tokens: int,
    link: LinkSpec | None,
    predictor_names: list[str],
    model_dir: str,
    lookahead: int,
) -> RoutingTrace:
    """Time an on-demand run (its compute includes what running offloaded costs here), then
    record the routing and every predictor's guess (simulator/record.py). link: the simulated
    link on a CPU; None on CUDA, where the real one is used and measured (recording_link)."""
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    run_link, recorded = recording_link(device, link, model.cfg.expert_bytes(dtype))
    fmt = recorded_quant(model)  # quantized experts: the timed run copies their codes
    quant = dict(expert_quant=fmt.name, group_size=fmt.group_size) if fmt else {}
    with OffloadRuntime(model, "on-demand", link=run_link, trace=True, **quant) as rt:
        out = generate(model, ids, new_tokens, eos_ids=())
        rt.report()
        events = rt.meter.trace.events
    calibration = None
    if any(n not in ("oracle", "previous-token", "router-nodefault") for n in predictor_names):
        calibration = load_speculation(model_dir, model.cfg)
    predictors = {
        n: make_predictor(n, model, calibration, lookahead)
        for n in predictor_names
        if n != "oracle"
    }
    machine = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "timed_policy": "on-demand",
        "link": {"gbps": recorded.gbps, "latency_us": recorded.latency_us},
        "link_source": recorded.name,  # the simulated link's, or "measured: ..." on CUDA
    }
    return record_trace(model, ids, new_tokens, (out, events), predictors, lookahead, machine)
