"""Attention / FFN variants (issue 5): mla, moa, talking_heads, multichannel, moe, DenseFormer.

Causality and cache consistency for every variant, the s=1 multichannel equivalence, MoE routing,
capacity and aux loss, MLA's latent-only cache, parameter-count formulas, DenseFormer identity at
init, hook points, YAML selection, and a short overfitting run per variant.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_cache_matches_full_forward

import modformer as mf
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_config
from modformer.layers.attention.mha import MultiHeadAttention
from modformer.layers.attention.multichannel import MultiChannelMixer
from modformer.layers.context import Context
from modformer.layers.ffn import MLP
from modformer.layers.moe import MoE
from modformer.layers.norm import build_norm
from modformer.layers.position import Position
from modformer.train.logging import read_metrics
from modformer.train.trainer import Trainer

V = 37


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, d_model=32, n_head=4, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


# name -> config overrides; every test below runs over these
VARIANTS = {
    "mla": dict(attention="mla"),
    "mla_q_gqa": dict(attention="mla", n_kv_heads=2, attention_options={"q_lora_rank": 16, "kv_lora_rank": 12}),
    "moa": dict(attention="moa"),
    "talking_heads": dict(attention="talking_heads", n_kv_heads=2),
    "multichannel": dict(attention="multichannel", attn_only=True, n_kv_heads=2),
    "multichannel_max_shared": dict(attention="multichannel", attn_only=True,
                                    attention_options={"n_channels": 3, "merge": "max", "shared_mlp": True,
                                                       "channel_heads": 2}),
    "multichannel_mean": dict(attention="multichannel", attn_only=True, attention_options={"merge": "mean"}),
    "moe": dict(ffn="moe", ffn_options={"n_experts": 4, "top_k": 2, "n_shared": 1}),
    "denseformer": dict(model_options={"denseformer": True}),
}


def variant(name: str, **kw) -> ModelConfig:
    cfg = dict(VARIANTS[name])
    cfg.update(kw)
    return tiny(**cfg)


def perturb(model: torch.nn.Module) -> None:
    """Move identity-initialised parameters (DWA weights, talking-heads maps) off their init."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "alphas" in name or "mix_" in name:
            with torch.no_grad():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "none"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name, position):
    model = mf.build_model(variant(name, n_layer=1 if name != "denseformer" else 3, position=position)).eval()
    perturb(model)
    idx = torch.randint(0, V, (2, 12))
    t = 6
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, V, (2, 12 - t - 1))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("placement", ["post", "sandwich"])
@pytest.mark.parametrize("name", ["mla", "moa", "talking_heads", "multichannel", "moe"])
def test_causality_other_norm_placements(name, placement):
    model = mf.build_model(variant(name, n_layer=1, position="rope", norm="rmsnorm",
                                   norm_placement=placement)).eval()
    idx = torch.randint(0, V, (2, 10))
    changed = idx.clone()
    changed[:, 6:] = (idx[:, 6:] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :6], model(changed)[:, :6], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_matches_full_forward(name, static, position):
    model = mf.build_model(variant(name, position=position)).eval()
    perturb(model)
    assert assert_cache_matches_full_forward(model, V, static).length == 15


@pytest.mark.parametrize("name", ["mla", "moa", "multichannel"])
def test_backends_agree(name):
    ref = mf.build_model(variant(name, position="alibi", attn_backend="eager")).eval()
    idx = torch.randint(0, V, (2, 11))
    with torch.no_grad():
        want = ref(idx)
        for backend in ("sdpa", "flex"):
            model = mf.build_model(variant(name, position="alibi", attn_backend=backend)).eval()
            model.load_state_dict(ref.state_dict())
            torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hook_points_and_pattern_path(name):
    """Caching hook_pattern (eager path) gives the same logits as the fast path; hooks are present."""
    model = mf.build_model(variant(name, position="rope")).eval()
    perturb(model)
    idx = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        fast = model(idx)
        logits, acts = model.run_with_cache(idx)
    torch.testing.assert_close(logits, fast, atol=1e-5, rtol=1e-5)
    patterns = [k for k in acts if k.endswith("hook_pattern")]
    assert patterns and all(k.replace("hook_pattern", h) in acts for k in patterns for h in ("hook_q", "hook_z"))
    for k in patterns:                                   # rows of every pattern sum to one
        if "blocks.0.attn" in k and name != "talking_heads":
            torch.testing.assert_close(acts[k].sum(-1), torch.ones_like(acts[k].sum(-1)))


