"""The offloading runtime: plugs the scheduler and the meter into a model, without changing it.

    model.route_hook = runtime.layers.route   routing, via a PredictionHook (speculation/hook.py)
    model.provider   = runtime.layers         the MoE layer asks layers.experts(layer, ids)

`LayerDriver` is what happens at each of those calls and at each forward pass's start and end;
the simulator (simulator/replay.py) drives the very same object through a recorded run, so a
replay decides exactly as a real run would.

This file wires the pieces together (store.py, cache.py, transfer.py or link.py, scheduler.py,
meter.py), tells prefill from decode, and reports. docs/offloading.md describes each piece, and
lists every host-device sync: on CUDA, per decode step, one per layer (the routed ids and the
prediction, read together) and one per token (the sampled id).
"""

from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from torch import Tensor

from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing
from tinymoe.errors import TinyMoeError
from tinymoe.offload.cache import ExpertCache
from tinymoe.offload.link import DEFAULT_LINK, PRESETS, LinkSpec, SimulatedLink
from tinymoe.offload.meter import Meter, PhaseStats, clock_for
from tinymoe.offload.policy import Policy, parse_policy, resolve_slots
from tinymoe.offload.quant import DEFAULT_GROUP_SIZE, quant_format
from tinymoe.offload.scheduler import MISS_HANDLERS, Prefetch, Scheduler, exact_depth
from tinymoe.offload.store import HostExpertStore
from tinymoe.offload.transfer import CudaCopyEngine
from tinymoe.speculation.hook import PredictionHook
from tinymoe.speculation.predictors import Predictor


