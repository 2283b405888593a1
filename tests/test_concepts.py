"""The concept map (docs/concepts.md): each concept is one function, and what runs calls it.

For every concept, a test replaces that one function and shows that what the runtime (and,
where it has one, the simulator, a tool or the calibration) does changes. Every module that
uses the concept must hold the very same object (checked first), so a second copy of a formula
cannot hide behind the test. The last test greps the package for a few formulas' fingerprints:
each is written once.
"""

import importlib
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from tinymoe import generate, load_model
from tinymoe.engine.moe import Routing
from tinymoe.offload.link import LinkSpec
from tinymoe.offload.runtime import OffloadRuntime
from tinymoe.simulator.costs import MeasuredCosts
from tinymoe.simulator.record import record_run
from tinymoe.simulator.replay import simulate
from tinymoe.speculation.predictors import RouterPredictor

PACKAGE = Path(__file__).resolve().parents[1] / "tinymoe"
PROMPT = [5, 17, 3, 42, 8, 61, 23, 7, 90, 11, 2, 33]
LINK = LinkSpec(100.0, 0.0)


@contextmanager
def replaced(home: str, name: str, value: object, users: tuple[str, ...] = ()):
    """Replace `home.name` (a function, or "Class.method") by `value`, and the same name in each
    module of `users` that imports it, after checking they all hold the home's object."""
    cls_name, _, attr = name.rpartition(".")
    mod = importlib.import_module(home)
    owner = getattr(mod, cls_name) if cls_name else mod
    original = getattr(owner, attr)
    for user in users:
        held = getattr(importlib.import_module(user), attr)
        assert held is original, f"{user}.{attr} is not {home}.{name}: a second copy"
    targets = [owner] + [importlib.import_module(u) for u in users]
    for t in targets:
        setattr(t, attr, value)
    try:
        yield original
    finally:
        for t in targets:
            setattr(t, attr, original)


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("concepts") / "baby", num_layers=4)


@pytest.fixture(scope="module")
def model(baby):
    return load_model(baby)


@pytest.fixture(scope="module")
def trace(baby):
    return record_run(load_model(baby), PROMPT, 6, LINK, ["oracle", "router-nodefault"], "", 1)


def offloaded(model, policy: str = "lru", predictor=None, **kw) -> tuple[list[int], dict]:
    with OffloadRuntime(model, policy, predictor=predictor, link=LINK, **kw) as rt:
        tokens = generate(model, PROMPT, 6, eos_ids=()).tokens
        return tokens, rt.report()["decode"]


def replayed(trace, policy: str, slots: int | None = None) -> dict:
    return simulate(trace, policy, MeasuredCosts(trace, LINK), slots, 1)


def decisions(d: dict) -> tuple:
    return d["bytes_copied"], d["prefetch_bytes"], d["hits"], tuple(d["miss_kinds"].items())


# ---------------------------------------------------------------- the forward pass


def test_routing(model):
    want = generate(model, PROMPT, 4, eos_ids=()).tokens

    def last_k(logits, top_k, normalise, dtype):  # the K least probable experts
        probs = torch.softmax(logits.float(), -1)
        w, ids = torch.topk(-probs, top_k)
        return Routing(ids, (-w).to(dtype), logits)

    with replaced("tinymoe.engine.moe", "route_topk", last_k):
        assert generate(model, PROMPT, 4, eos_ids=()).tokens != want


def test_packed_expert(model):
    with torch.inference_mode():
        want = model(torch.tensor([PROMPT]))

    def halved(w, x, expert_dim):
        return 0.5 * original(w, x, expert_dim)

    with (
        replaced("tinymoe.engine.moe", "expert_forward", halved) as original,
        torch.inference_mode(),
    ):
        assert not torch.allclose(model(torch.tensor([PROMPT])), want)


def test_provider_seam_moe_layer(model):
    """The decoder calls moe_forward, which asks the provider: an offloading runtime's slots."""
    asked = []

    def spy(u, routing, provider, layer, expert_dim):
        asked.append(type(provider).__name__)
        return original(u, routing, provider, layer, expert_dim)

    with replaced("tinymoe.engine.model", "moe_forward", spy) as original:
        offloaded(model, "lru")
    assert "LayerDriver" in asked


def test_kv_cache(model):
    want = generate(model, PROMPT, 4, eos_ids=()).tokens

    def forgetful(self, layer, start, k, v):  # keeps only the newest positions
        return k, v

    with replaced("tinymoe.engine.kvcache", "KVCache.update", forgetful):
        assert generate(model, PROMPT, 4, eos_ids=()).tokens != want


# ---------------------------------------------------------------- predicting


def test_quasi_hidden_state_is_what_router_pf_runs(model):
    predictor = RouterPredictor(model, None, 1)
    _, want = offloaded(model, "speculative+router+lru", predictor, slots=6)

    def elsewhere(model, default_vectors, layer, target, resid, routing):
        return original(model, default_vectors, layer, target, -resid, routing)

    with replaced("tinymoe.speculation.predictors", "quasi_hidden", elsewhere) as original:
        _, got = offloaded(model, "speculative+router+lru", predictor, slots=6)
    assert decisions(got) != decisions(want)


