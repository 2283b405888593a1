"""The route recorder (speculation/recording.py): what it keeps, and that it changes nothing."""

import torch
from conftest import make_checkpoint

from tinymoe import generate, load_model
from tinymoe.speculation.oracle import record_routing
from tinymoe.speculation.recording import RouteRecorder


def test_recorder_keeps_each_forwards_routing_and_leaves_the_model_exact(tmp_path):
    model = load_model(make_checkpoint(tmp_path / "m"))
    ids = torch.arange(10).view(2, 5)
    with torch.no_grad():
        exact = model(ids)
        with RouteRecorder().installed(model) as recorder:
            assert torch.equal(model(ids), exact)
            model(ids[:, :3])
    assert model.route_hook is None  # the previous hook (none) is back
    assert len(recorder.forwards) == 2
    assert all(len(f) == model.cfg.num_layers for f in recorder.forwards)
    first = recorder.forwards[0][1]
    assert first.ids.shape == (10, model.cfg.top_k) and first.logits.shape == (10, 8)
    assert recorder.forwards[1][0].ids.shape == (6, model.cfg.top_k)


def test_keep_gets_every_layers_state_and_nothing_is_kept_besides(tmp_path):
    model = load_model(make_checkpoint(tmp_path / "m"))
    seen = []

    def keep(layer, resid, u, routing):
        seen.append((layer, resid.shape, u.shape, routing.ids.shape))

    sentinel = object()
    model.route_hook = sentinel  # whatever was installed comes back, even after an error
    recorder = RouteRecorder(keep)
    try:
        with recorder.installed(model):
            model(torch.arange(4).view(1, 4))
            raise KeyError("boom")
    except KeyError:
        pass
    assert model.route_hook is sentinel
    D, K = model.cfg.hidden_size, model.cfg.top_k
    assert seen == [(layer, (4, D), (4, D), (4, K)) for layer in range(model.cfg.num_layers)]
    assert recorder.forwards == []


def test_record_routing_matches_plain_generation(tmp_path):
    model = load_model(make_checkpoint(tmp_path / "m"))
    want = generate(model, [1, 2, 3], 4, eos_ids=()).tokens
    out, forwards = record_routing(model, [1, 2, 3], 4, eos_ids=())
    assert out.tokens == want and model.route_hook is None
    assert len(forwards) == 4  # the prefill, then one forward per new token but the last
    assert forwards[0][0].ids.shape[0] == 3 and forwards[1][0].ids.shape[0] == 1