class OffloadRuntime:
    """Installs itself on `model` as expert provider and route hook; `close()` undoes it.

        with OffloadRuntime(model, "prefetch+router+lru", predictor=p) as rt:
            out = generate(model, ids, 32)       # unchanged: the runtime is just the provider
            print(rt.report()["decode"]["hit_rate"])

    predictor: drives prefetching (see speculation/); the policy must name one iff one is given.
    link: the simulated link's speed (CPU only); on CUDA the real copy engine is used.
    prefetch_depth: exact prefetch copies at most this many guessed experts per layer (see
    scheduler.py; tinymoe.bench derives the right value from its calibration; 1 is safe).
    trace: keep a Perfetto trace (write_trace).
    miss_handler: "copy" (copy a missing expert to a slot) or "cpu" (compute it on the host from
    the host store, no copy; see scheduler.py).
    expert_quant, group_size: "none" | "int8" | "int4" (quant.py): the host store holds the
    experts quantized, a copy moves their codes and scales and the device dequantizes them into
    the slot (slots stay in the model's dtype). The store adopts the model's quantized experts
    (loaded with the same format), or quantizes its resident ones (store.py). A resident policy
    with a format needs the model's experts in that format (loaded so, or quantized_resident):
    its experts are then the ones the offloaded runs copy, so their tokens are the same.
    """

    def __init__(
        self,
        model: MoETransformer,
        policy: Policy | str = "on-demand",
        *,
        predictor: Predictor | None = None,
        slots: int | None = None,
        budget_gb: float | None = None,
        link: LinkSpec | None = None,
        trace: bool = False,
        prefetch_depth: int | None = 1,
        miss_handler: str = "copy",
        expert_quant: str = "none",
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        self.policy = parse_policy(policy) if isinstance(policy, str) else policy
        self.quant = quant_format(expert_quant, group_size, model.cfg.expert_numel)
        quantized = model.experts.quantized
        if self.quant is not None:
            if not self.policy.offload and (quantized is None or quantized.fmt != self.quant):
                raise TinyMoeError(
                    f"resident experts in {self.quant}: load the model with that --expert-quant "
                    "(load_model(expert_quant=...)) or inside quantized_resident(model, format)"
                )
        elif self.policy.offload and model.experts.weights[0].numel() == 0 and quantized:
            raise TinyMoeError(
                f"the model's experts were loaded as {quantized.fmt} only: pass that "
                "--expert-quant (expert_quant=...) to offload them"
            )
        if (self.policy.predictor is None) != (predictor is None):
            raise TinyMoeError(
                f"offload policy {self.policy.name!r} "
                + ("needs a predictor" if predictor is None else "takes no predictor")
            )
        if miss_handler not in MISS_HANDLERS:
            raise TinyMoeError(
                f"--miss-handler {miss_handler!r} is unknown; expected one of {MISS_HANDLERS}"
            )
        if prefetch_depth is not None and prefetch_depth < 1:
            raise TinyMoeError(f"prefetch depth must be >= 1 (or None), got {prefetch_depth}")
        cfg = self.cfg = model.cfg
        self.model = model
        self.device = model.embed_tokens.weight.device
        if link is not None and self.device.type == "cuda":
            raise TinyMoeError(
                "--link-gbps/--link-latency-us/--link-preset simulate a link on "
                "the CPU; on CUDA the real host-to-device link is used"
            )
        self.hook = PredictionHook(predictor, self.policy.speculate, read_ids=self.policy.offload)
        self.lookahead = predictor.lookahead if predictor is not None else 0
        self.meter = Meter(cfg.num_layers, clock_for(self.device), trace)
        self.link = link or PRESETS[DEFAULT_LINK]
        self.num_slots = 0
        if self.policy.offload:
            dtype = model.embed_tokens.weight.dtype
            self.num_slots = resolve_slots(
                self.policy, cfg, cfg.expert_bytes(dtype), max(self.lookahead, 1), slots, budget_gb
            )
            # The slots first: if the device is out of memory, nothing has been moved yet.
            self.cache = ExpertCache(
                self.num_slots, cfg.expert_numel, self.device, dtype, self.policy.eviction
            )
            if self.device.type == "cuda":
                self.engine = CudaCopyEngine(self.device, self.num_slots)
            else:
                self.engine = SimulatedLink(self.link)
            try:
                if self.quant is None:
                    self.store = HostExpertStore.take_from(model)
                else:
                    self.store = HostExpertStore.quantize_from(model, self.quant)
            except BaseException:
                self.engine.close()
                raise
            self.scheduler = Scheduler(
                self.cache,
                self.store,
                self.engine,
                self.meter,
                cfg.num_layers,
                pipeline=self.policy.pipeline,
                depth=exact_depth(prefetch_depth, self.policy.speculate, self.hook.crosses_tokens),
                miss_handler=miss_handler,
            )
        elif slots is not None or budget_gb is not None or miss_handler != "copy":
            raise TinyMoeError(
                "--expert-slots/--expert-budget-gb/--miss-handler need an offloading policy"
            )
        self.layers = LayerDriver(
            self.hook,
            self.meter,
            self.scheduler if self.policy.offload else None,
            lambda layer: model.experts.weights[layer],  # (E, 3*I*D), resident
        )
        # Install. The forward hooks mark where each forward pass starts and ends; the route
        # hook and the provider see every layer. (A resident run that needs no per-layer figures
        # installs no runtime at all: run.py and bench run the bare model then.)
        self._saved_hook = model.route_hook
        model.provider, model.route_hook = self.layers, self.layers.route
        self._handles = [
            model.register_forward_pre_hook(self._forward_start, with_kwargs=True),
            model.register_forward_hook(lambda *_: self.layers.forward_end()),
        ]
        self._closed = False

    # ---- lifecycle

    def close(self) -> None:
        """Stop the copy engine, give the experts back to the model, uninstall the hooks."""
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self.model.provider, self.model.route_hook = None, self._saved_hook  # resident again
        if self.policy.offload:
            self.engine.close()
            self.store.give_back(self.model)
            del self.cache  # frees the slots

    def __enter__(self) -> "OffloadRuntime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> dict:
        """The meter's totals per phase: stats["decode"].layers[l].hits and so on."""
        return self.meter.stats

    def reset_stats(self) -> None:
        self.meter.reset()
        self.hook.guessed, self.hook.fell_back = 0, 0  # fail-safe speculation's counts too

    def report(self) -> dict:
        """Per-phase summaries (see meter.PhaseStats.summary), once every copy has landed."""
        self.meter.fold(block=True)  # SYNC (CUDA): reporting only
        simulated = self.device.type != "cuda" and self.policy.offload
        return {
            "policy": self.policy.name,
            "expert_slots": self.num_slots,
            "expert_quant": "none" if self.quant is None else self.quant.name,
            "link": asdict(self.link) if simulated else None,  # gbps, latency_us, name
            # fail-safe speculation: the share of guessed (token, layer)s routed exactly instead
            "fallback_share": self.hook.fallback_share(),
            **{phase: s.summary() for phase, s in self.stats.items()},  # prefill, decode, compile
        }

    def write_trace(self, path: str | Path) -> None:
        """Write the Chrome/Perfetto trace of everything since the last reset_stats()."""
        if self.meter.trace is None:
            raise TinyMoeError("this runtime was made with trace=False; nothing to write")
        self.meter.fold(block=True)  # every copy landed: the copy track is complete
        self.meter.trace.write(path)

    # ---- the model's hooks

    def _forward_start(self, module, args, kwargs) -> None:
        start = kwargs.get("start", args[2] if len(args) > 2 else 0)
        # (a tensor start is the compiled static-shape decode step: never position 0, and never
        # compared here, which would read it to the host)
        fresh = not isinstance(start, Tensor) and start == 0
        phase = "prefill" if fresh else "decode"
        self.layers.forward_start(phase, fresh, "compile" if self.model.compiling else phase)


def bare_report(num_layers: int) -> dict:
    """What `OffloadRuntime.report()` says of the bare model, run with no runtime installed:
    every expert on the device (every use a hit, nothing copied); no time is split by layer."""
    phase = PhaseStats(num_layers).summary()
    phase.update(hit_rate=1.0, compute_ms=float("nan"))
    return dict(
        policy="resident",
        expert_slots=0,
        link=None,
        fallback_share=None,
        decode=phase,
        prefill=phase,
    )


class LayerDriver:
    """One forward pass, layer by layer, as the runtime runs it and the simulator replays it.

    forward_start / route (the model's route hook) / experts (its provider) / forward_end: a new
    sequence resets the predictors and the scheduler's reservations, the hook decides each
    layer's routing, the scheduler (offloaded) or `resident(layer)`, an (E, 3*I*D) tensor,
    supplies its experts, and the meter times and counts every step.
    """

    def __init__(
        self,
        hook: PredictionHook,
        meter: Meter,
        scheduler: Scheduler | None,
        resident: Callable[[int], Tensor],
    ) -> None:
        self.hook, self.meter, self.scheduler, self.resident = hook, meter, scheduler, resident
        self.num_layers = meter.num_layers
        self.lookahead = hook.predictor.lookahead if hook.predictor is not None else 0

    def forward_start(self, phase: str, fresh: bool, meter_phase: str) -> None:
        """A forward pass starts: "prefill" | "decode"; fresh: a new sequence (position 0)."""
        self.hook.phase = phase
        if fresh:
            self.hook.reset()  # a new sequence: predictors forget the previous one
            if self.scheduler is not None:
                self.scheduler.new_sequence()
        self.hook.next_forward(self.num_layers)
        self.meter.forward_start(meter_phase)

    def forward_end(self) -> None:
        self.meter.forward_end()
        if self.scheduler is not None:
            self.scheduler.end_forward()

    def route(
        self, layer: int, resid: Tensor, u: Tensor, router: Callable[[Tensor], Routing]
    ) -> Routing:
        if not self.meter.tracing:  # the layer's one stamp is at its end (experts)
            return self.hook(layer, resid, u, router)
        self.meter.route_start(layer)
        routing = self.hook(layer, resid, u, router)
        self.meter.route_end(layer)
        return routing

    def experts(self, layer: int, ids: list[int]) -> Iterator[tuple[int, Tensor]]:
        """The ExpertProvider method moe_forward calls: (expert, packed weights) for each id."""
        if self.scheduler is None:
            weights = self.resident(layer)
            st = self.meter.layer(layer)
            for e in ids:
                self.meter.hit(st)
                yield e, weights[e]
        else:
            hook = self.hook
            guess = hook.last_prediction.get(layer)
            predicted = None if guess is None else _experts(guess.ids_on_host())  # read already
            prefetch = None
            target = layer + self.lookahead
            nxt = hook.pending.get(target) if self.lookahead else None
            if nxt is not None and (target < self.num_layers or hook.crosses_tokens):
                # A decode step read these with the layer's own ids (PredictionHook.read_ids),
                # so no second sync; a prefill pass reads them here (a sync, once per layer).
                prefetch = Prefetch(target, list(_experts(nxt.ids_on_host())))
            yield from self.scheduler.run_layer(layer, ids, predicted, prefetch)
        self.meter.experts_end(layer, len(ids))


def _experts(rows: list[list[int]]) -> dict[int, None]:
    """The distinct experts of a routing read to the host, in order (an ordered set)."""
    if len(rows) == 1:  # a decode step: top-k ids are distinct already
        return dict.fromkeys(rows[0])
    return dict.fromkeys(e for row in rows for e in row)
