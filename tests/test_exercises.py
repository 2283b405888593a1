"""Classroom exercises (tinymoe/exercises): every untouched starter fails its check, every
solution passes, and holes filled by hand (written differently from the engine) pass too.

Starters are cut from the live engine source, so these tests also fail when an engine change
breaks an exercise: a renamed function, a changed signature, a behaviour the checks pin down.
"""

import ast
import json
import runpy
import textwrap
from pathlib import Path

import pytest
from conftest import fill, started

from tinymoe.exercises.__main__ import cli as main  # cli: a TinyMoeError is status 2
from tinymoe.exercises.catalog import EXERCISES, get
from tinymoe.exercises.holes import starter_source

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
    import inspect

    obj = t.engine_object()
    for part in t.qualname.split(".")[1:]:
        obj = getattr(obj, part)
    return inspect.getsource(inspect.unwrap(obj))


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
            used = sorted(set(routing.ids.flatten().tolist()))
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


WRONG = [
    # (exercise, hole, body, the property that must fail, a property that must still pass)
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
        "expert ids",
    ),
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
        "shape",
    ),
]


@pytest.mark.parametrize("exercise_id,name,body,fails,passes", WRONG)
def test_a_wrong_answer_fails_the_property_it_breaks(
    exercise_id, name, body, fails, passes, tmp_path, capsys
):
    path = started(tmp_path, exercise_id)
    path.write_text(fill(path.read_text(), name, body))
    if exercise_id == "routing":  # the other hole of this exercise, answered correctly
        dtype = "return torch.float32 if cfg.fp32_routing_weights else activation_dtype"
        path.write_text(fill(path.read_text(), "routing_weights_dtype", dtype))
    assert main(["check", exercise_id, "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {fails}:" in out and f"ok    {passes}" in out
    assert "Traceback" not in out
