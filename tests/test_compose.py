"""Composition of experts (issue 10): routing math, balanced k-means, gates, CALM, the compose CLI."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import modformer as mf
from modformer.cli import main
from modformer.compose import gates as G
from modformer.compose.cluster import Clusterer, balanced_assign, balanced_kmeans
from modformer.compose.routing import mixture_weights, topk_softmax
from modformer.config import DataConfig, TrainConfig
from modformer.data import build_dataset
from modformer.layers.attention.cross import CrossAttention
from modformer.models.composed import CALM, default_connections


def tiny_gpt(vocab: int = 16, d: int = 32, seq: int = 16, **kw) -> torch.nn.Module:
    return mf.build_model(mf.ModelConfig(vocab_size=vocab, n_layer=2, d_model=d, n_head=4, max_seq_len=seq, **kw))


# ---- routing math ---------------------------------------------------------------------------------
def test_topk_softmax_sums_to_one_and_keeps_k():
    s = torch.randn(5, 7, 6)
    for k in (1, 2, 3, None):
        w = topk_softmax(s, k)
        assert torch.allclose(w.sum(-1), torch.ones(5, 7))
        nz = (w > 0).sum(-1)
        assert (nz == (k or 6)).all()
        if k:   # the kept experts are the k best scores
            kept = w.topk(k, -1).indices.sort(-1).values
            assert torch.equal(kept, s.topk(k, -1).indices.sort(-1).values)


def test_mixture_weights_hand_computed():
    emb, centres = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    w = mixture_weights(emb, centres, temperature=1.0)                       # d^2 = 1, 4, 9
    e = torch.tensor([math.exp(-1), math.exp(-4), math.exp(-9)])
    assert torch.allclose(w[0], e / e.sum())
    w2 = mixture_weights(emb, centres, temperature=2.0, top_k=2)            # softmax(-d^2 / 2) over the 2 nearest
    e2 = torch.tensor([math.exp(-0.5), math.exp(-2.0)])
    assert torch.allclose(w2[0], torch.cat([e2 / e2.sum(), torch.zeros(1)]))
    assert torch.equal(mixture_weights(emb, centres, 0.1, top_k=1)[0], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        mixture_weights(emb, centres, 0.0)


# ---- clustering -----------------------------------------------------------------------------------
def test_balanced_kmeans_balances_skewed_data():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(90, 4, generator=g) * 0.1, torch.randn(13, 4, generator=g) * 0.1 + 5])
    centres, labels = balanced_kmeans(x, 4)
    sizes = torch.bincount(labels, minlength=4)
    assert sizes.sum() == 103 and set(sizes.tolist()) <= {25, 26}
    assert centres.shape == (4, 4)
    sizes = torch.bincount(balanced_assign(torch.rand(10, 3, generator=g)), minlength=3)
    assert sorted(sizes.tolist()) == [3, 3, 4]


def test_clusterer_finds_domains_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 20, 200) if i % 2 else rng.integers(20, 40, 200) for i in range(40)]
    cl, labels = Clusterer.fit(docs, 40, k=2, dim=4)
    truth = torch.tensor([i % 2 for i in range(40)])
    assert (labels == truth).all() or (labels == 1 - truth).all()
    cl2 = Clusterer.load(cl.save(tmp_path / "c"))
    assert torch.allclose(cl2.embed(docs), cl.embed(docs))
    assert torch.equal(cl2.assign(cl2.embed(docs)), labels)


def test_cluster_shard_holds_its_documents(tmp_path):
    opts = {"doc_examples": 4, "train_docs": 6, "val_docs": 2}
    base = build_dataset(DataConfig(name="taskmix", seq_len=16, options=opts))
    labels = [0, 1, 0, 1, 1, 0]
    (tmp_path / "a.json").write_text(json.dumps({"doc_len": base.doc_len, "clusters": labels}))
    shard = build_dataset(DataConfig(name="cbtm_shard", seq_len=16, options={
        "source": {"name": "taskmix", "options": opts}, "assignments": str(tmp_path / "a.json"), "cluster": 1}))
    docs = base.documents("train")
    assert np.array_equal(shard.stream("train"), np.concatenate([docs[1], docs[3], docs[4]]))
    assert np.array_equal(shard.stream("val"), base.stream("val"))


# ---- PHATGOOSE gates ------------------------------------------------------------------------------
def _lora_experts(base, n=3, r=2):
    from modformer.compress import lora

    out = []
    for _ in range(n):
        pm = lora.add_lora(copy.deepcopy(base), r=r, targets=["qkv", "up"])
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        out.append((pm, G.lora_deltas(pm)))
    return out


def test_expert_modes_match_peft_and_routing_respects_top_k():
    base = tiny_gpt().eval()
    experts = _lora_experts(base)
    model = G.attach_experts(base, [d for _, d in experts], top_k=2).eval()
    x = torch.randint(0, 16, (3, 10))
    G.set_mode(model, "base")
    assert torch.allclose(model(x), base(x), atol=1e-6)
    for j, (pm, _) in enumerate(experts):
        G.set_mode(model, "expert", j)
        assert torch.allclose(model(x), pm(x), atol=1e-5)
    for granularity in ("token", "prefix"):
        G.set_mode(model, "route", granularity=granularity)
        for m in G.expert_linears(model).values():
            m.record = True
        model(x)
        for m in G.expert_linears(model).values():
            assert m.last_top.shape == (3, 10, 2)
            inp = torch.randn(3, 10, m.base.in_features)
            w = topk_softmax(m.scores(inp) / m.temperature, m.top_k)
            assert torch.allclose(w.sum(-1), torch.ones(3, 10)) and ((w > 0).sum(-1) == 2).all()
    # prefix routing is causal: token t's scores depend on tokens <= t only
    m = next(iter(G.expert_linears(model).values()))
    m.granularity = "prefix"
    a = torch.randn(1, 8, m.base.in_features)
    b = a.clone()
    b[:, 5:] = torch.randn(1, 3, m.base.in_features)
    assert torch.equal(m.scores(a)[:, :5], m.scores(b)[:, :5])


def test_routed_model_with_left_padding_equals_each_row_alone():
    """model(idx, attention_mask=...) of a gated model: padding stays out of the prefix mean, so a left-padded
    row's logits (real positions) equal the row's own (fp32, 1e-5: a few ulps of the tiny model's sums)."""
    from modformer.models.generation import left_pad

    base = tiny_gpt().eval()
    model = G.attach_experts(base, [d for _, d in _lora_experts(base)], top_k=2).eval()
    rows = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1], [8, 2, 8, 1, 8]]
    idx, mask = left_pad(rows, pad_id=0)
    for granularity in ("token", "prefix"):
        G.set_mode(model, "route", granularity=granularity)
        with torch.no_grad():
            batched = model(idx, attention_mask=mask)
            for i, row in enumerate(rows):
                alone = model(torch.tensor([row]))
                assert torch.allclose(batched[i, -len(row):], alone[0], atol=1e-5), (granularity, i)