def test_default_vectors_computed_once_used_by_calibration(model):
    from tinymoe.calibrate import CalibrationSettings, calibrate

    ids = torch.tensor(PROMPT * 4).view(4, 12)
    settings = CalibrationSettings(lookaheads=(1,), steps=1, batch_size=4, val_fraction=0.25)
    with replaced(
        "tinymoe.speculation.exact_run",
        "default_vectors",
        lambda run: torch.full(run.expert_sum.shape, 7.0),
        users=("tinymoe.calibrate",),
    ):
        cal = calibrate(model, ids, settings)
    assert torch.equal(cal.default_vectors, torch.full_like(cal.default_vectors, 7.0))


def test_router_pf_prediction(model):
    predictor = RouterPredictor(model, None, 1)
    _, want = offloaded(model, "speculative+router+lru", predictor, slots=6)

    def always_0_1(self, layer, resid, u, routing):
        if layer + 1 >= self.model.cfg.num_layers:
            return None
        ids = torch.tensor([[0, 1]]).expand(u.shape[0], 2)
        return Routing(ids, torch.full(ids.shape, 0.5))

    with replaced("tinymoe.speculation.predictors", "RouterPredictor.observe", always_0_1):
        _, got = offloaded(model, "speculative+router+lru", predictor, slots=6)
    assert decisions(got) != decisions(want)


def test_router_pf_experts_for_exact_prefetch(model):
    """Exact prefetch asks Router-PF for experts only (guess_ids, the folded form that
    tests/test_predict.py checks against observe); that is what prefetch+router runs."""
    predictor = RouterPredictor(model, None, 1)
    _, want = offloaded(model, "prefetch+router+lru", predictor, slots=6)

    def always_0_1(self, layer, resid, u, routing):
        if layer + 1 >= self.model.cfg.num_layers:
            return None
        return Routing(torch.tensor([[0, 1]]).expand(u.shape[0], 2), None)

    with replaced("tinymoe.speculation.predictors", "RouterPredictor.guess_ids", always_0_1):
        _, got = offloaded(model, "prefetch+router+lru", predictor, slots=6)
    assert decisions(got) != decisions(want)


def test_speculative_decision(model, trace):
    predictor = RouterPredictor(model, None, 1)
    want_tokens, _ = offloaded(model, "speculative+router+lru", predictor, slots=6)
    resident = generate(model, PROMPT, 6, eos_ids=()).tokens
    want_sim = replayed(trace, "speculative+router-nodefault+lru", 6)
    never = (lambda *args: False, ("tinymoe.speculation.scoring",))
    with replaced("tinymoe.speculation.hook", "speculates", never[0], never[1]):
        tokens, _ = offloaded(model, "speculative+router+lru", predictor, slots=6)
        sim = replayed(trace, "speculative+router-nodefault+lru", 6)
    assert want_tokens != resident and tokens == resident  # never speculating is exact
    assert decisions(sim) != decisions(want_sim)


# ---------------------------------------------------------------- offloading


def test_exact_prefetch_throttling(model, trace):
    predictor = RouterPredictor(model, None, 1)
    _, want = offloaded(model, "prefetch+router+lru", predictor, slots=6)
    want_sim = replayed(trace, "oracle", 6)
    with replaced("tinymoe.offload.scheduler", "Scheduler._prefetch", lambda self, p: None):
        _, got = offloaded(model, "prefetch+router+lru", predictor, slots=6)
        sim = replayed(trace, "oracle", 6)
    assert want["prefetch_bytes"] > 0 and got["prefetch_bytes"] == 0
    assert want_sim["prefetch_bytes"] > 0 and sim["prefetch_bytes"] == 0


def test_choosing_a_victim_slot(model, trace):
    _, want = offloaded(model, "lru", slots=3)
    want_sim = replayed(trace, "lru", 3)

    def most_recent(self, evict_reserved):
        free = [s for s, k in enumerate(self.key_of) if k is None and not self.pins[s]]
        held = [s for s, k in enumerate(self.key_of) if k is not None and not self.pins[s]]
        return free[0] if free else max(held, key=self.last_use.__getitem__, default=None)

    with replaced("tinymoe.offload.cache", "ExpertCache._victim", most_recent):
        _, got = offloaded(model, "lru", slots=3)
        sim = replayed(trace, "lru", 3)
    assert decisions(got) != decisions(want) and decisions(sim) != decisions(want_sim)


