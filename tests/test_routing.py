"""Routing with a varying number of experts (issue 29): top-p / threshold routing, its settings in PHATGOOSE's
ExpertLinear, c-BTM's mixture weights and the compose specs, and the routing-budget study."""

import copy
import json
import math

import pytest
import torch

import modformer as mf
from modformer.compose import gates as G
from modformer.compose.routing import (
    experts_used,
    mixture_weights,
    route_softmax,
    threshold_softmax,
    topk_softmax,
    topp_softmax,
)

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.65, 0.05]], dtype=torch.float64)
SCORES = PROBS.log()                                        # softmax(SCORES) == PROBS


def _renorm(row):
    t = torch.tensor(row, dtype=torch.float64)
    return t / t.sum()


# ---- the routing functions ------------------------------------------------------------------------
def test_topp_softmax_hand_computed():
    w = topp_softmax(SCORES, 0.6)          # row 0: 0.5 < 0.6 -> add 0.3; row 1: 0.65 >= 0.6 alone
    torch.testing.assert_close(w[0], _renorm([0.5, 0.3, 0, 0]))
    torch.testing.assert_close(w[1], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert experts_used(w) == 1.5
    w = topp_softmax(SCORES, 0.84)         # row 0: 0.5, 0.3 (0.8 < 0.84), 0.15; row 1: 0.65, 0.2
    torch.testing.assert_close(w[0], _renorm([0.5, 0.3, 0.15, 0]))
    torch.testing.assert_close(w[1], _renorm([0, 0.2, 0.65, 0]))
    torch.testing.assert_close(topp_softmax(SCORES, 0.4), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]],
                                                                       dtype=torch.float64))
    torch.testing.assert_close(topp_softmax(SCORES, 0.97, max_k=2)[0], _renorm([0.5, 0.3, 0, 0]))


def test_threshold_softmax_hand_computed():
    w = threshold_softmax(SCORES, 0.25)
    torch.testing.assert_close(w[0], _renorm([0.5, 0.3, 0, 0]))
    torch.testing.assert_close(w[1], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    w = threshold_softmax(SCORES, 0.12)
    torch.testing.assert_close(w[0], _renorm([0.5, 0.3, 0.15, 0]))
    torch.testing.assert_close(w[1], _renorm([0, 0.2, 0.65, 0]))
    assert experts_used(w) == 2.5
    assert experts_used(w, torch.tensor([3.0, 1.0])) == 2.75          # row-weighted (e.g. by tokens)
    only_best = threshold_softmax(SCORES, 0.9)                          # nobody reaches 0.9: the argmax stays
    torch.testing.assert_close(only_best, torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]], dtype=torch.float64))


def test_variable_routing_sums_to_one_keeps_one_and_all_at_the_limits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 9, 7, generator=g, dtype=torch.float64) * 3
    for w in [*(topp_softmax(s, p) for p in (1e-6, 0.3, 0.8, 0.99)),
              *(threshold_softmax(s, t) for t in (0.0, 0.05, 0.3, 1.0))]:
        torch.testing.assert_close(w.sum(-1), torch.ones(6, 9, dtype=torch.float64))
        assert ((w > 0).sum(-1) >= 1).all()
        assert torch.equal(w.argmax(-1), s.argmax(-1))                  # the most probable expert is always in
    full = torch.softmax(s, -1)
    assert torch.equal(topp_softmax(s, 1.0), full) and ((topp_softmax(s, 1.0) > 0).sum(-1) == 7).all()
    torch.testing.assert_close(threshold_softmax(s, 0.0), full)
    assert ((threshold_softmax(s, 0.0) > 0).sum(-1) == 7).all()
    assert ((topp_softmax(s, 1e-9) > 0).sum(-1) == 1).all()
    counts = (topp_softmax(s, 0.8) > 0).sum(-1)
    assert counts.min() < counts.max()                                  # the number of experts varies per row