def test_phatgoose_gate_and_route_match_the_paper():
    """Muqeeth et al. 2024: training  W u + sigmoid(v_j . u) B_j A_j u  (expert j frozen); inference:
    standardise u and every v_j, s_j = u_hat . v_hat_j / sqrt(d), softmax over the top-2 s_j."""
    base = tiny_gpt().eval()
    deltas = [d for _, d in _lora_experts(base, n=4)]
    model = G.attach_experts(base, deltas, top_k=2).eval()
    path, m = next(iter(G.expert_linears(model).items()))
    with torch.no_grad():
        for p in m.gates:
            p.normal_(0.0, 1.0).add_(3.0)                  # a large shared mean: standardisation must remove it
    u = torch.randn(2, 5, m.base.in_features) * 4 + 2
    lin = base.get_submodule(path)

    def delta(j):
        return u @ deltas[j][path]["down"].T @ deltas[j][path]["up"].T

    v = torch.stack([p.detach() for p in m.gates])
    with torch.no_grad():
        m.mode, m.expert = "gated", 1                      # gate training: expert 1 alone, raw (unnormalised) u
        want = lin(u) + torch.sigmoid(u @ v[1])[..., None] * delta(1)
        assert torch.allclose(m(u), want, atol=1e-5)
        m.mode = "route"
        d = u.shape[-1]
        s = F.layer_norm(u, (d,)) @ F.layer_norm(v, (d,)).T / math.sqrt(d)          # (2, 5, E)
        top = s.topk(2, -1)
        assert torch.allclose(m.scores(u), s, atol=1e-4)
        w = torch.softmax(top.values, -1)                                              # (2, 5, 2)
        dk = torch.stack([delta(j) for j in range(4)], -2)                             # (2, 5, E, out)
        picked = torch.stack([dk[b, t, top.indices[b, t]] for b in range(2) for t in range(5)]).view(2, 5, 2, -1)
        want = lin(u) + (w[..., None] * picked).sum(-2)
        assert torch.allclose(m(u), want, atol=1e-4)


