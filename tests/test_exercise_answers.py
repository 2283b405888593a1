"""Answers to the offloading and speculation exercises, written as students write them.

Each wrong answer is a plausible mistake; its exercise's check must fail it on the property it
breaks, with a message (not a traceback, not an exception report). Each right answer is written
differently from the engine (another free slot, another order of operations) and must pass:
the checks judge what the specification fixes, nothing else.
"""

import pytest
from conftest import fill, started

from tinymoe.exercises.runner import check_file


def _check(tmp_path, exercise_id: str, bodies: dict[str, str], fail_fast: bool) -> int:
    path = started(tmp_path, exercise_id)
    text = path.read_text()
    for name, body in bodies.items():
        text = fill(text, name, body)
    path.write_text(text)
    return check_file(exercise_id, path, fail_fast=fail_fast)


# ---------------------------------------------------------------- right answers, written anew

RIGHT = {
    # The highest-numbered free slot, and a sort instead of a running minimum.
    "eviction": {
        "ExpertCache._victim": """
            usable = [
                s
                for s in reversed(range(self.num_slots))
                if self.pins[s] == 0 and (evict_reserved or not self.reserved[s])
            ]
            for s in usable:
                if self.key_of[s] is None:
                    return s
            if not usable:
                return None

            def order(s):
                if self.eviction == "lfu":
                    return (self.reserved[s], self.uses[self.key_of[s]], self.last_use[s])
                return (self.reserved[s], self.last_use[s])

            return sorted(usable, key=order)[0]
        """,
    },
    "time-model": {
        "LinkSpec.seconds": "return (nbytes / self.gbps + 1e3 * self.latency_us) / 1e9",
        "eq1_bound_ms": """
            hidden = 0.0
            for layer in layers:
                copy, compute = layer["copy_ms"], layer["compute_ms"]
                hidden += copy if copy < compute else compute
            return tpot_ms - hidden
        """,
    },
    # Copies counted down from depth; reservations recorded as they are made.
    "prefetch": {
        "Scheduler._prefetch": """
            if prefetch is None:
                return
            target = prefetch.target
            crossing = target >= self.num_layers
            layer = target - self.num_layers if crossing else target
            st = self.meter.layer(layer, "decode" if crossing else None)
            left = self.depth
            for e in prefetch.experts:
                key = (layer, e)
                slot = self.cache.lookup(key)
                if slot is None:
                    if left == 0:
                        continue
                    slot = self._insert(key, evict_reserved=False)
                    if slot is None:
                        continue
                    self._copy(layer, e, slot, "prefetch", st)
                    self.unused_prefetch.add(key)
                    if left is not None:
                        left -= 1
                self.cache.reserve(slot)
                self.reserved.setdefault(target, []).append(key)
        """,
    },
    "router-pf": {
        "quasi_hidden": """
            x = resid
            if default_vectors is not None:
                v = default_vectors[layer, routing.ids]  # (N, K, D)
                x = x + torch.einsum("nk,nkd->nd", routing.weights.to(v.dtype), v)
            return model.layers[target].post_attention_layernorm(x)
        """,
    },
    # A decision written as early returns; one host read (.cpu(), then the host copy's values)
    # without the engine's read_together; a Guess told by its `sure`, its rows mixed by hand.
    "speculative": {
        "speculates": """
            if not speculate or guess is None or phase != "decode":
                return False
            return layer >= lookahead
        """,
        "PredictionHook.__call__": """
            predicted = self.pending.pop(layer, None)
            if predicted is None:
                self.last_prediction.pop(layer, None)
            else:
                self.last_prediction[layer] = predicted
            d = 0 if self.predictor is None else self.predictor.lookahead
            if not speculates(self.speculate, self.phase, layer, d, predicted):
                routing = router(u)
            elif getattr(predicted, "sure", None) is None:
                routing = predicted
            elif u.shape[0] == 1:  # one token: its sureness was read with its ids
                routing = predicted if predicted.sure_on_host()[0] else router(u)
                self.guessed += 1
                self.fell_back += routing is not predicted
            else:
                exact, sure = router(u), predicted.sure[:, None]
                ids = torch.where(sure, predicted.ids, exact.ids)
                routing = Routing(ids, torch.where(sure, predicted.weights, exact.weights))
                self.guessed += u.shape[0]
                self.fell_back = self.fell_back + (~predicted.sure).sum()
            if self.predictor is None:
                return routing
            guess = self.predictor.observe(layer, resid.reshape(u.shape), u, routing)
            if guess is None:
                return routing
            self.pending[layer + d] = guess
            if self.read_ids and routing.host_ids is None and u.shape[0] == 1:
                k, sure = routing.ids.shape[1], getattr(guess, "sure", None)
                parts = [routing.ids.flatten(), guess.ids.flatten()]
                both = torch.cat(parts + ([sure.long()] if sure is not None else [])).cpu()
                both = both.tolist()
                routing.host_ids, guess.host_ids = [both[:k]], [both[k : 2 * k]]
                if sure is not None:
                    guess.host_sure = [bool(both[-1])]
            return routing
        """,
    },
    # Softmax then logs; Adam (no decay) with a LambdaLR cosine.
    "distillation": {
        "kl_to_router": """
            import torch.nn.functional as F

            p = F.softmax(true_logits.float(), dim=1)
            log_ratio = F.log_softmax(true_logits.float(), 1) - F.log_softmax(logits.float(), 1)
            return torch.sum(p * log_ratio, dim=1)
        """,
        "train_estimator": """
            import math

            from tinymoe.errors import TinyMoeError

            if steps <= 0:
                raise TinyMoeError(f"train_estimator: steps must be at least 1, not {steps}")
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(estimator.parameters(), lr=lr)
            cosine = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps))
            )
            estimator.train()
            losses = []
            for _ in range(steps):
                per_layer = []
                for t, (q, true_logits) in pairs.items():
                    pick = torch.randint(q.shape[0], (batch_size,), generator=gen)
                    per_layer.append(kl_to_router(true_logits[pick], estimator(q[pick], t)).mean())
                loss = torch.stack(per_layer).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                cosine.step()
                losses.append(float(loss.detach()))
            estimator.eval()
            return losses
        """,
    },
}


