"""Interpretability: weight extraction, factored circuits, copying, composition, head detectors, Fourier,
gradient flow, the HTML page and the ``circuits`` command."""

import json
import math
import re
import shutil
import subprocess

import pytest
import torch

import modformer as mf
from modformer import interp
from modformer.interp import fourier, heads, viz
from modformer.interp.weights import ModelWeights


def tiny(**kw) -> mf.ModelConfig:
    base = dict(vocab_size=37, n_layer=2, d_model=32, n_head=4, max_seq_len=32, attn_only=True)
    base.update(kw)
    return mf.ModelConfig(**base)


def randomized(cfg: mf.ModelConfig) -> torch.nn.Module:
    model = mf.build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")) else 0.0, 0.3)
    return model


def induction_model(V: int = 16, T: int = 24, c: float = 100.0) -> torch.nn.Module:
    """A hand-wired 2-layer attention-only induction circuit (no norms, no biases).

    Residual = [token one-hot (V) | position one-hot (T) | previous-token one-hot (V)].
    L0H0 attends to the previous position and copies its token into the previous-token slot;
    L1H0 attends where the previous token equals the current token (K-composition) and copies that
    position's token to the output (position 0, whose "previous token" is itself, is vetoed).
    L0H1 and L1H1 are zero.
    """
    D, Dh, H = 2 * V + T, T, 2
    model = mf.build_model(mf.ModelConfig(vocab_size=V, n_layer=2, d_model=D, n_head=H, d_head=Dh, max_seq_len=T,
                                          attn_only=True, norm="none", bias=False, tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_emb.weight[:, :V] = torch.eye(V)
        model.position.wpe.weight[:, V:V + T] = torch.eye(T)
        k0, v0 = H * Dh, 2 * H * Dh                          # first k / v row of the fused qkv weight
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        for i in range(T):
            a0.qkv.weight[i, V + i] = c                      # query: my position i
            if i + 1 < Dh:
                a0.qkv.weight[k0 + i + 1, V + i] = 1.0       # key: position j answers query j + 1
        for v in range(V):
            a0.qkv.weight[v0 + v, v] = 1.0                   # value: the token
            a0.out.weight[V + T + v, v] = 1.0                # -> previous-token slot
            a1.qkv.weight[v, v] = c                          # query: my token
            a1.qkv.weight[k0 + v, V + T + v] = 1.0           # key: my previous token
            a1.qkv.weight[v0 + v, v] = 1.0                   # value: the token
            a1.out.weight[v, v] = 10.0                       # -> token slot, outweighing my own token
            a1.qkv.weight[Dh - 1, v] = c                     # query: a constant (every token) ...
        a1.qkv.weight[k0 + Dh - 1, V] = -1.0                 # ... that vetoes position 0 (no previous token)
        model.lm_head.weight[:, :V] = torch.eye(V)
    return model


# ---- weights --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"norm": "rmsnorm"}, {"norm": "none", "rezero": True},
                                {"attention": "gqa", "n_kv_heads": 2}, {"bias": False}, {"position": "sinusoidal"},
                                {"attn_only": False}])
