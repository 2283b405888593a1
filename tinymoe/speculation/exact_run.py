"""An exact run, recorded: every layer's state, and the default vectors computed from it.

The router decides every layer (the one route recorder, recording.py); for each layer the
record keeps r_l, the routing and the router's logits, and sums each routed expert's own output
over the tokens routed to it. The default vectors are those sums' means:

    v[l, e] = mean over the tokens routed to expert e at layer l of Expert_{l,e}(u)     (L, E, D)

an expert never routed keeps the zero vector. `tinymoe calibrate` records a run over
calibration text and saves the vectors (calibration.py); the quasi-hidden state uses them
(predictors.quasi_hidden); the exercises record held-out text the same way.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from tinymoe.engine.experts import expert_forward
from tinymoe.engine.model import MoETransformer
from tinymoe.engine.moe import Routing
from tinymoe.progress import Progress
from tinymoe.speculation.recording import RouteRecorder


@dataclass
class ExactRunRecord:
    """Every layer's state over N = B*T tokens of an exact run, on the host, in fp32."""

    resid: list[Tensor]  # per layer: r_l (N, D)
    ids: list[Tensor]  # per layer: the router's experts (N, K)
    weights: list[Tensor]  # per layer: their weights (N, K)
    logits: list[Tensor]  # per layer: the router's logits (N, E)
    expert_sum: Tensor  # (L, E, D) sum of expert e's output over the tokens routed to it
    expert_count: Tensor  # (L, E) how many tokens were routed to expert e

    def routing(self, layer: int, device: torch.device | str = "cpu") -> Routing:
        """Layer `layer`'s routing over the N tokens, with the router's logits, on `device`."""
        ids, weights, logits = self.ids[layer], self.weights[layer], self.logits[layer]
        return Routing(ids.to(device), weights.to(device), logits.to(device))


class _ExactRunLog:
    """What a RouteRecorder hands over, layer by layer, gathered into an ExactRunRecord.

    States go to the host as they come (a long run would not fit on the device); the expert
    output sums stay on the device in fp64 until the end.
    """

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

    def keep(self, layer: int, resid: Tensor, u: Tensor, routing: Routing) -> None:
        self.resid[layer].append(resid.float().cpu())
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

    def record(self) -> ExactRunRecord:
        return ExactRunRecord(
            resid=[torch.cat(x) for x in self.resid],
            ids=[torch.cat(x) for x in self.ids],
            weights=[torch.cat(x) for x in self.weights],
            logits=[torch.cat(x) for x in self.logits],
            expert_sum=self.expert_sum.cpu(),
            expert_count=self.expert_count,
        )


@torch.no_grad()
def record_exact_run(model: MoETransformer, ids: Tensor, batch: int = 8) -> ExactRunRecord:
    """Run `ids` (B, T) through the model in exact mode, `batch` sequences at a time."""
    log = _ExactRunLog(model)
    device = model.embed_tokens.weight.device
    bar = Progress(ids.shape[0], desc="exact run")
    try:
        with RouteRecorder(log.keep).installed(model):
            for i in range(0, ids.shape[0], batch):
                model(ids[i : i + batch].to(device))
                bar.update(min(batch, ids.shape[0] - i))
    finally:
        bar.close()
    return log.record()


def default_vectors(run: ExactRunRecord) -> Tensor:
    """v[l, e] = mean output of expert e at layer l over its routed tokens; zero if never routed."""
    count = run.expert_count.clamp(min=1).unsqueeze(-1)  # (L, E, 1)
    return (run.expert_sum / count).float()  # (L, E, D)