def test_talking_heads_at_init_equals_mha_and_mixing_matters():
    idx = torch.randint(0, V, (2, 10))
    mha = mf.build_model(tiny(position="alibi", attn_backend="eager")).eval()
    th = mf.build_model(tiny(position="alibi", attention="talking_heads")).eval()
    missing = th.load_state_dict(mha.state_dict(), strict=False).missing_keys
    assert sorted({k.rsplit(".", 1)[1] for k in missing}) == ["mix_logits", "mix_weights"]
    with torch.no_grad():
        torch.testing.assert_close(th(idx), mha(idx), atol=1e-5, rtol=1e-5)
        perturb(th)
        assert not torch.allclose(th(idx), mha(idx), atol=1e-3)


# ---- multichannel --------------------------------------------------------------------------------

def _ctx(T: int, cfg: ModelConfig) -> Context:
    return Context(pos=torch.arange(T), position=Position(cfg))


@pytest.mark.parametrize("merge", ["softmax", "mean", "max"])
def test_multichannel_one_channel_equals_attention_plus_mlp(merge):
    """s=1: the mixer is exactly a = mha(u); a + mlp(ln(u + a)) with the same weights."""
    cfg = tiny(norm="layernorm", ffn="gelu", d_ff=48)
    mixer = MultiChannelMixer(cfg, 0, n_channels=1, channel_heads=4, merge=merge).eval()
    attn, ln, mlp = MultiHeadAttention(cfg, 0), build_norm(cfg), MLP(cfg, F.gelu)
    ch = mixer.channels[0]
    for dst, src in ((attn, ch.attn), (ln, ch.ln), (mlp, ch.mlp)):
        for p in src.parameters():
            torch.nn.init.normal_(p, std=0.3)
        dst.load_state_dict(src.state_dict())
    u = torch.randn(2, 9, 32)
    with torch.no_grad():
        a = attn(u, _ctx(9, cfg))
        torch.testing.assert_close(mixer(u, _ctx(9, cfg)), a + mlp(ln(u + a)), atol=1e-5, rtol=1e-5)


def test_multichannel_one_channel_model_equals_standard_gpt():
    """Without norms the s=1 mixer model (attn_only) equals the standard attention + MLP GPT."""
    std = mf.build_model(tiny(norm="none", position="rope")).eval()
    mc = mf.build_model(tiny(norm="none", position="rope", attention="multichannel", attn_only=True,
                             attention_options={"n_channels": 1, "channel_heads": 4})).eval()
    state = {}
    for k, v in std.state_dict().items():
        k = k.replace(".attn.", ".attn.channels.0.attn.").replace(".mlp.", ".attn.channels.0.mlp.")
        state[k] = v
    mc.load_state_dict(state)
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(mc(idx), std(idx), atol=1e-5, rtol=1e-5)


def test_multichannel_merges():
    cfg = tiny()
    u = torch.randn(2, 5, 32)
    outs, acts = {}, {}
    for merge in ("softmax", "mean", "max"):
        torch.manual_seed(0)
        mixer = MultiChannelMixer(cfg, 0, n_channels=2, merge=merge).eval()
        acts.clear()
        mixer.hook_channels.add_hook(lambda x, hk: acts.__setitem__("ch", x))
        mixer.hook_merge.add_hook(lambda x, hk: acts.__setitem__("w", x))
        with torch.no_grad():
            outs[merge] = mixer(u, _ctx(5, cfg))
        y = acts["ch"]
        if merge == "max":
            torch.testing.assert_close(outs[merge], y.amax(2))
        else:
            w = acts["w"]
            torch.testing.assert_close(w.sum(-1), torch.ones(2, 5))
            assert (w >= 0).all()
            torch.testing.assert_close(outs[merge], (w.unsqueeze(-1) * y).sum(2))