@pytest.mark.parametrize("fold", [True, False])
def test_extracted_weights_reproduce_attention(kw, fold):
    model = randomized(tiny(**kw))
    idx = torch.randint(0, 37, (2, 12))
    _, cache = model.run_with_cache(idx)
    w = interp.extract_weights(model, fold_ln=fold)
    assert w.W_Q.shape == (2, 4, 32, 8) and w.W_O.shape == (2, 4, 8, 32) and w.W_U.shape == (32, 37)
    for layer in range(2):
        x = cache[f"blocks.{layer}.hook_resid_pre"]
        x = interp.normalize(x, w.input_norm) if fold else model.blocks[layer].ln1(x)
        out, pattern = interp.attention_forward(w, layer, x)
        torch.testing.assert_close(out, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(pattern, cache[f"blocks.{layer}.attn.hook_pattern"], atol=1e-6, rtol=1e-5)


def test_folded_unembed_gives_the_same_log_probs():
    model = randomized(tiny())
    idx = torch.randint(0, 37, (2, 10))
    logits, cache = model.run_with_cache(idx)
    w = interp.extract_weights(model, fold_ln=True, center_writing=True, center_unembed=True)
    resid = cache["blocks.1.hook_resid_post"]
    mine = interp.normalize(resid, "layernorm") @ w.W_U + w.b_U
    torch.testing.assert_close(mine.log_softmax(-1), logits.log_softmax(-1), atol=1e-5, rtol=1e-5)
    assert w.W_U.mean(-1).abs().max() < 1e-6 and w.W_E.mean(-1).abs().max() < 1e-6



def test_embedding_matrix_is_what_the_residual_stream_receives():
    """With scale_embeddings, W_E includes the sqrt(d) factor: row t equals hook_embed at token t."""
    model = randomized(tiny(scale_embeddings=True))
    idx = torch.randint(0, 37, (1, 10))
    _, cache = model.run_with_cache(idx)
    w = interp.extract_weights(model, fold_ln=False)
    torch.testing.assert_close(w.W_E[idx[0]], cache["hook_embed"][0])

# ---- circuits -------------------------------------------------------------------------------------

def test_factored_circuits_equal_explicit_products():
    w = interp.extract_weights(randomized(tiny()))
    qk, ov = interp.qk_circuit(w), interp.ov_circuit(w)
    assert qk.shape == (2, 4, 37, 37)
    for layer, head in [(0, 1), (1, 3)]:
        E = w.W_E
        QK = E @ w.W_Q[layer, head] @ w.W_K[layer, head].T @ E.T
        OV = E @ w.W_V[layer, head] @ w.W_O[layer, head] @ w.W_U
        torch.testing.assert_close(qk[layer, head].full(), QK, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ov[layer, head].full(), OV, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ov[layer, head].rows([3, 5]), OV[[3, 5]], atol=1e-4, rtol=1e-4)
        f = ov[layer, head]
        assert float(f.norm()) == pytest.approx(float(OV.norm()), rel=1e-4)
        assert float(f.mean()) == pytest.approx(float(OV.mean()), abs=1e-5)
        assert float(f.std()) == pytest.approx(float(OV.std(unbiased=False)), rel=1e-4)
        torch.testing.assert_close(f.singular_values(), torch.linalg.svdvals(OV)[:8], atol=1e-4, rtol=1e-3)
        big = torch.linalg.eigvals(OV.double())
        big = big[big.abs().argsort(descending=True)][:8]             # the rest are ~0 (rank 8)
        small = f.eigenvalues()
        dist = (small[:, None] - big[None, :]).abs()                  # match as sets (conjugate pairs)
        assert dist.min(1).values.max() < 1e-4 * big.abs().max() and dist.min(0).values.max() < 1e-4 * big.abs().max()


def _weights(W_E: torch.Tensor, W_V: torch.Tensor, W_O: torch.Tensor, W_U: torch.Tensor) -> ModelWeights:
    L, H, D, Dh = W_V.shape
    z = torch.zeros
    return ModelWeights(W_E=W_E, W_pos=None, W_Q=torch.randn(L, H, D, Dh), W_K=torch.randn(L, H, D, Dh), W_V=W_V,
                        W_O=W_O, b_Q=z(L, H, Dh), b_K=z(L, H, Dh), b_V=z(L, H, Dh), b_O=z(L, D), W_U=W_U,
                        b_U=z(W_U.shape[1]))


def test_copying_score_of_identity_and_negative_identity_heads():
    V, D, Dh = 50, 24, 6
    W_E = torch.randn(V, D)
    P = torch.linalg.qr(torch.randn(D, Dh)).Q                      # orthonormal (D, Dh)
    W_V = torch.stack([P, P, torch.randn(D, Dh)])[None]            # (1, 3, D, Dh)
    W_O = torch.stack([P.T, -P.T, torch.randn(Dh, D)])[None]
    w = _weights(W_E, W_V, W_O, W_E.T.clone())                     # OV = (W_E P)(W_E P)^T, +-
    s = interp.copying_scores(w)[0]
    assert s[0] == pytest.approx(1.0, abs=1e-6)
    assert s[1] == pytest.approx(-1.0, abs=1e-6)
    assert abs(float(s[2])) < 0.9


# ---- composition ----------------------------------------------------------------------------------

def test_comp_score_formula_on_hand_built_matrices():
    D = 16
    eye = torch.eye(D)
    assert float(interp.comp_score(eye, eye)) == pytest.approx(1 / math.sqrt(D))
    e0, e1 = torch.zeros(D, D), torch.zeros(D, D)
    e0[0, 1], e1[1, 2] = 1.0, 1.0                                  # A writes dir 1, B reads dir 1
    assert float(interp.comp_score(e0, e1)) == pytest.approx(1.0)
    assert float(interp.comp_score(e1, e0)) == pytest.approx(0.0)  # B reads dir 2: orthogonal


def test_low_rank_composition_matches_dense_formula_and_baseline():
    w = interp.extract_weights(randomized(tiny(n_layer=3)), fold_ln=True)
    QK, OV = w.QK(), w.OV()
    scores = interp.all_composition_scores(w)
    for mode, right in (("q", QK), ("k", QK.transpose(-1, -2)), ("v", OV)):
        for (l1, h1, l2, h2) in [(0, 0, 1, 2), (0, 3, 2, 1), (1, 1, 2, 0)]:
            dense = float(interp.comp_score(OV[l1, h1], right[l2, h2]))
            assert float(scores[mode][l1, h1, l2, h2]) == pytest.approx(dense, rel=1e-4)
        assert float(scores[mode][1, 0, 0, 0]) == 0.0 and float(scores[mode][1, 0, 1, 2]) == 0.0
    base = interp.composition_baseline(32, 8, n_samples=200)
    g = torch.Generator().manual_seed(5)
    f = [torch.randn(200, 32, 8, generator=g) for _ in range(4)]
    mc = interp.comp_score(f[0] @ f[1].transpose(1, 2), f[2] @ f[3].transpose(1, 2))      # dense, independent draws
    assert base == pytest.approx(float(mc.mean()), abs=0.02) and 0 < base < 1
    sub = interp.composition_scores(w, "k", baseline=True)
    torch.testing.assert_close(sub[0, :, 1:], scores["k"][0, :, 1:] - interp.composition_baseline(32, 8))


# ---- head detectors on a hand-wired induction circuit --------------------------------------------

def test_repeated_tokens_from_a_pool_of_frequent_tokens():
    stream = torch.tensor([5, 5, 5, 2, 2, 7, 7, 7, 7, 1])
    assert interp.frequent_tokens(stream, 3, 10).tolist() == [7, 5, 2]
    pool = torch.tensor([3, 9, 4, 6, 8])
    idx = heads.repeated_random_tokens(10, 4, batch=6, seed=0, pool=pool)
    assert idx.shape == (6, 8) and torch.equal(idx[:, :4], idx[:, 4:])
    assert set(idx.flatten().tolist()) <= set(pool.tolist())
    assert all(len(set(row[:4].tolist())) == 4 for row in idx)          # distinct within a half
    small = heads.repeated_random_tokens(10, 4, batch=2, pool=torch.tensor([1, 2]))   # pool < length: repeats
    assert set(small.flatten().tolist()) <= {1, 2}
    s = interp.head_scores(induction_model(), length=12, batch=8, token_pool=torch.arange(4, 16))
    assert s["induction"][1, 0] > 0.99


def test_detectors_find_the_hand_built_induction_circuit():
    model = induction_model()
    idx = heads.repeated_random_tokens(16, 12, batch=8, seed=1)
    logits = model(idx)
    assert (logits[:, 12:-1].argmax(-1) == idx[:, 13:]).all()     # it really does induction
    s = interp.head_scores(model, length=12, batch=8)
    assert s["prev_token"][0, 0] > 0.99 and s["induction"][1, 0] > 0.99
    assert s["induction"][0, 0] < 0.1 and s["prev_token"][1, 0] < 0.1
    assert s["duplicate_token"].max() < 0.2
    assert s["copying"][1, 0] == pytest.approx(1.0, abs=1e-5) and s["copying_rank"][1, 0] > 0.95
    assert s["positional"][0, 0] > 0.99 and s["positional"][1, 0] < 0.7     # content-dependent
    w = interp.extract_weights(model)
    k = interp.composition_scores(w, "k", baseline=True)
    assert k[0, 0, 1, 0] == k.max() and k[0, 0, 1, 0] > 0.03 > k[0, 1, 1, 0]   # K-comp singles out L0H0 -> L1H0
    raw = interp.all_composition_scores(w)
    assert float(raw["k"][0, 0, 1, 0]) == pytest.approx(1 / math.sqrt(32), rel=1e-4)   # by hand: 4c / (4 c sqrt 32)
    assert float(raw["q"][0, 0, 1, 0]) == pytest.approx(0.0, abs=1e-6)  # L1H0 queries never read the prev slot
    rows = interp.head_table(s)
    assert len(rows) == 4 and rows[2]["name"] == "L1H0" and rows[2]["induction"] > 0.99
    trig = interp.skip_trigrams(w, 1, 0, k=3)
    assert all(t.src == t.out for t in trig)                      # the copying head's OV: src -> src


def test_induction_breakdown_accounts_for_every_attended_position():
    """Hand-made patterns (L=1, H=3) over T=8 with length 4: each head's rows split into the named categories."""
    T, n = 8, 4
    pats = torch.zeros(1, 2, 3, T, T)
    for t in range(T):
        pats[0, :, 0, t, max(t - n + 1, 0)] = 1.0                        # a perfect induction head
        pats[0, :, 1, t, 0] = 0.5                                        # half to position 0 ...
        pats[0, :, 1, t, t] += 0.5                                       # ... half to itself
        pats[0, :, 2, t, : t + 1] = 1.0 / (t + 1)                        # uniform over the prefix
    b = heads.induction_breakdown(pats, n)
    total = sum(b.values())
    torch.testing.assert_close(total, torch.ones(1, 3))
    assert b["induction"][0, 0] == 1.0 and b["induction"][0, 0] == heads.induction_scores(pats, n)[0, 0]
    assert b["self"][0, 1] == 0.5
    assert b["first_position"][0, 1] == 0.375 and b["duplicate"][0, 1] == 0.125   # at t=4 position 0 is t-L
    uniform = torch.tensor([1 / (t + 1) for t in range(n, T)]).mean()
    torch.testing.assert_close(b["induction"][0, 2], uniform)
    # unnamed first-half sources: t=4 {2}, t=5 {3}, t=6 {1}, t=7 {1, 2}
    torch.testing.assert_close(b["other_first_half"][0, 2], torch.tensor((1 / 5 + 1 / 6 + 1 / 7 + 2 / 8) / 4))


# ---- Fourier --------------------------------------------------------------------------------------

def test_fourier_key_frequencies_and_restricted_excluded_loss():
    p = 31
    x = torch.arange(p, dtype=torch.float64)
    cols = [torch.cos(2 * math.pi * 3 * x / p), torch.sin(2 * math.pi * 3 * x / p),
            2 * torch.cos(2 * math.pi * 7 * x / p), 2 * torch.sin(2 * math.pi * 7 * x / p)]
    W_E = torch.cat([torch.stack(cols, 1), 0.05 * torch.randn(p, 12, dtype=torch.float64)], 1).float()
    norms = fourier.frequency_norms(W_E)
    assert fourier.key_frequencies(norms) == [3, 7] and fourier.key_frequencies(norms, k=1) == [7]
    basis, names, _ = fourier.fourier_basis(p)
    torch.testing.assert_close(basis @ basis.T, torch.eye(p, dtype=torch.float64), atol=1e-10, rtol=0)
    a, b, c = torch.meshgrid(x, x, x, indexing="ij")
    logits = sum(8 * torch.cos(2 * math.pi * k * (a + b - c) / p) for k in (3, 7)).float()
    logits = logits + 0.3 * torch.randn(p, p, p)
    assert fourier.key_frequencies(fourier.logit_frequency_norms(logits)) == [3, 7]
    labels = fourier._labels(p, 1)
    full = float(torch.nn.functional.cross_entropy(logits.reshape(p * p, p), labels))
    restricted = fourier.restricted_loss(logits, [3, 7])
    excluded = fourier.excluded_loss(logits, [3, 7], mask=torch.rand(p, p) < 0.3)
    assert restricted < full + 0.01 and full < 0.3
    assert excluded > math.log(p) - 0.2


# ---- gradient flow and attention statistics ------------------------------------------------------

def test_grad_flow_flags():
    model = mf.build_model(tiny())
    idx = torch.randint(0, 37, (2, 8))
    model.loss(idx, idx).backward()
    report = interp.grad_flow(model)
    assert set(report["norms"]) >= {"tok_emb", "position", "blocks.0", "blocks.1", "ln_f"}
    assert report["bad"] == []
    for p in model.blocks[0].parameters():
        p.grad.zero_()
    model.blocks[1].attn.qkv.weight.grad.mul_(1e9)
    flags = interp.grad_flow(model)["flags"]
    assert flags["blocks.0"] == "vanishing" and flags["blocks.1"] == "exploding"
    model.ln_f.weight.grad[0] = float("nan")
    assert interp.grad_flow(model)["flags"]["ln_f"] == "nonfinite"


def test_attention_entropy_and_distance():
    T = 6
    prev = torch.zeros(1, 1, T, T)
    prev[0, 0, 0, 0] = 1
    prev[0, 0, torch.arange(1, T), torch.arange(T - 1)] = 1
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    assert float(interp.attention_distance(prev)[0]) == pytest.approx((T - 1) / T)
    assert float(interp.attention_entropy(prev)[0]) == pytest.approx(0.0, abs=1e-6)
    ent = float(interp.attention_entropy(uniform[None, None])[0])
    assert ent == pytest.approx(sum(math.log(k) for k in range(1, T + 1)) / T, rel=1e-5)


# ---- HTML ------------------------------------------------------------------------------------------

def test_html_is_self_contained_and_holds_every_head(tmp_path):
    model = induction_model()
    idx = heads.repeated_random_tokens(16, 10, batch=1, seed=3)
    pats = heads.stack_patterns(heads.attention_patterns(model, idx), 2)[:, 0]
    toks = [f"t{int(i)}" for i in idx[0]]
    table = interp.head_table(interp.head_scores(model, length=10, batch=4))
    path = viz.attention_html(toks, pats, tmp_path / "a.html", title="x</script>", table=table)
    page = path.read_text()
    assert not re.search(r"https?://", page) and "<link" not in page and " src=" not in page
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1)
    data = json.loads(blob.replace("<\\/", "</"))
    assert data["tokens"] == toks and len(data["patterns"]) == 2 and len(data["patterns"][1]) == 2
    torch.testing.assert_close(torch.tensor(data["patterns"]), pats, atol=6e-4, rtol=0)
    assert {r["name"] for r in data["table"]} == {"L0H0", "L0H1", "L1H0", "L1H1"}
    assert "x&lt;/script&gt;" in page
    node = shutil.which("node")
    if node:                                                       # the inline script at least parses
        js = page.rsplit("<script>", 1)[1].split("</script>", 1)[0]
        (tmp_path / "page.js").write_text(js)
        assert subprocess.run([node, "--check", str(tmp_path / "page.js")], capture_output=True).returncode == 0