def test_topp_keeps_the_smallest_sufficient_set():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(200, 6, generator=g, dtype=torch.float64) * 2
    probs = torch.softmax(s, -1)
    for p in (0.2, 0.5, 0.75, 0.9, 0.999):
        kept = topp_softmax(s, p) > 0
        mass = (probs * kept).sum(-1)
        assert (mass >= p - 1e-12).all()                                # the kept mass reaches p
        smallest = probs.masked_fill(~kept, float("inf")).min(-1).values
        dropped_best = probs.masked_fill(kept, -1.0).max(-1).values
        assert (smallest >= dropped_best).all()                         # the kept are the most probable
        several = kept.sum(-1) > 1
        assert (mass[several] - smallest[several] < p).all()            # one fewer would fall short of p


def test_topp_with_max_k_1_is_top_1_and_top_k_is_unchanged():
    s = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(topp_softmax(s, 0.9, max_k=1), topk_softmax(s, 1))
    assert ((topp_softmax(s, 0.99, max_k=3) > 0).sum(-1) <= 3).all()
    assert torch.equal(route_softmax(s, "top_k", top_k=2), topk_softmax(s, 2))
    assert torch.equal(route_softmax(s, "top_p", top_p=0.7), topp_softmax(s, 0.7))
    assert torch.equal(route_softmax(s, "threshold", threshold=0.2), threshold_softmax(s, 0.2))