# ---- MoE ------------------------------------------------------------------------------------------

def moe_layer(**kw) -> MoE:
    opts = dict(n_experts=4, top_k=2)
    opts.update(kw)
    return MoE(tiny(), **opts)


def test_moe_routing_respects_top_k():
    seen = {}
    for k in (1, 2, 3):
        moe = moe_layer(top_k=k).eval()
        moe.hook_gates.add_hook(lambda x, hk: seen.__setitem__("g", x))
        moe(torch.randn(3, 7, 32))
        gates = seen["g"]
        assert ((gates != 0).sum(-1) == k).all()
        if k > 1:
            torch.testing.assert_close(gates.sum(-1), torch.ones(3, 7))


def test_moe_matches_dense_reference():
    """The dispatch loop equals a dense per-token reference sum over the chosen experts."""
    moe = moe_layer(n_shared=1).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = moe(x)
        probs = moe.router(x).softmax(-1)
        gate, idx = probs.topk(2, -1)
        gate = gate / gate.sum(-1, keepdim=True)
        b_up, b_down = moe.b_up.view(4, -1), moe.b_down.view(4, -1)
        ref = moe.shared_mlp(x)
        for e in range(4):
            h = F.gelu(x @ moe.w_up[e] + b_up[e]) @ moe.w_down[e] + b_down[e]
            ref = ref + h * (gate * (idx == e)).sum(-1, keepdim=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_is_differentiable_and_reaches_the_model():
    model = mf.build_model(variant("moe", ffn_options={"n_experts": 4, "top_k": 2, "aux_loss_weight": 0.1,
                                                       "z_loss_weight": 1e-3}))
    model(torch.randint(0, V, (2, 10)))
    layers = [b.mlp for b in model.blocks]
    torch.testing.assert_close(model.aux_loss, sum(m.aux_loss for m in layers))
    assert model.aux_loss.item() >= 0.1 * 0.99        # E * sum f P >= 1 (equality when balanced)
    model.aux_loss.backward()
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in layers)
    plain = mf.build_model(tiny())
    plain(torch.randint(0, V, (1, 4)))
    assert plain.aux_loss is None and plain.aux_stats == {}


def test_moe_capacity_overflow_is_counted_never_silent():
    moe = moe_layer(capacity_factor=0.5, n_shared=1).train()
    x = torch.randn(4, 8, 32)
    seen = {}
    moe.hook_gates.add_hook(lambda g, hk: seen.__setitem__("g", g))
    out = moe(x)
    N, k, E = 32, 2, 4
    cap = math.ceil(0.5 * N * k / E)
    _, idx = moe.router(x).softmax(-1).topk(k, -1)
    counts = torch.bincount(idx.flatten(), minlength=E)
    want = int((counts - cap).clamp(min=0).sum())
    assert want > 0 and int(moe.aux_stats["moe_overflow"]) == want
    assert int(moe.aux_stats["moe_assignments"]) == N * k
    kept = (seen["g"] != 0).sum(0).sum(0)            # assignments served per expert
    assert int(kept.max()) <= cap and int((seen["g"] != 0).sum()) == N * k - want
    # a token whose every assignment overflowed gets exactly the shared expert's output
    dropped = (seen["g"] == 0).all(-1)
    if dropped.any():
        with torch.no_grad():
            torch.testing.assert_close(out[dropped], moe.shared_mlp(x)[dropped])
    moe.eval()
    moe(x)
    assert int(moe.aux_stats["moe_overflow"]) == 0      # evaluation routes every token


def test_moe_capacity_is_causal_in_training():
    torch.manual_seed(0)
    model = mf.build_model(variant("moe", n_layer=1, ffn_options={"n_experts": 4, "top_k": 2,
                                                                  "capacity_factor": 0.5})).train()
    idx = torch.randint(0, V, (3, 12))
    changed = idx.clone()
    changed[:, 7:] = (idx[:, 7:] + 5) % V
    with torch.no_grad():
        a = model(idx)
        assert int(model.aux_stats["moe_overflow"]) > 0
        b = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])


