"""Classroom exercises (tinymoe/exercises): every untouched starter fails its check, every
solution passes, and holes filled by hand (written differently from the engine) pass too; lazy
answers (nothing written, or the engine's own code called) are rejected before any check runs,
and plausibly wrong answers fail the property they break, without a traceback or the answer.

Starters are cut from the live engine source, so these tests also fail when an engine change
breaks an exercise: a renamed function, a changed signature, a behaviour the checks pin down.
"""

import ast
import dataclasses
import inspect
import json
import runpy
import textwrap
from pathlib import Path

import pytest
from conftest import fill, started

from tinymoe.exercises.__main__ import cli as main  # cli: a TinyMoeError is status 2
from tinymoe.exercises.catalog import EXERCISES, get
from tinymoe.exercises.holes import _signature_names, find_def, starter_source
from tinymoe.exercises.runner import check_file, run_checks

REPO = Path(__file__).resolve().parents[1]
IDS = [ex.id for ex in EXERCISES]


def test_list_json_names_at_least_eight_exercises(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == IDS and len(rows) >= 8
    for r in rows:
        assert r["title"] and r["concepts"] and r["minutes"] > 0
        assert all((REPO / f).is_file() for f in r["files"])
        assert (REPO / r["doc"]).is_file(), f"{r['doc']} is missing"
        assert all(p in IDS[: IDS.index(r["id"])] for p in r["prerequisites"])


@pytest.mark.parametrize("exercise_id", IDS)
def test_untouched_starter_fails(exercise_id, tmp_path, capsys):
    started(tmp_path, exercise_id)
    assert main(["check", exercise_id, "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "still a hole" in out and " ok " not in out


@pytest.mark.parametrize("exercise_id", IDS)
def test_solution_passes(exercise_id, capsys):
    assert main(["check", exercise_id, "--solution"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("exercise_id", IDS)
def test_holes_keep_the_signature_and_docstring_and_drop_the_body(exercise_id):
    ex = get(exercise_id)
    tree = ast.parse(starter_source(ex))
    defs = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for t in ex.targets:
        engine = ast.parse(textwrap.dedent(_engine_def_source(t)))
        want = engine.body[0]
        got = defs[want.name]
        assert ast.dump(got.args) == ast.dump(want.args)  # the same signature
        assert ast.get_docstring(got) == ast.get_docstring(want)
        *_, hole = got.body
        assert isinstance(hole, ast.Raise) and "hole:" in ast.unparse(hole)
        assert len(got.body) <= 2  # a docstring and the hole: nothing of the answer


def _engine_def_source(t) -> str:
    return inspect.getsource(inspect.unwrap(t.engine_function()))


def _engine_def(t) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(_engine_def_source(t))).body[0]


@pytest.mark.parametrize("exercise_id", IDS)
def test_a_starter_imports_only_torch_its_signatures_and_what_it_gives(exercise_id):
    ex = get(exercise_id)
    tree = ast.parse(starter_source(ex))
    imported = {
        a.asname or a.name.split(".")[0]
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    allowed = {"torch", "F", "Tensor", *ex.given}
    for t in ex.targets:
        allowed |= _signature_names(_engine_def(t))
    engine_modules = {"_engine_" + t.module.rsplit(".", 1)[1] for t in ex.targets if t.is_method}
    assert imported - engine_modules <= allowed


def test_every_exercise_names_the_checks_that_run_the_engine_on_your_code():
    for ex in EXERCISES:
        assert ex.engine_checks, f"{ex.id}: no check runs the engine on the student's code"


def test_the_engine_runs_on_your_code_is_said_only_when_its_checks_ran(capsys):
    ex = get("routing")
    assert run_checks(ex, ex.solution(), None)
    assert "the engine runs on your code" in capsys.readouterr().out
    assert run_checks(dataclasses.replace(ex, engine_checks=()), ex.solution(), None)
    assert "the engine runs on your code" not in capsys.readouterr().out


def test_start_never_overwrites_without_force(tmp_path):
    path = started(tmp_path, "routing")
    path.write_text("# my work\n")
    assert main(["start", "routing", "--workdir", str(tmp_path)]) == 2
    assert path.read_text() == "# my work\n"
    assert main(["start", "routing", "--workdir", str(tmp_path), "--force"]) == 0
    assert "hole: route_topk" in path.read_text()


def test_a_starter_runs_its_own_check(tmp_path, capsys):
    path = started(tmp_path, "expert")
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_.value.code == 1 and "expert_views is still a hole" in capsys.readouterr().out


def test_unknown_exercise_is_one_line_and_status_2(capsys):
    assert main(["check", "no-such-thing"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("error: no exercise 'no-such-thing'")


# ---------------------------------------------------------------- holes filled by hand

# Correct answers written differently from the engine's code (docs/exercises/README.md records
# these): the checks test behaviour, so any correct body passes.
OWN = {
    "routing": {
        "routing_weights_dtype": """
            if cfg.model_type == "mixtral":  # Mixtral scales its experts in fp32
                return torch.float32
            return activation_dtype
        """,
        "route_topk": """
            probs = logits.float().softmax(dim=-1)
            ids = probs.argsort(dim=-1, descending=True)[:, :top_k]
            weights = probs.gather(-1, ids)
            if normalise:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return Routing(ids=ids, weights=weights.to(dtype), logits=logits)
        """,
    },
    "moe-layer": {
        "moe_forward": """
            N, K = routing.ids.shape
            used = sorted({e for row in routing.ids_on_host() for e in row})
            dtype = torch.promote_types(u.dtype, routing.weights.dtype)
            out = torch.zeros(N, K, u.shape[-1], dtype=dtype)
            for e, w in provider.experts(layer, used):
                n, k = (routing.ids == e).nonzero(as_tuple=True)
                out[n, k] = expert_forward(w, u[n], expert_dim) * routing.weights[n, k, None]
            return out.sum(dim=1).to(u.dtype)
        """,
    },
    "kv-cache": {
        "KVCache.update": """
            if isinstance(start, Tensor):  # (1,) on the device: index it, never read it
                self.k[layer, :, :, start] = k
                self.v[layer, :, :, start] = v
                return self.k[layer], self.v[layer]
            T = k.shape[2]
            if start + T > self.max_len:
                raise TinyMoeError(f"the KV cache is full: {start + T} > {self.max_len}")
            self.k[layer].narrow(2, start, T).copy_(k)
            self.v[layer].narrow(2, start, T).copy_(v)
            return self.k[layer].narrow(2, 0, start + T), self.v[layer].narrow(2, 0, start + T)
        """,
        # Always a boolean mask, never None: slower, but what attention computes is the same.
        "MoETransformer._mask": """
            key = torch.arange(S, device=device)
            mask = key[None, :] <= pos[:, None]
            if self.cfg.sliding_window is not None:
                mask &= key[None, :] > pos[:, None] - self.cfg.sliding_window
            return mask
        """,
    },
    "eviction": {
        "ExpertCache._victim": """
            ok = [
                s
                for s in range(self.num_slots)
                if not self.pins[s] and (evict_reserved or not self.reserved[s])
            ]
            free = [s for s in ok if self.key_of[s] is None]
            if free or not ok:
                return free[0] if free else None

            def rank(s):
                uses = self.uses[self.key_of[s]] if self.eviction == "lfu" else 0
                return self.reserved[s], uses, self.last_use[s]

            return min(ok, key=rank)
        """,
    },
    "norm-rope": {
        "rms_normalize": """
            var = x.float().square().mean(dim=-1, keepdim=True)
            return (x.float() / torch.sqrt(var + eps)).to(x.dtype)
        """,
        "RMSNorm.forward": """
            var = x.float().square().mean(dim=-1, keepdim=True)
            return (x.float() / torch.sqrt(var + self.eps)).to(x.dtype) * self.weight
        """,
        "rope_cos_sin": """
            i = torch.arange(head_dim // 2, dtype=torch.float64)
            angle = positions.double()[:, None] * theta ** (-2 * i / head_dim)[None, :]
            angle = torch.cat([angle, angle], dim=-1)
            return angle.cos().to(dtype), angle.sin().to(dtype)
        """,
        "apply_rope": """
            h = x.shape[-1] // 2
            return x * cos + torch.cat([-x[..., h:], x[..., :h]], dim=-1) * sin
        """,
    },
    "expert": {
        "expert_views": """
            n = 2 * expert_dim * hidden
            gate_up = w.narrow(0, 0, n).view(2 * expert_dim, hidden)
            return gate_up, w.narrow(0, n, hidden * expert_dim).view(hidden, expert_dim)
        """,
        "expert_forward": """
            gate_up, down = expert_views(w, expert_dim, x.shape[-1])
            h = x @ gate_up.t()
            return (F.silu(h[:, :expert_dim]) * h[:, expert_dim:]) @ down.t()
        """,
    },
    "time-model": {
        "LinkSpec.seconds": "return self.latency_us / 1e6 + nbytes / self.gbps / 1e9",
        "eq1_bound_ms": """
            saved = 0.0
            for s in layers:
                saved += min(s["copy_ms"], s["compute_ms"])
            return tpot_ms - saved
        """,
    },
    "distillation": {
        "kl_to_router": """
            log_p = true_logits.float().log_softmax(-1)
            log_q = logits.float().log_softmax(-1)
            return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        """,
        "train_estimator": """
            if steps < 1:
                raise TinyMoeError(f"steps must be >= 1, got {steps}")
            g = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(estimator.parameters(), lr=lr)  # (weight decay 0.01)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            estimator.train()
            losses = []
            for _ in range(steps):
                total = 0
                for t, (q, true) in pairs.items():
                    idx = torch.randint(len(q), (batch_size,), generator=g)
                    total = total + kl_to_router(true[idx], estimator(q[idx], t)).mean()
                loss = total / len(pairs)
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
                losses.append(loss.item())
            estimator.eval()
            return losses
        """,
    },
    "router-pf": {
        "quasi_hidden": """
            x = resid
            if default_vectors is not None:
                for k in range(routing.ids.shape[1]):
                    v = default_vectors[layer, routing.ids[:, k]]  # (N, D)
                    x = x + routing.weights[:, k : k + 1].to(x.dtype) * v
            return model.layers[target].post_attention_layernorm(x)
        """,
    },
}


@pytest.mark.parametrize("exercise_id", list(OWN))
def test_own_solutions_written_differently_pass(exercise_id, tmp_path, capsys):
    path = started(tmp_path, exercise_id)
    text = path.read_text()
    for name, body in OWN[exercise_id].items():
        text = fill(text, name, body)
    path.write_text(text)
    assert main(["check", exercise_id, "--workdir", str(tmp_path)]) == 0, capsys.readouterr().out


# ---------------------------------------------------------------- lazy answers

TARGETS = [(ex.id, t.qualname) for ex in EXERCISES for t in ex.targets]


def _target(exercise_id: str, qualname: str):
    return next(t for t in get(exercise_id).targets if t.qualname == qualname)


def _call_args(node: ast.FunctionDef, method: bool) -> str:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)][1 if method else 0 :]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [f"{x.arg}={x.arg}" for x in a.kwonlyargs]
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return ", ".join(names)


def _without_def(text: str, qualname: str) -> str:
    """The starter with the def of `qualname` (and its decorators) cut out."""
    node = find_def(ast.parse(text), qualname)
    first = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    lines = text.splitlines(keepends=True)
    return "".join(lines[:first] + lines[node.end_lineno :])


def _lazy(text: str, t, how: str) -> str:
    """A starter with the hole `t` answered lazily: `how` is missing, super, engine or
    untouched."""
    if how == "missing":
        return _without_def(text, t.qualname)
    if how == "untouched":
        return text
    node = _engine_def(t)
    args, name = _call_args(node, t.is_method), node.name
    if t.is_method and how == "super":
        body = f"return super().{name}({args})"
    elif t.is_method:  # the engine class's function, by the starter's own module alias
        alias = "_engine_" + t.module.rsplit(".", 1)[1]
        body = f"return {alias}.{t.qualname}(self{', ' if args else ''}{args})"
    elif how == "super":  # (a function has no super: import the engine's under another name)
        body = f"from {t.module} import {name} as engine_fn\nreturn engine_fn({args})"
    else:
        body = f"import {t.module} as engine_mod\nreturn engine_mod.{name}({args})"
    return fill(text, t.qualname, body)


SAYS = {
    "missing": "is missing",
    "super": "delegates to the engine's own",
    "engine": "delegates to the engine's own",
    "untouched": "is still a hole",
}


@pytest.mark.parametrize("how", list(SAYS))
@pytest.mark.parametrize("exercise_id,qualname", TARGETS)
def test_a_lazy_answer_is_rejected_before_any_check(exercise_id, qualname, how, tmp_path, capsys):
    path = started(tmp_path, exercise_id)
    path.write_text(_lazy(path.read_text(), _target(exercise_id, qualname), how))
    assert check_file(exercise_id, path) == 1
    out = capsys.readouterr().out
    assert any(line.startswith(f"  FAIL  {qualname} {SAYS[how]}") for line in out.splitlines())
    assert "No check ran" in out and " ok " not in out and "Traceback" not in out


def test_your_own_helpers_count_and_the_engines_do_not(tmp_path, capsys):
    path = started(tmp_path, "norm-rope")
    text = path.read_text()
    for name, body in OWN["norm-rope"].items():
        if name != "RMSNorm.forward":
            text = fill(text, name, body)
    mine = fill(text, "RMSNorm.forward", "return self.weight * rms_normalize(x, self.eps)")
    path.write_text(mine)  # the student's rms_normalize: the engine's text, but their code
    assert check_file("norm-rope", path) == 0, capsys.readouterr().out
    engines = "return self.weight * _engine_model.rms_normalize(x, self.eps)"
    path.write_text(fill(text, "RMSNorm.forward", engines))
    assert check_file("norm-rope", path) == 1
    out = capsys.readouterr().out
    assert "RMSNorm.forward delegates to the engine's own rms_normalize" in out


# ---------------------------------------------------------------- what a failure says


def test_an_engine_error_on_your_code_is_a_property_not_an_engine_line(tmp_path, capsys):
    path = started(tmp_path, "kv-cache")
    text = fill(path.read_text(), "KVCache.update", OWN["kv-cache"]["KVCache.update"])
    mask = OWN["kv-cache"]["MoETransformer._mask"].replace("return mask", "return mask.T")
    path.write_text(fill(text, "MoETransformer._mask", mask))  # (S, T): the engine chokes
    assert check_file("kv-cache", path) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "FAIL  decode equals full forward:" in x)
    assert "running the engine on your code raised RuntimeError" in line
    assert "model.py" not in out and "Traceback" not in out


def test_an_error_in_your_file_names_its_line_once(tmp_path, capsys):
    path = started(tmp_path, "routing")
    text = fill(path.read_text(), "routing_weights_dtype", OWN["routing"]["routing_weights_dtype"])
    path.write_text(fill(text, "route_topk", "return Routing(ids=idz, weights=logits)"))
    assert check_file("routing", path, fail_fast=True) == 1
    out = capsys.readouterr().out
    assert "raised NameError: name 'idz' is not defined (routing.py, line " in out
    path.write_text(path.read_text().replace("return Routing(", "return Routing((", 1))
    assert check_file("routing", path) == 1
    out = capsys.readouterr().out
    assert "does not import: SyntaxError" in out and out.count("line ") == 1


# ---------------------------------------------------------------- plausibly wrong answers

# (exercise, hole, the wrong body, the property it must fail). The exercise's other holes hold
# the OWN answers; each wrong answer is one a student could write.
WRONG = [
    # norm-rope
    (
        "norm-rope",
        "rms_normalize",
        "return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # in x's dtype",
        "rms_normalize",
    ),
    (
        "norm-rope",
        "rms_normalize",
        "return (x.float() / x.float().norm(dim=-1, keepdim=True)).to(x.dtype)  # no 1/sqrt(D)",
        "rms_normalize",
    ),
    (
        "norm-rope",
        "RMSNorm.forward",
        """
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)  # scaled before the cast back
        """,
        "RMSNorm exactness (bf16)",
    ),
    (
        "norm-rope",
        "rope_cos_sin",
        """
        inv_freq = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        angles = positions.float()[:, None] * inv_freq[None, :]
        emb = angles.repeat_interleave(2, dim=-1)  # interleaved pairs, not rotate-half
        return emb.cos().to(dtype), emb.sin().to(dtype)
        """,
        "rotary angles",
    ),
    (
        "norm-rope",
        "apply_rope",
        """
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, -x1), dim=-1) * sin  # halves swapped
        """,
        "rotary rotation",
    ),
    # routing
    (
        "routing",
        "route_topk",
        """
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k)  # softmax in bf16
        if normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(ids=ids, weights=weights.to(dtype), logits=logits)
        """,
        "fp32 precision",
    ),
    (
        "routing",
        "route_topk",
        """
        top, ids = torch.topk(logits.float(), top_k)
        weights = top.softmax(dim=-1)  # over the K: renormalised whether asked or not
        return Routing(ids=ids, weights=weights.to(dtype), logits=logits)
        """,
        "weight values",
    ),
    (
        "routing",
        "route_topk",
        """
        probs = logits.float().softmax(dim=-1)
        ids = probs.argsort(dim=-1)[:, -top_k:]  # the K most probable, least probable first
        weights = probs.gather(-1, ids)
        if normalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(ids=ids, weights=weights.to(dtype), logits=logits)
        """,
        "expert ids",
    ),
    ("routing", "routing_weights_dtype", "return torch.float32", "weights dtype per architecture"),
    # expert
    (
        "expert",
        "expert_views",
        """
        gate, up, down = w.split([expert_dim * hidden] * 3)
        gate_up = torch.cat([gate.view(expert_dim, hidden), up.view(expert_dim, hidden)])
        return gate_up, down.view(hidden, expert_dim)
        """,
        "no copies",
    ),
    (
        "expert",
        "expert_views",
        """
        n = 2 * expert_dim * hidden
        return w[:n].view(2 * expert_dim, hidden), w[n:].view(expert_dim, hidden).t()
        """,
        "the packed layout",
    ),
    (
        "expert",
        "expert_forward",
        """
        gate_up, down = expert_views(w, expert_dim, x.shape[-1])
        u, g = F.linear(x, gate_up).chunk(2, dim=-1)  # gate and up swapped
        return F.linear(F.silu(g) * u, down)
        """,
        "SwiGLU values",
    ),
    # moe-layer
    (
        "moe-layer",
        "moe_forward",
        """
        N, K = routing.ids.shape
        used = sorted({e for row in routing.ids_on_host() for e in row})
        g = routing.weights.to(u.dtype)  # Mixtral's fp32 weights rounded to bf16
        out = torch.zeros(N, K, u.shape[-1], dtype=u.dtype)
        for e, w in provider.experts(layer, used):
            n, k = (routing.ids == e).nonzero(as_tuple=True)
            out[n, k] = expert_forward(w, u[n], expert_dim) * g[n, k, None]
        return out.sum(dim=1)
        """,
        "fp32 routing weights (Mixtral, bf16)",
    ),
    (
        "moe-layer",
        "moe_forward",
        """
        N, K = routing.ids.shape
        used = routing.ids.unique().tolist()  # reads the ids again, even when already read
        out = torch.zeros(N, K, u.shape[-1], dtype=routing.weights.dtype)
        for e, w in provider.experts(layer, used):
            n, k = (routing.ids == e).nonzero(as_tuple=True)
            out[n, k] = expert_forward(w, u[n], expert_dim) * routing.weights[n, k, None]
        return out.sum(dim=1).to(u.dtype)
        """,
        "host reads",
    ),
    (
        "moe-layer",
        "moe_forward",
        """
        N, K = routing.ids.shape
        used = sorted({e for row in routing.ids_on_host() for e in row})
        out = torch.zeros(N, K, u.shape[-1], dtype=routing.weights.dtype)
        for e, w in provider.experts(layer, used):
            mine = routing.ids == e
            if not mine.any():  # a sync per expert
                continue
            n, k = mine.nonzero(as_tuple=True)
            out[n, k] = expert_forward(w, u[n], expert_dim) * routing.weights[n, k, None]
        return out.sum(dim=1).to(u.dtype)
        """,
        "host reads",
    ),
    (
        "moe-layer",
        "moe_forward",
        """
        used = sorted({e for row in routing.ids_on_host() for e in row})
        out = torch.zeros(u.shape, dtype=routing.weights.dtype)
        for e, w in provider.experts(layer, used):
            n, k = (routing.ids == e).nonzero(as_tuple=True)
            y = expert_forward(w, u[n], expert_dim) * routing.weights[n, k, None]
            out.index_add_(0, n, y)  # summed in the order the experts arrive
        return out.to(u.dtype)
        """,
        "order independence",
    ),
    (
        "moe-layer",
        "moe_forward",
        """
        rows = []
        for n, ids in enumerate(routing.ids.tolist()):  # each token asks for its own experts
            ws = dict(provider.experts(layer, ids))
            y = sum(
                routing.weights[n, k] * expert_forward(ws[e], u[n : n + 1], expert_dim)
                for k, e in enumerate(ids)
            )
            rows.append(y)
        return torch.cat(rows).to(u.dtype)
        """,
        "what it asks the provider for",
    ),
    # kv-cache
    (
        "kv-cache",
        "KVCache.update",
        """
        end = start + k.shape[2]
        if end > self.max_len:
            raise TinyMoeError(f"the KV cache holds {self.max_len} positions, not {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return k, v  # only the new positions
        """,
        "cached values",
    ),
    (
        "kv-cache",
        "KVCache.update",
        """
        end = start + k.shape[2]
        if end > self.max_len:
            raise TinyMoeError(f"the KV cache holds {self.max_len} positions, not {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end].contiguous(), self.v[layer, :, :, :end].contiguous()
        """,
        "no copies",
    ),
    (
        "kv-cache",
        "KVCache.update",
        """
        end = start + k.shape[2]  # an int start only
        if end > self.max_len:
            raise TinyMoeError(f"the KV cache holds {self.max_len} positions, not {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        """,
        "tensor start (the compiled step)",
    ),
    (
        "kv-cache",
        "MoETransformer._mask",
        """
        key = torch.arange(S, device=device)
        mask = key[None, :] <= pos[:, None]
        if self.cfg.sliding_window is not None:
            mask &= key[None, :] >= pos[:, None] - self.cfg.sliding_window  # one too many
        return mask
        """,
        "attention masks",
    ),
    (
        "kv-cache",
        "MoETransformer._mask",
        """
        key = torch.arange(S, device=device)
        mask = key[None, :] < pos[:, None]  # a token does not see itself
        if self.cfg.sliding_window is not None:
            mask &= key[None, :] > pos[:, None] - self.cfg.sliding_window
        return mask
        """,
        "attention masks",
    ),
    # router-pf
    (
        "router-pf",
        "quasi_hidden",
        """
        x = resid
        if default_vectors is not None:
            v = default_vectors[layer][routing.ids]
            x = x + (routing.weights.unsqueeze(-1) * v).sum(dim=1)
        return model.layers[layer + 1].post_attention_layernorm(x)  # not the target's norm
        """,
        "without default vectors",
    ),
]


def _answer_lines(exercise_id: str) -> list[str]:
    """The engine's own code for the exercise's holes, line by line (what must never print)."""
    out = []
    for t in get(exercise_id).targets:
        node = _engine_def(t)
        body = node.body[1:] if ast.get_docstring(node) is not None else node.body
        for stmt in body:
            out += [x.strip() for x in ast.unparse(stmt).splitlines() if len(x.strip()) > 12]
    return out


@pytest.mark.parametrize(
    "exercise_id,name,body,fails", WRONG, ids=[f"{w[0]}:{w[3]}" for w in WRONG]
)
def test_a_wrong_answer_fails_the_property_it_breaks(
    exercise_id, name, body, fails, tmp_path, capsys
):
    path = started(tmp_path, exercise_id)
    text = fill(path.read_text(), name, body)
    for other, own in OWN.get(exercise_id, {}).items():
        if other != name:
            text = fill(text, other, own)
    path.write_text(text)
    assert check_file(exercise_id, path, fail_fast=True) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {fails}:" in out, out
    assert "Traceback" not in out and "No check ran" not in out
    assert not [line for line in _answer_lines(exercise_id) if line in out]