def test_fifo_link(trace):
    """One formula for when a copy runs: the simulated link's worker and the virtual link."""
    slow = MeasuredCosts(trace, LinkSpec(1e-6, 0.0))  # seconds per copy: it queues, whatever
    want = simulate(trace, "on-demand", slow)  # the measured compute times were

    def no_queue(issued_s, link_free_s, busy_s):  # as if every copy had the link to itself
        return issued_s, issued_s + busy_s

    with replaced("tinymoe.offload.link", "fifo", no_queue, ("tinymoe.simulator.replay",)):
        got = simulate(trace, "on-demand", slow)
        from tinymoe.offload.link import SimulatedLink

        link = SimulatedLink(LinkSpec(0.004, 0.0))  # 0.1 s a copy: b is issued long before
        try:
            a, b = (link.copy(torch.empty(10**5), torch.ones(10**5), 0, "t") for _ in range(2))
            a.compute_wait(), b.compute_wait()
        finally:
            link.close()
    assert got["stall_ms"] < 0.75 * want["stall_ms"]
    assert b.start_s < a.end_s  # the second copy did not queue behind the first


def test_miss_taxonomy(model, trace):
    _, want = offloaded(model, "lru", slots=3)
    want_sim = replayed(trace, "lru", 3)
    with replaced(
        "tinymoe.offload.meter",
        "classify_miss",
        lambda predicted, expert, seen: "mispredicted",
        ("tinymoe.offload.scheduler",),
    ):
        _, got = offloaded(model, "lru", slots=3)
        sim = replayed(trace, "lru", 3)
    for d in (got, sim):
        assert d["miss_kinds"]["compulsory"] == d["miss_kinds"]["capacity"] == 0
    assert want["miss_kinds"]["compulsory"] > 0 and want_sim["miss_kinds"]["compulsory"] > 0


def test_eq1_bound_is_what_bench_reports(baby, capsys):
    import json

    from tinymoe.bench import main as bench

    argv = ["--model", str(baby), "--policies", "on-demand", "--max-new-tokens", "3", "--json"]
    argv += ["--prompt-tokens", "4", "--link-gbps", "100"]
    with replaced(
        "tinymoe.offload.meter", "eq1_bound_ms", lambda tpot, layers: -1.0, ("tinymoe.bench",)
    ):
        assert bench(argv) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["eq1_bound_ms"] == -1.0


def test_an_experts_byte_size(model, trace):
    want = replayed(trace, "lru", 3)["bytes_copied"]
    with replaced("tinymoe.engine.config", "ModelConfig.expert_bytes", lambda self, dtype: 10**12):
        with pytest.raises(Exception, match="fewer than top-k"):  # the budget counts it
            OffloadRuntime(model, "lru", budget_gb=1.0, link=LINK)
        rec = record_run(model, PROMPT, 3, LINK, ["oracle"], "", 1)
    assert rec.model["expert_bytes"] == 10**12 and want > 0


def test_copy_time_on_a_link(trace):
    want = replayed(trace, "on-demand")
    with replaced("tinymoe.offload.link", "LinkSpec.seconds", lambda self, nbytes: 0.0):
        got = replayed(trace, "on-demand")
    assert want["copy_ms"] > 0 and got["copy_ms"] == 0


def test_the_runtime_and_the_replay_drive_one_layer_loop(model, trace):
    calls = []

    def counted(self, layer, resid, u, router):
        calls.append(layer)
        return original(self, layer, resid, u, router)

    with replaced("tinymoe.offload.runtime", "LayerDriver.route", counted) as original:
        offloaded(model, "lru")
        n_runtime = len(calls)
        replayed(trace, "lru")
    L = model.cfg.num_layers
    assert n_runtime == 6 * L and len(calls) == n_runtime + len(trace.passes) * L


# ---------------------------------------------------------------- each formula written once

FINGERPRINTS = {
    # an expert's byte size: the packed buffer's elements times the element size
    r"expert_numel\s*\*": ["engine/config.py"],
    # the speculative decision: the first `lookahead` layers always route themselves
    r"layer >= (self\.)?lookahead": ["speculation/hook.py"],
    # exact prefetch is throttled; speculation and the oracle use every guess
    r"not [a-z.]*speculate and": ["offload/scheduler.py"],
    # a copy's start on a first-in-first-out link
    r"max\([^)]*free": ["offload/link.py"],
    # the Eq.-1 bound's saving per layer
    r"min\(s\[": ["offload/meter.py"],
    # the default vectors: the experts' output sums over their counts
    r"expert_sum\s*/": ["speculation/exact_run.py"],
    # a norm applied to a quasi-hidden state (q_l), by a predictor
    r"post_attention_layernorm\(x\)": ["speculation/predictors.py"],
}


@pytest.mark.parametrize("pattern", list(FINGERPRINTS))
def test_each_formula_is_written_once(pattern):
    found = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if re.search(pattern, p.read_text(encoding="utf-8"))
    ]
    assert found == FINGERPRINTS[pattern]


# ---------------------------------------------------------------- the package's shape


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert not long, f"split by idea: {long}"


def test_no_import_circle():
    """Module-level imports among tinymoe's modules form no cycle (imports inside a function
    or under TYPE_CHECKING do not count: they are how a cycle is avoided on purpose)."""
    import ast

    modules = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                edges |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in edges if m in modules and m != name}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name) :]))
        if name not in done:
            for m in graph[name]:
                visit(m, [*path, name])
            done.add(name)

    for name in graph:
        visit(name, [])