def test_mixture_weights_top_p_and_threshold_hand_computed():
    emb, centres = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    e = torch.tensor([math.exp(-1), math.exp(-4), math.exp(-9)], dtype=torch.float64)   # T = 1: d^2 = 1, 4, 9
    probs = e / e.sum()                                                                  # 0.9523, 0.0474, 0.0002
    assert torch.allclose(mixture_weights(emb, centres, 1.0, top_p=0.9)[0], torch.tensor([1.0, 0.0, 0.0]))
    want = torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(1, dtype=torch.float64)]).float()
    assert torch.allclose(mixture_weights(emb, centres, 1.0, top_p=0.99)[0], want)
    assert torch.allclose(mixture_weights(emb, centres, 1.0, threshold=0.01)[0], want)
    assert torch.allclose(mixture_weights(emb, centres, 1.0, threshold=0.0)[0], probs.float())
    assert torch.equal(mixture_weights(emb, centres, 1.0, top_p=0.9999, top_k=1)[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(mixture_weights(emb, centres, 2.0, top_k=2), mixture_weights(emb, centres, 2.0, 2))


@pytest.mark.parametrize("call,match", [
    (lambda s: topp_softmax(s, 0.0), "top_p must be a number in \\(0, 1\\]"),
    (lambda s: topp_softmax(s, 1.5), "top_p"),
    (lambda s: topp_softmax(s, 0.5, max_k=0), "max_k"),
    (lambda s: threshold_softmax(s, -0.1), "threshold must be a number in \\[0, 1\\]"),
    (lambda s: threshold_softmax(s, "0.2"), "threshold"),
    (lambda s: route_softmax(s, "top_q"), "routing must be one of top_k, top_p, threshold"),
    (lambda s: route_softmax(s, "top_p"), "needs top_p"),
    (lambda s: mixture_weights(s, s, 1.0, top_p=0.5, threshold=0.1), "at most one"),
    (lambda s: mixture_weights(s, s, 1.0, top_k=2, threshold=0.1), "no top_k"),
])
def test_bad_routing_settings_raise_one_line(call, match):
    with pytest.raises(ValueError, match=match) as err:
        call(torch.randn(3, 4))
    assert "\n" not in str(err.value)


# ---- PHATGOOSE: ExpertLinear ------------------------------------------------------------------------
def _tiny_routed(routing="top_k", **kw):
    from modformer.compress import lora

    torch.manual_seed(0)
    base = mf.build_model(mf.ModelConfig(vocab_size=16, n_layer=2, d_model=32, n_head=4, max_seq_len=16)).eval()
    deltas = []
    for _ in range(4):
        pm = lora.add_lora(copy.deepcopy(base), r=2, targets=["qkv", "up"])
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        deltas.append(G.lora_deltas(pm))
    return base, deltas, G.attach_experts(base, deltas, top_k=2, routing=routing, **kw).eval()


def test_expert_linear_top_p_route_equals_hand_computed_mixture():
    base, deltas, model = _tiny_routed("top_p", top_p=0.6)
    path, m = next(iter(G.expert_linears(model).items()))
    with torch.no_grad():
        for p in m.gates:
            p.normal_(0.0, 1.0)                                # spread scores: varying experts per token
    lin = base.get_submodule(path)
    u = torch.randn(2, 5, m.base.in_features, generator=torch.Generator().manual_seed(3))
    d = u.shape[-1]
    v = torch.stack([p.detach() for p in m.gates])
    s = torch.nn.functional.layer_norm(u, (d,)) @ torch.nn.functional.layer_norm(v, (d,)).T / math.sqrt(d)
    probs = torch.softmax(s.double(), -1)
    want = lin(u).detach().clone()
    sizes = []
    for b in range(2):
        for t in range(5):
            order = probs[b, t].argsort(descending=True).tolist()
            kept, mass = [], 0.0
            for j in order:                                    # the fewest most probable reaching 0.6
                kept.append(j)
                mass += float(probs[b, t, j])
                if mass >= 0.6:
                    break
            sizes.append(len(kept))
            z = sum(float(probs[b, t, j]) for j in kept)
            for j in kept:
                dj = u[b, t] @ deltas[j][path]["down"].T @ deltas[j][path]["up"].T
                want[b, t] += float(probs[b, t, j]) / z * dj.detach()
    assert len(set(sizes)) > 1                                 # the case is not a fixed k in disguise
    with torch.no_grad():
        assert torch.allclose(m(u), want, atol=1e-4)
        m.routing, m.top_k = "top_k", 1                       # top-k untouched: k=1 is the argmax expert alone
        j = probs.argmax(-1)
        one = torch.stack([u[b, t] @ deltas[int(j[b, t])][path]["down"].T @ deltas[int(j[b, t])][path]["up"].T
                           for b in range(2) for t in range(5)]).view(2, 5, -1)
        assert torch.allclose(m(u), lin(u) + one, atol=1e-4)


def test_expert_linear_default_routing_is_top_k_and_records_experts_used():
    _, _, model = _tiny_routed()
    assert all(m.routing == "top_k" and m.top_p is None and m.threshold is None
               for m in G.expert_linears(model).values())
    x = torch.randint(0, 16, (3, 10))
    stats = G.routing_accuracy(model, x, torch.zeros(3, dtype=torch.long))
    assert stats["experts_used"] == 2.0
    with torch.no_grad():
        want = model(x)
        G.set_mode(model, "route", routing="top_p", top_p=1.0)       # p = 1: every expert...
        G.set_mode(model, "route", routing="top_k", top_k=4)         # ...is top-4 of 4
        all4 = model(x)
        G.set_mode(model, "route", routing="top_p", top_p=1.0)
        torch.testing.assert_close(model(x), all4, rtol=0, atol=1e-6)
        G.set_mode(model, "route", routing="top_k", top_k=2)
        assert torch.equal(model(x), want)
    G.set_mode(model, "route", routing="threshold", threshold=0.3)
    stats = G.routing_accuracy(model, x, torch.zeros(3, dtype=torch.long))
    assert 1.0 <= stats["experts_used"] <= 4.0
    assert 0.0 <= stats["routing_top1"] <= stats["routing_topk"] <= 1.0


@pytest.mark.parametrize("settings,match", [
    ({"routing": "nucleus"}, "routing must be one of"),
    ({"routing": "top_p"}, "routing 'top_p' needs top_p"),
    ({"routing": "top_p", "top_p": 1.5}, "top_p must be a number in"),
    ({"routing": "threshold", "threshold": -1}, "threshold must be a number in"),
])
def test_expert_linear_bad_routing_raises_one_line(settings, match):
    base, deltas, model = _tiny_routed()
    with pytest.raises(ValueError, match=match) as err:
        G.set_mode(model, "route", **settings)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=match):
        G.attach_experts(base, deltas[:2], **settings)


# ---- the compose specs --------------------------------------------------------------------------
def test_gates_spec_routing_keys():
    from modformer.compose import gates_run
    from modformer.compose.spec import merge

    g = gates_run.DEFAULTS["gates"]
    assert (g["top_p"], g["threshold"]) == (None, None)
    assert gates_run.routing_of(g) == ({"routing": "top_k"}, "top-2")
    assert gates_run.routing_of({**g, "top_p": 0.9}) == ({"routing": "top_p", "top_p": 0.9}, "top-p 0.9")
    assert gates_run.routing_of({**g, "threshold": 0.2}) == ({"routing": "threshold", "threshold": 0.2},
                                                              "threshold 0.2")
    for bad, match in [({"top_p": 0}, "gates.top_p"), ({"threshold": 2}, "gates.threshold"),
                       ({"top_p": 0.5, "threshold": 0.1}, "exclusive"), ({"top_k": 0}, "gates.top_k")]:
        with pytest.raises(ValueError, match=match) as err:
            gates_run.run(merge(gates_run.DEFAULTS, {"gates": bad, "out_dir": "/nonexistent/never"}))
        assert "\n" not in str(err.value)


def test_cbtm_spec_routing_keys():
    from modformer.compose import cbtm
    from modformer.compose.spec import merge

    assert cbtm.DEFAULTS["eval"]["top_p"] == [] and cbtm.DEFAULTS["eval"]["threshold"] == []
    cbtm.check_eval(merge(cbtm.DEFAULTS, {"eval": {"top_p": [0.9, 1], "threshold": [0, 0.1]}}))
    for bad, match in [({"top_p": [1.2]}, "eval.top_p must be a number in"),
                       ({"top_p": 0.9}, "eval.top_p must be a list"),
                       ({"threshold": [-0.1]}, "eval.threshold"), ({"top_k": [0]}, "eval.top_k")]:
        with pytest.raises(ValueError, match=match) as err:
            cbtm.run(merge(cbtm.DEFAULTS, {"eval": bad, "out_dir": "/nonexistent/never"}))
        assert "\n" not in str(err.value)


# ---- the study ----------------------------------------------------------------------------------
def test_routing_budget_tiny_through_the_registry(tmp_path):
    from modformer.bench import registry

    assert registry.run("routing-budget", ["--tiny", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]) == 0
    res = json.loads((tmp_path / "routing_budget.json").read_text())
    assert {"benchmark", "command", "device", "git_commit", "headline", "rows"} <= set(res)
    h = res["headline"]
    for key in ("cbtm_top_k_nll", "cbtm_top_p_matched_delta_nll", "cbtm_threshold_matched_delta_nll",
                "cbtm_best_variable_nll", "cbtm_variable_beats_top_k_nll", "cbtm_matched_verdict_nll",
                "gates_top_k_acc", "gates_top_k_loss", "gates_matched_verdict_acc", "gates_top_p_matched_delta_acc",
                "gates_variable_beats_top_k_acc", "verdict", "total_seconds"):
        assert key in h, key
    assert set(h["cbtm_top_k_nll"]) == {"1", "2", "3"}
    assert "variable routing beats fixed top-k" in h["verdict"]
    variable = [r for r in res["rows"] if r["routing"] != "top_k" and "experts_used" in r]
    assert variable and all({"delta_nll", "se_nll"} <= set(r) or {"delta_acc", "delta_loss"} <= set(r)
                            for r in variable)
    assert all(1.0 <= r["experts_used"] <= 3.0 for r in res["rows"] if "experts_used" in r)
    assert res["setups"]["cbtm"]["experts"] == 3 and res["setups"]["gates"]["experts"] == 3


def test_routing_budget_help_has_an_example(capsys):
    from modformer.bench.studies import routing_budget

    with pytest.raises(SystemExit):
        routing_budget.main(["--help"])
    text = capsys.readouterr().out
    assert "modformer bench routing-budget --tiny" in text and "--top-p" in text