@pytest.mark.parametrize("exercise_id", list(RIGHT))
def test_a_right_answer_written_differently_passes(exercise_id, tmp_path, capsys):
    status = _check(tmp_path, exercise_id, RIGHT[exercise_id], fail_fast=False)
    out = capsys.readouterr().out
    assert status == 0, out


# ---------------------------------------------------------------- wrong answers

# (exercise, the hole answered wrongly, its body, the property that must fail). The exercise's
# other holes get the right answers above.
WRONG = [
    # eviction
    (
        "eviction",
        "ExpertCache._victim",
        """
        # most recently used instead of least
        free = [s for s in range(self.num_slots) if self.key_of[s] is None and not self.pins[s]]
        if free:
            return free[0]
        ok = [s for s in range(self.num_slots)
              if not self.pins[s] and (evict_reserved or not self.reserved[s])]
        return max(ok, key=lambda s: (not self.reserved[s], self.last_use[s]), default=None)
        """,
        "eviction orders",
    ),
    (
        "eviction",
        "ExpertCache._victim",
        """
        # pins ignored
        ok = [s for s in range(self.num_slots) if evict_reserved or not self.reserved[s]]
        free = [s for s in ok if self.key_of[s] is None]
        if free or not ok:
            return free[0] if free else None
        lfu = self.eviction == "lfu"
        return min(ok, key=lambda s: (self.reserved[s], lfu and self.uses[self.key_of[s]],
                                      self.last_use[s]))
        """,
        "pinned slots",
    ),
    (
        "eviction",
        "ExpertCache._victim",
        """
        # a pin taken as a flag: a slot pinned twice looks unpinned
        ok = [s for s in range(self.num_slots)
              if self.pins[s] != 1 and (evict_reserved or not self.reserved[s])]
        free = [s for s in ok if self.key_of[s] is None]
        if free or not ok:
            return free[0] if free else None
        lfu = self.eviction == "lfu"
        return min(ok, key=lambda s: (self.reserved[s], lfu and self.uses[self.key_of[s]],
                                      self.last_use[s]))
        """,
        "pinned slots",
    ),
    (
        "eviction",
        "ExpertCache._victim",
        """
        # evict_reserved ignored: a prefetch may evict a reserved slot
        ok = [s for s in range(self.num_slots) if not self.pins[s]]
        free = [s for s in ok if self.key_of[s] is None]
        if free or not ok:
            return free[0] if free else None
        lfu = self.eviction == "lfu"
        return min(ok, key=lambda s: (self.reserved[s], lfu and self.uses[self.key_of[s]],
                                      self.last_use[s]))
        """,
        "reserved slots",
    ),
    (
        "eviction",
        "ExpertCache._victim",
        """
        # reserved slots not kept for last
        ok = [s for s in range(self.num_slots)
              if not self.pins[s] and (evict_reserved or not self.reserved[s])]
        free = [s for s in ok if self.key_of[s] is None]
        if free or not ok:
            return free[0] if free else None
        lfu = self.eviction == "lfu"
        return min(ok, key=lambda s: (lfu and self.uses[self.key_of[s]], self.last_use[s]))
        """,
        "reserved slots",
    ),
    (
        "eviction",
        "ExpertCache._victim",
        """
        # LFU without the recency tie-break
        ok = [s for s in range(self.num_slots)
              if not self.pins[s] and (evict_reserved or not self.reserved[s])]
        free = [s for s in ok if self.key_of[s] is None]
        if free or not ok:
            return free[0] if free else None
        if self.eviction == "lru":
            return min(ok, key=lambda s: (self.reserved[s], self.last_use[s]))
        return min(ok, key=lambda s: (self.reserved[s], self.uses[self.key_of[s]]))
        """,
        "eviction orders",
    ),
    # time-model
    (
        "time-model",
        "LinkSpec.seconds",
        "return self.latency_us / 1e3 + nbytes / (self.gbps * 1e9)  # latency read as ms",
        "copy time",
    ),
    (
        "time-model",
        "LinkSpec.seconds",
        "return self.latency_us / 1e6 + nbytes / (self.gbps * 2**30)  # GiB, not GB",
        "copy time",
    ),
    (
        "time-model",
        "LinkSpec.seconds",
        "return 1e3 * (self.latency_us / 1e6 + nbytes / (self.gbps * 1e9))  # in ms",
        "copy time",
    ),
    (
        "time-model",
        "eq1_bound_ms",
        'return tpot_ms - sum(max(s["copy_ms"], s["compute_ms"]) for s in layers)',
        "Eq. 1 by hand",
    ),
    (
        "time-model",
        "eq1_bound_ms",
        'return tpot_ms - sum(s["copy_ms"] for s in layers)  # every copy hidden',
        "Eq. 1 by hand",
    ),
    # prefetch
    (
        "prefetch",
        "Scheduler._prefetch",
        """
        # waits for each copy to land before going on: nothing overlaps
        if prefetch is None:
            return
        layer, phase = prefetch.target, None
        if layer >= self.num_layers:
            layer, phase = layer - self.num_layers, "decode"
        st, copies = self.meter.layer(layer, phase), 0
        for e in prefetch.experts:
            slot = self.cache.lookup((layer, e))
            if slot is None:
                if self.depth is not None and copies >= self.depth:
                    continue
                slot = self._insert((layer, e), evict_reserved=False)
                if slot is None:
                    continue
                self._copy(layer, e, slot, "prefetch", st)
                self.landing[slot].compute_wait()  # so that it is there when needed
                self.unused_prefetch.add((layer, e))
                copies += 1
            self.cache.reserve(slot)
            self.reserved.setdefault(prefetch.target, []).append((layer, e))
        """,
        "copy/compute overlap",
    ),
    (
        "prefetch",
        "Scheduler._prefetch",
        """
        # a guess evicts reserved slots (evict_reserved=True)
        if prefetch is None:
            return
        layer, phase = prefetch.target, None
        if layer >= self.num_layers:
            layer, phase = layer - self.num_layers, "decode"
        st, copies = self.meter.layer(layer, phase), 0
        for e in prefetch.experts:
            slot = self.cache.lookup((layer, e))
            if slot is None:
                if self.depth is not None and copies >= self.depth:
                    continue
                slot = self._insert((layer, e), evict_reserved=True)
                if slot is None:
                    continue
                self._copy(layer, e, slot, "prefetch", st)
                self.unused_prefetch.add((layer, e))
                copies += 1
            self.cache.reserve(slot)
            self.reserved.setdefault(prefetch.target, []).append((layer, e))
        """,
        "one guess, step by step",
    ),
    (
        "prefetch",
        "Scheduler._prefetch",
        """
        # depth ignored: every guess copied
        if prefetch is None:
            return
        layer, phase = prefetch.target, None
        if layer >= self.num_layers:
            layer, phase = layer - self.num_layers, "decode"
        st = self.meter.layer(layer, phase)
        for e in prefetch.experts:
            slot = self.cache.lookup((layer, e))
            if slot is None:
                slot = self._insert((layer, e), evict_reserved=False)
                if slot is None:
                    continue
                self._copy(layer, e, slot, "prefetch", st)
                self.unused_prefetch.add((layer, e))
            self.cache.reserve(slot)
            self.reserved.setdefault(prefetch.target, []).append((layer, e))
        """,
        "one guess, step by step",
    ),
    (
        "prefetch",
        "Scheduler._prefetch",
        """
        # experts found in a slot are not reserved
        if prefetch is None:
            return
        layer, phase = prefetch.target, None
        if layer >= self.num_layers:
            layer, phase = layer - self.num_layers, "decode"
        st, copies = self.meter.layer(layer, phase), 0
        for e in prefetch.experts:
            if self.cache.lookup((layer, e)) is not None:
                continue
            if self.depth is not None and copies >= self.depth:
                continue
            slot = self._insert((layer, e), evict_reserved=False)
            if slot is None:
                continue
            self._copy(layer, e, slot, "prefetch", st)
            self.unused_prefetch.add((layer, e))
            copies += 1
            self.cache.reserve(slot)
            self.reserved.setdefault(prefetch.target, []).append((layer, e))
        """,
        "one guess, step by step",
    ),
    (
        "prefetch",
        "Scheduler._prefetch",
        """
        # experts found in a slot counted towards depth
        if prefetch is None:
            return
        layer, phase = prefetch.target, None
        if layer >= self.num_layers:
            layer, phase = layer - self.num_layers, "decode"
        st = self.meter.layer(layer, phase)
        for i, e in enumerate(prefetch.experts):
            if self.depth is not None and i >= self.depth:
                break
            slot = self.cache.lookup((layer, e))
            if slot is None:
                slot = self._insert((layer, e), evict_reserved=False)
                if slot is None:
                    continue
                self._copy(layer, e, slot, "prefetch", st)
                self.unused_prefetch.add((layer, e))
            self.cache.reserve(slot)
            self.reserved.setdefault(prefetch.target, []).append((layer, e))
        """,
        "one guess, step by step",
    ),
    (
        "prefetch",
        "Scheduler._prefetch",
        """
        # the next pass's layers (target >= num_layers) not mapped back
        if prefetch is None:
            return
        layer = prefetch.target
        st, copies = self.meter.layer(layer), 0
        for e in prefetch.experts:
            slot = self.cache.lookup((layer, e))
            if slot is None:
                if self.depth is not None and copies >= self.depth:
                    continue
                slot = self._insert((layer, e), evict_reserved=False)
                if slot is None:
                    continue
                self._copy(layer, e, slot, "prefetch", st)
                self.unused_prefetch.add((layer, e))
                copies += 1
            self.cache.reserve(slot)
            self.reserved.setdefault(prefetch.target, []).append((layer, e))
        """,
        "one guess, step by step",
    ),
    # router-pf
    (
        "router-pf",
        "quasi_hidden",
        "return model.layers[target].post_attention_layernorm(resid)  # no default vectors",
        "with default vectors",
    ),
    (
        "router-pf",
        "quasi_hidden",
        """
        x = resid
        if default_vectors is not None:
            v = default_vectors[layer][routing.ids]
            x = x + (routing.weights.to(v.dtype).unsqueeze(-1) * v).sum(dim=1)
        return model.layers[layer].post_attention_layernorm(x)  # layer l's norm, not t's
        """,
        "without default vectors",
    ),
    (
        "router-pf",
        "quasi_hidden",
        """
        x = resid
        if default_vectors is not None:
            v = default_vectors[layer][routing.ids]
            x = x + (routing.weights.unsqueeze(-1) * v).sum(dim=1)  # weights not cast
        return model.layers[target].post_attention_layernorm(x)
        """,
        "bf16 activations, fp32 routing weights",
    ),
    (
        "router-pf",
        "quasi_hidden",
        """
        x = resid
        if default_vectors is not None:
            v = default_vectors[target][routing.ids]  # the target layer's vectors
            x = x + (routing.weights.to(v.dtype).unsqueeze(-1) * v).sum(dim=1)
        return model.layers[target].post_attention_layernorm(x)
        """,
        "with default vectors",
    ),
    # speculative
    (
        "speculative",
        "speculates",
        'return speculate and phase == "decode" and guess is not None  # from layer 0 on',
        "when to speculate",
    ),
    (
        "speculative",
        "speculates",
        "return speculate and guess is not None and layer >= lookahead  # prefill too",
        "when to speculate",
    ),
    (
        "speculative",
        "PredictionHook.__call__",
        """
        # the decision written inline, without the layer >= lookahead rule
        predicted = self.pending.pop(layer, None)
        if predicted is not None:
            self.last_prediction[layer] = predicted
        else:
            self.last_prediction.pop(layer, None)
        d = self.predictor.lookahead if self.predictor is not None else 0
        use = self.speculate and self.phase == "decode" and predicted is not None
        routing = predicted if use else router(u)
        if self.predictor is not None:
            nxt = self.predictor.observe(layer, resid.reshape(u.shape), u, routing)
            if nxt is not None:
                self.pending[layer + d] = nxt
                if self.read_ids and routing.host_ids is None and u.shape[0] == 1:
                    both = torch.cat([routing.ids, nxt.ids]).tolist()
                    routing.host_ids, nxt.host_ids = both[:1], both[1:]
        return routing
        """,
        "a perfect guess",
    ),
    (
        "speculative",
        "PredictionHook.__call__",
        """
        # the decision written inline, speculating in a prefill too
        predicted = self.pending.pop(layer, None)
        if predicted is not None:
            self.last_prediction[layer] = predicted
        else:
            self.last_prediction.pop(layer, None)
        d = self.predictor.lookahead if self.predictor is not None else 0
        use = self.speculate and predicted is not None and layer >= d
        routing = predicted if use else router(u)
        if self.predictor is not None:
            nxt = self.predictor.observe(layer, resid.reshape(u.shape), u, routing)
            if nxt is not None:
                self.pending[layer + d] = nxt
                if self.read_ids and routing.host_ids is None and u.shape[0] == 1:
                    both = torch.cat([routing.ids, nxt.ids]).tolist()
                    routing.host_ids, nxt.host_ids = both[:1], both[1:]
        return routing
        """,
        "no speculation in a prefill",
    ),
    (
        "speculative",
        "PredictionHook.__call__",
        """
        # two host reads where one would do
        predicted = self.pending.pop(layer, None)
        if predicted is not None:
            self.last_prediction[layer] = predicted
        else:
            self.last_prediction.pop(layer, None)
        d = self.predictor.lookahead if self.predictor is not None else 0
        use = speculates(self.speculate, self.phase, layer, d, predicted)
        routing = predicted if use else router(u)
        if self.predictor is not None:
            nxt = self.predictor.observe(layer, resid.reshape(u.shape), u, routing)
            if nxt is not None:
                self.pending[layer + d] = nxt
                if self.read_ids and routing.host_ids is None and u.shape[0] == 1:
                    routing.host_ids = routing.ids.tolist()
                    nxt.host_ids = nxt.ids.tolist()
        return routing
        """,
        "one read for both",
    ),
    (
        "speculative",
        "PredictionHook.__call__",
        """
        # a Guess run as it is, sure or not (fail-safe ignored)
        predicted = self.pending.pop(layer, None)
        if predicted is not None:
            self.last_prediction[layer] = predicted
        else:
            self.last_prediction.pop(layer, None)
        d = self.predictor.lookahead if self.predictor is not None else 0
        use = speculates(self.speculate, self.phase, layer, d, predicted)
        routing = predicted if use else router(u)
        if self.predictor is not None:
            nxt = self.predictor.observe(layer, resid.reshape(u.shape), u, routing)
            if nxt is not None:
                self.pending[layer + d] = nxt
                if self.read_ids and routing.host_ids is None and u.shape[0] == 1:
                    both = torch.cat([routing.ids, nxt.ids]).tolist()
                    routing.host_ids, nxt.host_ids = both[:1], both[1:]
        return routing
        """,
        "fail-safe guesses",
    ),
    # distillation
    (
        "distillation",
        "kl_to_router",
        """
        log_p = torch.log_softmax(true_logits.float(), dim=-1)
        log_q = torch.log_softmax(logits.float(), dim=-1)
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1)  # KL(estimator || router)
        """,
        "the KL",
    ),
    (
        "distillation",
        "kl_to_router",
        """
        log_p = torch.log_softmax(true_logits, dim=-1)  # in the logits' dtype (bf16)
        log_q = torch.log_softmax(logits, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        """,
        "the KL",
    ),
    (
        "distillation",
        "train_estimator",
        """
        # no check of steps: steps=0 trains nothing and returns []
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(estimator.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        estimator.train()
        losses = []
        for _ in range(steps):
            loss = 0
            for t, (q, true_logits) in pairs.items():
                idx = torch.randint(q.shape[0], (batch_size,), generator=gen)
                loss = loss + kl_to_router(true_logits[idx], estimator(q[idx], t)).mean()
            loss = loss / len(pairs)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        estimator.eval()
        return losses
        """,
        "bad settings",
    ),
    (
        "distillation",
        "train_estimator",
        """
        # each step trains on one target layer only (the last one drawn)
        from tinymoe.errors import TinyMoeError

        if steps < 1:
            raise TinyMoeError("steps must be >= 1")
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(estimator.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        estimator.train()
        losses = []
        for _ in range(steps):
            for t, (q, true_logits) in pairs.items():
                idx = torch.randint(q.shape[0], (batch_size,), generator=gen)
                loss = kl_to_router(true_logits[idx], estimator(q[idx], t)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        estimator.eval()
        return losses
        """,
        "training",
    ),
]


@pytest.mark.parametrize(
    "exercise_id,name,body,fails",
    WRONG,
    ids=[f"{w[0]}-{i}" for i, w in enumerate(WRONG)],
)
def test_a_wrong_answer_fails_the_property_it_breaks(
    exercise_id, name, body, fails, tmp_path, capsys
):
    bodies = {**RIGHT[exercise_id], name: body}
    assert _check(tmp_path, exercise_id, bodies, fail_fast=True) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.startswith("  FAIL  ")]
    assert failed and failed[0].startswith(f"  FAIL  {fails}: "), out
    assert "Traceback" not in out and " raised " not in failed[0], out