def test_trainer_adds_and_logs_aux_loss(tmp_path):
    cfg = RunConfig(name="moe", out_dir=str(tmp_path),
                    model=ModelConfig(n_layer=1, d_model=32, n_head=2, max_seq_len=8, ffn="moe",
                                      ffn_options={"n_experts": 4, "top_k": 1, "capacity_factor": 1.0}),
                    data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                    train=TrainConfig(steps=4, batch_size=16, eval_every=4, eval_batches=1, log_every=2,
                                      progress=False, tensorboard=False, device="cpu"))
    Trainer(cfg).fit()
    rows = [r for r in read_metrics(tmp_path / "moe" / "metrics.jsonl") if r["split"] == "train"]
    assert rows and all(r["aux_loss"] > 0 and "moe_overflow" in r and r["moe_assignments"] == 48 for r in rows)


# ---- MLA cache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True])
def test_mla_cache_holds_only_the_latent(static):
    H, Dh, L, dc, dr = 4, 8, 2, 12, 4
    mla = mf.build_model(tiny(attention="mla", position="rope",
                              attention_options={"kv_lora_rank": dc, "rope_dim": dr})).eval()
    mha = mf.build_model(tiny(position="rope")).eval()
    idx = torch.randint(0, V, (3, 10))
    caches = {}
    with torch.no_grad():
        for name, model in (("mla", mla), ("mha", mha)):
            caches[name] = model.new_cache(3, static=static, max_len=16)
            model(idx, cache=caches[name])
    c = caches["mla"]
    assert all(k is None for k in c.keys + c.values)
    T = 16 if static else 10
    assert {key: tuple(t.shape) for key, t in c.tensors.items()} == {
        **{(i, "mla_latent"): (3, T, dc) for i in range(L)}, **{(i, "mla_k_rope"): (3, 1, T, dr) for i in range(L)}}
    assert c.bytes_per_token() == L * (dc + dr) * 4
    assert caches["mha"].bytes_per_token() == L * 2 * H * Dh * 4
    assert c.memory_bytes() == 3 * T * L * (dc + dr) * 4


# ---- parameter counts ------------------------------------------------------------------------------

def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def norm_params(norm: str, bias: bool, d: int) -> int:
    return {"layernorm": 2 * d if bias else d, "rmsnorm": d, "none": 0}[norm]