@pytest.mark.parametrize("joint,top_k", [(False, 2), (True, 2), (True, 1)])
def test_gate_training_changes_only_gates(joint, top_k):
    base = tiny_gpt(d=32)
    model = G.attach_experts(base, [d for _, d in _lora_experts(base)], top_k=top_k)
    frozen = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()] if "gates" not in n}
    gates_before = [p.clone() for p in G.gate_parameters(model)]
    data = [build_dataset(DataConfig(name="multitask", options={"tasks": [t], "n_examples": 64, "length": 3}))
            for t in ("copy", "reverse", "sort")]
    mixture = build_dataset(DataConfig(name="multitask", options={"tasks": ["copy", "reverse", "sort"],
                                                                  "n_examples": 64, "length": 3}))
    losses = G.train_gates(model, data, TrainConfig(batch_size=16), steps=3, lr=1e-2, joint=joint, mixture=mixture)
    assert len(losses) == 9
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if "gates" not in n:
            assert torch.equal(t, frozen[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(gates_before, G.gate_parameters(model)))   # top-1 too
    assert all(m.top_k == top_k for m in G.expert_linears(model).values())                  # inference k kept
    acc = G.routing_accuracy(model, mixture.get_batch("val", 0, torch.Generator())[0],
                             torch.zeros(mixture.split_size("val"), dtype=torch.long))
    assert 0.0 <= acc["routing_top1"] <= acc["routing_topk"] <= 1.0


# ---- CALM -----------------------------------------------------------------------------------------
def test_cross_attention_is_causal():
    xa = CrossAttention(32, 4, d_memory=24, zero_init=False)
    x, mem = torch.randn(2, 9, 32), torch.randn(2, 9, 24)
    y = xa(x, mem)
    x2, mem2 = x.clone(), mem.clone()
    x2[:, 6:], mem2[:, 6:] = torch.randn(2, 3, 32), torch.randn(2, 3, 24)
    assert torch.allclose(xa(x2, mem2)[:, :6], y[:, :6], atol=1e-6)
    assert not torch.allclose(xa(x2, mem2)[:, 6:], y[:, 6:])


def test_default_connections():
    assert default_connections(4, 4, 1) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert default_connections(4, 2, 2) == [(1, 0), (3, 1)]
    assert default_connections(2, 3, 2) == [(1, 0)]


def test_calm_zero_init_is_anchor_then_trains_only_bridges():
    from modformer.compress.finetune import finetune

    anchor, aug = tiny_gpt(vocab=108, seq=8).eval(), tiny_gpt(vocab=108, d=48, seq=8).eval()
    calm = CALM(anchor, aug, every=1, n_head=4)
    x = torch.randint(0, 108, (4, 8))
    assert torch.equal(calm(x), anchor(x))
    before = {n: p.clone() for n, p in calm.named_parameters() if not n.startswith("bridges")}
    data = build_dataset(DataConfig(name="kv_arith", options={"n_keys": 40, "p": 7, "n_examples": 64, "n_val": 16}))
    finetune(calm, data, TrainConfig(batch_size=16, lr=1e-2), steps=3)
    for n, p in calm.named_parameters():
        if not n.startswith("bridges"):
            assert torch.equal(p, before[n]), n
    assert not torch.equal(calm(x), anchor(x))
    y = calm(x)                                            # the composition is still a causal LM
    x2 = x.clone()
    x2[:, 5:] = torch.randint(0, 108, (4, 3))
    assert torch.allclose(calm(x2)[:, :5], y[:, :5], atol=1e-5)


def test_calm_vocab_readout_feeds_the_augmenting_models_prediction_as_an_anchor_soft_token():
    """readout='vocab': each bridge also sees softmax(augmenting logits) @ anchor token table; still exactly the
    anchor at zero init, still only bridges train; a confident augmenting prediction is that token's embedding."""
    from modformer.compress.finetune import finetune

    anchor, aug = tiny_gpt(vocab=108, seq=8).eval(), tiny_gpt(vocab=108, d=48, seq=8).eval()
    calm = CALM(anchor, aug, every=1, n_head=4, readout="vocab")
    assert calm.bridges[0].proj.in_features == 48 + anchor.cfg.d_model
    x = torch.randint(0, 108, (4, 8))
    assert torch.equal(calm(x), anchor(x))

    class Confident(torch.nn.Module):                      # logits that put all mass on token 5
        def forward(self, h):
            return torch.nn.functional.one_hot(torch.full(h.shape[:-1], 5), 108).float() * 100

    real_head = aug.lm_head
    aug.lm_head = Confident()
    soft = calm.soft_tokens(torch.randn(2, 3, 48))
    torch.testing.assert_close(soft, anchor.tok_emb.weight[5].detach().expand(2, 3, -1))
    aug.lm_head = real_head
    frozen = {n: p.clone() for n, p in calm.named_parameters() if not n.startswith("bridges")}
    data = build_dataset(DataConfig(name="kv_arith", options={"n_keys": 40, "p": 7, "n_examples": 64, "n_val": 16}))
    finetune(calm, data, TrainConfig(batch_size=16, lr=1e-2), steps=3)
    assert all(torch.equal(p, frozen[n]) for n, p in calm.named_parameters() if not n.startswith("bridges"))
    assert not torch.equal(calm(x), anchor(x))
    with pytest.raises(ValueError, match="readout"):
        CALM(anchor, aug, readout="logits")


def test_kv_tasks_share_a_template():
    opts = {"n_keys": 40, "p": 7}
    arith = build_dataset(DataConfig(name="kv_arith", options={**opts, "n_examples": 50, "n_val": 20}))
    anchor = build_dataset(DataConfig(name="kv_anchor", options=opts))
    assert arith.vocab_size == anchor.vocab_size and arith.seq_len == anchor.seq_len == 8
    train_keys = {tuple(r) for r in arith._x["train"][:, :3].tolist()}
    val_keys = {tuple(r) for r in arith._x["val"][:, :3].tolist()}
    assert not train_keys & val_keys                         # held-out keys never appear in training


# ---- the CLI --------------------------------------------------------------------------------------
def _write(tmp_path, name, spec):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


TINY_TRAIN = {"batch_size": 16, "eval_every": 1000, "eval_batches": 1, "progress": False, "tensorboard": False,
              "sample_tokens": 0}


def test_cli_gates_and_calm(tmp_path, capsys):
    model = {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 16}
    cfg = _write(tmp_path, "g", {"name": "g", "out_dir": str(tmp_path), "data": {"n_examples": 40, "length": 3},
                                 "base": {"model": model, "train": {**TINY_TRAIN, "steps": 3}},
                                 "experts": {"tasks": ["reverse", "sort"], "steps": 2},
                                 "gates": {"steps": 2, "variants": ["independent/token", "joint/prefix"]}})
    assert main(["compose", "gates", cfg, "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "g" / "gates.json").read_text())
    assert {"routed_acc", "oracle_acc", "relative_to_oracle", "multitask_acc"} <= set(res["headline"])
    assert len(res["rows"]) == 5
    model = {**model, "max_seq_len": 8}
    cfg = _write(tmp_path, "c", {"name": "c", "out_dir": str(tmp_path),
                                 "data": {"n_keys": 30, "p": 5, "n_examples": 40, "n_val": 20, "aug_examples": 50},
                                 "anchor": {"model": model, "train": {**TINY_TRAIN, "steps": 2}},
                                 "augmenting": {"model": model, "train": {**TINY_TRAIN, "steps": 2}},
                                 "calm": {"steps": 2, "n_head": 2}})
    assert main(["compose", "calm", cfg, "calm.every=1"]) == 0
    head = json.loads((tmp_path / "c" / "calm.json").read_text())["headline"]
    assert {"composed_acc", "anchor_acc", "augmenting_acc", "finetune_acc", "lora_acc"} <= set(head)
    bridges = load_file(tmp_path / "c" / "bridges.safetensors")   # the trained bridges, no pickle
    assert bridges and all(k.split(".")[0].isdigit() for k in bridges)
    assert not list((tmp_path / "c").glob("*.pt"))
    assert main(["compose", "calm", cfg, "calm.evry=1"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_calm_shared_base_starts_both_models_from_the_base(tmp_path):
    """base: a run on kv_mix (both tasks' examples); anchor and augmenting start from its weights."""
    mix = build_dataset(DataConfig(name="kv_mix", options={"p": 5, "n_keys": 30, "n_examples": 50}))
    anchor = build_dataset(DataConfig(name="kv_anchor", options={"p": 5, "n_keys": 30}))
    aug = build_dataset(DataConfig(name="kv_aug", options={"p": 5, "n_keys": 30, "n_examples": 50}))
    assert mix.vocab_size == anchor.vocab_size == aug.vocab_size
    for split in ("train", "val"):
        assert torch.equal(mix._x[split], torch.cat([anchor._x[split], aug._x[split]]))
    model = {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 8}
    spec = {"name": "cb", "out_dir": str(tmp_path), "device": "cpu",
            "data": {"n_keys": 30, "p": 5, "n_examples": 40, "n_val": 20, "aug_examples": 50},
            "base": {"train": {**TINY_TRAIN, "steps": 3}},
            "anchor": {"model": model, "train": {**TINY_TRAIN, "steps": 1, "lr": 0.0}},
            "augmenting": {"model": model, "train": {**TINY_TRAIN, "steps": 1, "lr": 0.0}},
            "calm": {"steps": 1, "n_head": 2}, "baselines": {"finetune": False, "lora": False}}
    from modformer.compose import calm
    from modformer.compose.spec import merge
    from modformer.runs import run_config, run_model

    calm.run(merge(calm.DEFAULTS, spec))
    runs = tmp_path / "cb" / "runs"
    base = run_model(runs / "base").state_dict()
    for name in ("anchor", "augmenting"):      # one step at lr 0: the base's weights exactly
        assert run_config(runs / name).train.init_from == str(runs / "base")
        for k, v in run_model(runs / name).state_dict().items():
            torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    bad = {**spec, "augmenting": {"model": {**model, "d_model": 32}, "train": spec["augmenting"]["train"]}}
    with pytest.raises(mf.ConfigError, match="augmenting.model must equal base.model"):
        calm.run(merge(calm.DEFAULTS, bad))


def test_cli_cbtm(tmp_path):
    run = {"model": {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 28},
           "data": {"name": "taskmix", "seq_len": 28,
                    "options": {"doc_examples": 4, "train_docs": 12, "val_docs": 3, "tasks": ["copy", "sort"]}},
           "train": {**TINY_TRAIN, "threads": 1}}
    cfg = _write(tmp_path, "b", {"name": "b", "out_dir": str(tmp_path), "run": run,
                                 "cluster": {"k": 2, "dim": 4, "doc_len": 56}, "experts": {"steps": 2, "workers": 2},
                                 "eval": {"max_tokens": 0, "context": 28}})
    assert main(["compose", "cbtm", cfg, "--stage", "cluster,plan"]) == 0
    jobs = (tmp_path / "b" / "jobs.txt").read_text().splitlines()
    assert len(jobs) == 3 and all(j.startswith("modformer train ") for j in jobs)
    assert main(["compose", "cbtm", cfg, "--stage", "train,eval", "dense.train=false"]) == 0
    res = json.loads((tmp_path / "b" / "cbtm.json").read_text())
    methods = [r["method"] for r in res["rows"]]
    assert "c-BTM top-2" in methods and "uniform ensemble" in methods
    assert all(r["ppl"] > 1 for r in res["rows"])


def test_cbtm_train_stage_gives_each_concurrent_job_its_own_gpu(tmp_path, monkeypatch):
    """With GPUs listed, concurrent expert jobs get distinct CUDA_VISIBLE_DEVICES and every job runs once."""
    from modformer.compose import cbtm

    launched = []

    class FakeProc:
        def __init__(self, cmd, stdout=None, stderr=None, env=None):
            self.gpu = env["CUDA_VISIBLE_DEVICES"]
            busy = [p.gpu for p in launched if p.polls < 2]
            assert self.gpu not in busy, "a GPU was given to two running jobs"
            self.polls, self.returncode = 0, 0
            launched.append(self)

        def poll(self):
            self.polls += 1
            return 0 if self.polls >= 2 else None

    monkeypatch.setattr(cbtm.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(cbtm.time, "sleep", lambda s: None)
    configs = {f"expert{i}": tmp_path / f"expert{i}.yaml" for i in range(5)}
    seconds = cbtm.train_stage(configs, tmp_path, workers=4, gpus=[0, 1])
    assert sorted(seconds) == sorted(configs) and len(launched) == 5
    assert {p.gpu for p in launched} == {"0", "1"}


def test_cbtm_parallel_benchmark_trains_the_same_experts_in_parallel(tmp_path):
    """`modformer bench cbtm-parallel --tiny`: 2 expert processes at once give the sequential run's mixture."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "par.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "modformer.cli", "bench", "cbtm-parallel", "--tiny", "--out", str(out),
                          "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    par, seq = result["rows"]
    assert (par["workers"], seq["workers"]) == (2, 1) and par["experts"] == seq["experts"] == 2
    assert par["mixture_ppl"] == pytest.approx(seq["mixture_ppl"], rel=1e-6)
    assert result["headline"]["speedup"] == seq["train_wall_s"] / par["train_wall_s"]


def test_calm_bridge_optimizer_options_reach_only_the_bridges(tmp_path, monkeypatch):
    """calm.optimizer / momentum / weight_decay configure the bridges' optimizer; the baselines keep AdamW."""
    import importlib

    from modformer.compose import calm
    from modformer.compose.spec import merge

    tr = importlib.import_module("modformer.train.trainer")   # finetune() runs the Trainer, which builds it
    seen = []
    real = tr.build_optimizer
    monkeypatch.setattr(tr, "build_optimizer", lambda model, cfg: seen.append(cfg) or real(model, cfg))
    model = {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 8}
    spec = {"name": "co", "out_dir": str(tmp_path), "device": "cpu",
            "data": {"n_keys": 30, "p": 5, "n_examples": 40, "n_val": 20, "aug_examples": 50},
            "anchor": {"model": model, "train": {**TINY_TRAIN, "steps": 1}},
            "augmenting": {"model": model, "train": {**TINY_TRAIN, "steps": 1}},
            "calm": {"steps": 2, "n_head": 2, "optimizer": "sgd", "momentum": 0.8, "weight_decay": 0.5, "lr": 0.1},
            "baselines": {"finetune": True, "lora": False}}
    calm.run(merge(calm.DEFAULTS, spec))
    bridge, baseline = seen[-2:]                   # after the anchor's and the augmenting model's runs
    assert (bridge.optimizer, bridge.betas[0], bridge.weight_decay, bridge.lr) == ("sgd", 0.8, 0.5, 0.1)
    assert (baseline.optimizer, baseline.weight_decay) == ("adamw", 0.0)