# ---- training callbacks and the `circuits` command -----------------------------------------------

def test_monitors_during_training_and_circuits_cli(tmp_path, capsys):
    from modformer.cli import main
    from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from modformer.train.trainer import Trainer

    cfg = RunConfig(name="c", out_dir=str(tmp_path),
                    model=ModelConfig(n_layer=2, d_model=32, n_head=2, max_seq_len=8, attn_only=True),
                    data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                    train=TrainConfig(steps=4, batch_size=32, eval_every=4, eval_batches=0, progress=False,
                                      tensorboard=False, device="cpu", grad_accum=2))
    trainer = Trainer(cfg)
    flow = interp.GradFlowMonitor(trainer.raw_model, every=2)
    stats = interp.AttentionStatsMonitor(torch.randint(0, 13, (4, 3)), every=2)
    trainer.callbacks += [flow, stats]
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "c" / "gradflow.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert set(rows[0]["norms"]) >= {"tok_emb", "blocks.0", "blocks.1"} and all(
        v > 0 for v in rows[0]["norms"].values())
    att = [json.loads(line) for line in (tmp_path / "c" / "attention_stats.jsonl").read_text().splitlines()]
    assert len(att) == 2 and torch.tensor(att[0]["entropy"]).shape == (2, 2)

    html = tmp_path / "page.html"
    assert main(["circuits", str(tmp_path / "c"), "--html", str(html)]) == 0
    out = tmp_path / "c" / "circuits"
    for name in ("head_scores.json", "head_scores.md", "plots/ov_eigenvalues.png", "plots/head_scores.png",
                 "plots/composition.png", "plots/fourier.png", "plots/patterns.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "head_scores.json").read_text())
    assert len(summary["heads"]) == 4 and {"induction", "prev_token", "copying"} <= set(summary["heads"][0])
    assert len(summary["fourier"]["logit_norms"]) == 7 and "restricted_loss" in summary["fourier"]
    assert "<script" in html.read_text() and str(html) in capsys.readouterr().out
    assert main(["circuits", str(tmp_path / "missing")]) == 2


def test_analyze_falls_back_to_patterns_for_variants_without_per_head_weights(tmp_path):
    model = mf.build_model(tiny(attention="mla", n_layer=1)).eval()
    summary = interp.analyze(model, tmp_path)
    assert "weight-based circuits skipped" in summary["notes"][0] and "copying" not in summary["heads"][0]
    assert (tmp_path / "circuits.html").is_file() and "induction" in summary["heads"][0]
    with pytest.raises(ValueError, match="per-head"):
        interp.extract_weights(mf.build_model(tiny(attention="talking_heads")))
