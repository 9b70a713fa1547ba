"""``modformer bench modularity``: the --tiny run through the registry (schema, headline keys) and the greedy
head-ablation helper on hand-made cases with a known answer."""

from __future__ import annotations

import json

import torch

import modformer as mf
from modformer.bench.studies.modularity import PROXIES, ablated_logits, effective_rank, greedy_head_ablation, summarise
from modformer.cli import main
from modformer.config import ModelConfig


def test_tiny_run_writes_schema_and_headline(tmp_path, capsys):
    assert main(["bench", "modularity", "--tiny", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = json.loads((tmp_path / "modularity.json").read_text())
    assert {"benchmark", "command", "device", "torch", "git_commit", "date", "headline", "rows"} <= set(data)
    assert data["benchmark"] == "modularity"
    rows = data["rows"]
    assert [(r["variant"], r["seed"]) for r in rows] == [("mha", 0), ("mla", 0)]
    for r in rows:                                     # --tiny: target 0, so every run goes through the proxies
        assert r["generalised"] and r["n_heads"] == 8 and 0 <= r["heads_needed"] <= 8
        assert 0 <= r["embedding_key_energy_share"] <= 1 and r["restricted_loss"] > 0
        assert len(r["single_head_ablation_acc"]) == 8
    assert rows[0]["ov_effective_rank"] > 1 and rows[1]["ov_effective_rank"] is None   # mla: no per-head W_V
    head = data["headline"]
    for key in ("per_variant", "most_modular", "proxies_agree", "resolved_proxies", "seeds", "ablation"):
        assert key in head
    assert set(head["per_variant"]) == {"mha", "mla"}
    assert set(head["per_variant"]["mha"]) >= set(PROXIES) | {"runs", "generalised"}
    assert head["most_modular"]["ov_effective_rank"]["variant"] == "mha"


def test_greedy_finds_the_one_head_that_matters():
    heads = [(layer, h) for layer in range(2) for h in range(4)]
    # only head 1.2 carries the behaviour; the others cost a little accuracy each (so order matters)
    cost = {hd: 0.01 * (i + 1) for i, hd in enumerate(heads)}

    def score(ablated):
        return 0.0 if (1, 2) in ablated else 1.0 - sum(cost[h] for h in ablated if h != (1, 2)) * 0.1

    out = greedy_head_ablation(score, heads, threshold=0.9)
    assert out["kept"] == [(1, 2)] and out["needed"] == 1
    assert len(out["removed"]) == 7 and (1, 2) not in out["removed"]
    assert out["removed"][0] == (0, 0)                 # least important first
    assert all(s >= 0.9 for s in out["scores"]) and out["base"] == 1.0


def test_greedy_stops_at_the_threshold_and_keeps_all_below_it():
    heads = [(0, h) for h in range(4)]
    # each removal costs 0.04: from 1.0, two removals keep >= 0.9, a third would give 0.88
    out = greedy_head_ablation(lambda ab: 1.0 - 0.04 * len(ab), heads, threshold=0.9)
    assert out["needed"] == 2 and len(out["removed"]) == 2
    # a model already below the threshold needs every head
    out = greedy_head_ablation(lambda ab: 0.5, heads, threshold=0.9)
    assert out["needed"] == 4 and out["removed"] == []


def test_mean_ablating_a_head_with_zero_output_weights_changes_nothing():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, n_layer=1, d_model=16, n_head=2, max_seq_len=3, norm="none")
    model = mf.build_model(cfg).eval()
    with torch.no_grad():
        model.blocks[0].attn.out.weight.view(16, 2, -1)[:, 1] = 0       # head 0.1 writes nothing
    x = torch.randint(0, 11, (32, 3))
    means = {0: torch.randn(2, 3, cfg.d_model // 2)}
    base = ablated_logits(model, x, frozenset(), means)
    assert torch.allclose(ablated_logits(model, x, frozenset({(0, 1)}), means), base)
    assert not torch.allclose(ablated_logits(model, x, frozenset({(0, 0)}), means), base)
    assert not torch.allclose(ablated_logits(model, x, frozenset({(0, 0)}), None), base)


def test_effective_rank_and_summary():
    assert abs(effective_rank(torch.diag(torch.tensor([1.0, 1.0, 1.0]))) - 3) < 1e-6
    assert abs(effective_rank(torch.outer(torch.ones(4), torch.arange(4.0))) - 1) < 1e-6
    rows = [{"variant": v, "seed": s, "generalised": True, "steps_to_target": 100, "heads_needed": n,
             **{k: 1.0 for k in PROXIES if k != "heads_needed"}}
            for v, ns in (("a", (1, 2)), ("b", (5, 6))) for s, n in enumerate(ns)]
    rows.append({"variant": "b", "seed": 9, "generalised": False, "steps_to_target": None})
    head = summarise(rows, ["a", "b"])
    assert head["per_variant"]["b"]["runs"] == 3 and head["per_variant"]["b"]["generalised"] == 2
    m = head["most_modular"]["heads_needed"]
    assert m["variant"] == "a" and m["median"] == 1.5 and m["resolved"]
    assert not head["most_modular"]["restricted_loss"]["resolved"]     # all equal: a tie, not a ranking
    # strict: a best median outside the other's range is not enough when the ranges overlap
    rows[1]["heads_needed"] = 5                                        # a: {1, 5}, median 3; b: {5, 6}
    assert not summarise(rows, ["a", "b"])["most_modular"]["heads_needed"]["resolved"]


def test_effective_heads_counts_where_the_damage_is():
    from modformer.bench.studies.modularity import effective_heads

    assert abs(effective_heads(1.0, [1.0, 0.2, 1.0, 1.0]) - 1) < 1e-9          # one head carries it all
    assert abs(effective_heads(1.0, [0.5, 0.5, 0.5, 0.5]) - 4) < 1e-9          # evenly spread
    assert effective_heads(1.0, [1.0, 1.0]) == 0.0