@pytest.mark.parametrize("bias,norm", [(True, "layernorm"), (False, "rmsnorm")])
def test_parameter_counts_match_documented_formulas(bias, norm):
    D, H, Dh, L = 32, 4, 8, 3
    b = int(bias)
    c = dict(n_layer=L, bias=bias, norm=norm, position="rope")

    def mha(h, hkv):
        return D * (h + 2 * hkv) * Dh + b * (h + 2 * hkv) * Dh + h * Dh * D + b * D

    # mla, with and without query compression, GQA
    for hkv, dq in ((4, None), (2, 16)):
        dc, dr = 12, 4
        dn = Dh - dr
        m = mf.build_model(tiny(attention="mla", n_kv_heads=hkv, attention_options={
            "kv_lora_rank": dc, "q_lora_rank": dq, "rope_dim": dr}, **c))
        q = D * H * Dh + b * H * Dh if dq is None else \
            D * dq + b * dq + norm_params(norm, bias, dq) + dq * H * Dh + b * H * Dh
        want = (D * (dc + dr) + b * (dc + dr) + norm_params(norm, bias, dc)
                + dc * hkv * (dn + Dh) + b * hkv * (dn + Dh) + q + H * Dh * D + b * D)
        assert n_params(m.blocks[0].attn) == want
    # moa
    E = 6
    m = mf.build_model(tiny(attention="moa", attention_options={"n_experts": E, "top_k": 2}, **c))
    assert n_params(m.blocks[0].attn) == D * E + E * (D * Dh + b * Dh) + 2 * (D * Dh + b * Dh) + E * Dh * D + b * D
    # talking heads
    m = mf.build_model(tiny(attention="talking_heads", n_kv_heads=2, **c))
    assert n_params(m.blocks[0].attn) == mha(H, 2) + 2 * H * H
    # multichannel (MLP ffn: M(w) = 2 D w + b (w + D))
    for s, h, merge, shared, mult in ((2, None, "softmax", False, 1.0), (3, 2, "max", True, 1.5),
                                      (1, 4, "softmax", False, 1.0)):
        m = mf.build_model(tiny(attention="multichannel", attn_only=True, d_ff=96, attention_options={
            "n_channels": s, "channel_heads": h, "merge": merge, "shared_mlp": shared, "mult": mult}, **c))
        hh = h or H // s
        w = round(mult * 96 / s)
        mlp = 2 * D * w + b * (w + D)
        want = s * (mha(hh, hh) + norm_params(norm, bias, D) + mlp) + \
            (D * s + b * s if merge == "softmax" and s > 1 else 0) + (mlp if shared else 0)
        assert n_params(m.blocks[0].attn) == want
    # moe
    E, F_, ns = 4, 40, 2
    m = mf.build_model(tiny(ffn="moe", ffn_options={"n_experts": E, "n_shared": ns, "d_expert": F_}, **c))
    S = ns * F_
    assert n_params(m.blocks[0].mlp) == D * E + E * (2 * D * F_ + b * (F_ + D)) + 2 * D * S + b * (S + D)
    # denseformer: L (L + 3) / 2 scalars; dilation 2 / period 2 keep fewer
    plain = mf.build_model(tiny(**c)).num_params()
    assert mf.build_model(tiny(model_options={"denseformer": True}, **c)).num_params() == plain + L * (L + 3) // 2
    dil = mf.build_model(tiny(model_options={"denseformer": True, "dwa_dilation": 2, "dwa_period": 2}, **c))
    # L=3, k=2, p=2: DWA after blocks 1 (sources 0, 2) and 2 (last block: sources 1, 3)
    assert dil.num_params() == plain + 4


# ---- DenseFormer -----------------------------------------------------------------------------------

def test_denseformer_is_identity_at_init_and_learns_weights():
    plain = mf.build_model(tiny(n_layer=3)).eval()
    dense = mf.build_model(tiny(n_layer=3, model_options={"denseformer": True})).eval()
    missing = dense.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert all(k.startswith("dwa.") for k in missing) and len(missing) == 3
    idx = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(dense(idx), plain(idx))
    dense.train()
    dense.loss(idx[:, :-1], idx[:, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dense.dwa.parameters())
    with pytest.raises(mf.ConfigError, match="model_options"):
        mf.build_model(tiny(model_options={"densformer": True}))


# ---- YAML, errors, training --------------------------------------------------------------------------

def test_selectable_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  attention: mla\n  position: rope\n  attention_options: {kv_lora_rank: 16}\n"
                    "  ffn: moe\n  ffn_options: {n_experts: 4, top_k: 1}\n  model_options: {denseformer: true}\n")
    cfg = load_config(path)
    cfg.model.vocab_size = V
    model = mf.build_model(cfg.model)
    assert model.blocks[0].attn.dc == 16 and model.blocks[0].mlp.top_k == 1 and model.dwa is not None
    with pytest.raises(mf.ConfigError, match="attention_options"):
        mf.build_model(tiny(attention="mla", attention_options={"latent": 3}))
    with pytest.raises(mf.ConfigError, match="top_k"):
        mf.build_model(tiny(ffn="moe", ffn_options={"n_experts": 2, "top_k": 3}))
    with pytest.raises(mf.ConfigError, match="merge"):
        mf.build_model(tiny(attention="multichannel", attention_options={"merge": "sum"}))


@pytest.mark.parametrize("name", ["mla", "moa", "talking_heads", "multichannel", "moe", "denseformer"])
def test_tiny_model_overfits_a_batch(name):
    torch.manual_seed(0)
    model = mf.build_model(variant(name, position="rope"))
    idx = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        total = loss + (model.aux_loss if model.aux_loss is not None else 0.0)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert loss.item() < 0.1
