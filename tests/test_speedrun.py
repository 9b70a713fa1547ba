"""Speedrun components (issue 24): relu2, QK-norm, zero-init projections, logit soft-cap, value embeddings,
U-net skips and the windowed attention schedule. Each: math against a hand-written reference, causality,
cached decoding equal to the full forward, and one-line config errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import modformer as mf
from modformer.config import ModelConfig
from modformer.models.hf.gpt2 import hf_config as gpt2_hf_config
from modformer.models.hf.llama import hf_config as llama_hf_config
from modformer.registry import ConfigError
from tests._helpers import assert_cache_matches_full_forward

V = 37
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: no oversubscription stalls on 2 shared cores


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=4, d_model=32, n_head=4, max_seq_len=64, position="rope", norm="rmsnorm")
    base.update(kw)
    return ModelConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """N(0, 0.2) everywhere (zero-initialised projections and unit mixing scalars would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


COMPONENTS = {
    "relu2": dict(ffn="relu2"),
    "qk_norm": dict(qk_norm=True),
    "zero_init_proj": dict(zero_init_proj=True),
    "softcap": dict(logit_softcap=2.0),
    "value_embeds": dict(value_embeds=2),
    "unet": dict(unet_skips=True),
    "unet_odd": dict(unet_skips=True, n_layer=5),
    "windows": dict(window_pattern=[3, 0]),
    "windows_gqa": dict(window_pattern=[0, 4, 2], attention="gqa", n_kv_heads=2, value_embeds=1),
    "all": dict(ffn="relu2", qk_norm=True, zero_init_proj=True, logit_softcap=2.0, value_embeds=2, unet_skips=True,
                window_pattern=[5, 2, 5, 0]),
}


@pytest.mark.parametrize("name", COMPONENTS)
def test_causality(name):
    model = randomize(mf.build_model(tiny(**COMPONENTS[name]))).eval()
    idx = torch.randint(0, V, (2, 14))
    t = 7
    changed = idx.clone()
    changed[:, t + 1:] = (idx[:, t + 1:] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("name, static", [(n, False) for n in COMPONENTS] +
                         [(n, True) for n in ("value_embeds", "unet", "windows_gqa", "all")])
def test_cache_matches_full_forward(name, static):
    model = randomize(mf.build_model(tiny(**COMPONENTS[name]))).eval()
    assert_cache_matches_full_forward(model, V, static)


@pytest.mark.parametrize("backend, extra", [(b, {}) for b in ("eager", "sdpa", "flex")] + [
    ("sdpa", {"window_pattern": [3, 0]}), ("flex", {"window_pattern": [3, 0]}),
    ("sdpa", {"value_embeds": 1, "unet_skips": True})])
def test_qk_norm_every_backend_and_cache(backend, extra):
    """QK-norm gives the eager reference's logits on every backend, and cached decoding equals the full forward."""
    ref = randomize(mf.build_model(tiny(qk_norm=True, attn_backend="eager", **extra))).eval()
    model = mf.build_model(tiny(qk_norm=True, attn_backend=backend, **extra)).eval()
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, V, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)
    assert_cache_matches_full_forward(model, V, static=False)


def test_greedy_generation_same_with_and_without_cache():
    model = randomize(mf.build_model(tiny(**COMPONENTS["all"]))).eval()
    prompt = torch.randint(0, V, (1, 5))
    a = model.generate(prompt, 10, temperature=0.0, use_cache=True)
    b = model.generate(prompt, 10, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)


# ---- each component's math against a hand-written reference (float64) ---------------------------------------
def test_relu2_mlp_math():
    mlp = mf.build_model(tiny(ffn="relu2")).double().blocks[0].mlp
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    ref = F.linear(torch.clamp(F.linear(x, mlp.up.weight, mlp.up.bias), min=0) ** 2, mlp.down.weight, mlp.down.bias)
    torch.testing.assert_close(mlp(x), ref, atol=1e-12, rtol=1e-12)


def test_logit_softcap_math():
    """Same weights: capped logits = c * tanh(plain / c), strictly inside (-c, c); gradients reach every weight."""
    cap = 1.5
    plain = randomize(mf.build_model(tiny()).double()).eval()
    capped = mf.build_model(tiny(logit_softcap=cap)).double().eval()
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, V, (2, 9))
    out = capped(idx)
    torch.testing.assert_close(out, cap * torch.tanh(plain(idx) / cap), atol=1e-12, rtol=1e-12)
    assert out.abs().max() < cap
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in capped.parameters())


def test_zero_init_projections_start_as_identity_blocks_and_still_learn():
    model = mf.build_model(tiny(zero_init_proj=True, ffn="relu2", bias=True)).eval()
    for b in model.blocks:
        for lin in (b.attn.out, b.mlp.down):
            assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
        assert b.attn.qkv.weight.std() > 0.01       # the rest keeps the GPT-2 init
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():                            # every block is the identity: logits = head(norm(embedding))
        torch.testing.assert_close(model(idx), model.lm_head(model.ln_f(model.tok_emb(idx))))
    # one SGD step opens the projections; after it every parameter gets a gradient
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model.loss(idx, torch.randint(0, V, (2, 9))).backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_value_embeddings_layout_and_math():
    """Tables serve layers t and L-K+t; value_mix (1, 0) is the plain model; the mix is a * v + b * ve(token)."""
    cfg = tiny(value_embeds=2, n_layer=5)
    model = randomize(mf.build_model(cfg).double()).eval()
    assert model.value_layers == {0: 0, 1: 1, 3: 0, 4: 1}
    assert [b.attn.value_mix is not None for b in model.blocks] == [True, True, False, True, True]
    assert model.value_embeds[0].weight.shape == (V, 32)
    plain = mf.build_model(tiny(n_layer=5)).double().eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("value_embeds" in k or "value_mix" in k for k in unexpected)
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        for b in model.blocks:
            if b.attn.value_mix is not None:
                b.attn.value_mix.copy_(torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(model(idx), plain(idx), atol=1e-12, rtol=1e-12)
        # layer 3's values by hand: a * (x W_v) + b * table0[idx]
        attn = model.blocks[3].attn
        attn.value_mix.copy_(torch.tensor([0.3, -0.7], dtype=torch.float64))
        x = torch.randn(2, 9, 32, dtype=torch.float64)
        ctx = mf_context(model, idx)
        _, _, v = attn.project_qkv(x, ctx)
        w_v = attn.qkv.weight[64:]
        ref = 0.3 * F.linear(x, w_v, attn.qkv.bias[64:]) + -0.7 * model.value_embeds[0](idx)
        torch.testing.assert_close(v, ref.view(2, 9, 4, 8).transpose(1, 2), atol=1e-12, rtol=1e-12)
    fresh = mf.build_model(cfg)                      # value_mix starts at (0.5, 0.5): gradients reach every table
    fresh.loss(idx, idx).backward()
    assert all(t.weight.grad.abs().sum() > 0 for t in fresh.value_embeds)
    assert all(b.attn.value_mix.grad.abs().sum() > 0 for b in fresh.blocks if b.attn.value_mix is not None)


def test_value_embed_layout_off_and_out_of_range():
    """No tables: no layer mixes one, including layer indices past n_layer (hourglass numbers its blocks on)."""
    assert [tiny().value_embed_table(i) for i in range(8)] == [None] * 8
    assert [tiny(value_embeds=1).value_embed_table(i) for i in range(6)] == [0, None, None, 0, None, None]
    hourglass = mf.build_model(tiny(model="hourglass", n_layer=2, position="sinusoidal", norm="layernorm")).eval()
    assert all(getattr(m, "value_mix", None) is None for m in hourglass.modules())
    hourglass(torch.randint(0, V, (1, 8)))


def mf_context(model, idx):
    from modformer.layers.context import Context

    pos = torch.arange(idx.shape[1])
    return Context(pos=pos, position=model.position, value_embeds={i: model.value_embeds[t](idx)
                                                                   for i, t in model.value_layers.items()})


@pytest.mark.parametrize("n_layer", [4, 5])
def test_unet_skips_match_hand_written_forward(n_layer):
    """x_{i+1} = block_i(x_i + w * out_{L-1-i}) for the second half; weights 0 = the plain model."""
    model = randomize(mf.build_model(tiny(unet_skips=True, n_layer=n_layer)).double()).eval()
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        ctx = mf_context(model, idx)
        x = model.embed(idx, ctx)
        outs = []
        half = n_layer // 2
        for i, block in enumerate(model.blocks):
            if i >= n_layer - half:
                x = x + model.skip_weights[i - (n_layer - half)] * outs[n_layer - 1 - i]
            x = block(x, ctx)
            outs.append(x)
        ref = model.lm_head(model.ln_f(x))
        torch.testing.assert_close(model(idx), ref, atol=1e-12, rtol=1e-12)
        assert model.skip_weights.shape == (half,)
        plain = mf.build_model(tiny(n_layer=n_layer)).double().eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "skip_weights"})
        model.skip_weights.zero_()
        torch.testing.assert_close(model(idx), plain(idx), atol=1e-12, rtol=1e-12)


def test_window_pattern_is_per_layer_sliding_window():
    cfg = tiny(window_pattern=[3, 0], n_layer=4)
    model = randomize(mf.build_model(cfg)).eval()
    kinds = [(type(b.attn).__name__, getattr(b.attn, "params", None)) for b in model.blocks]
    assert kinds == [("SlidingWindowAttention", (3,)), ("MultiHeadAttention", None)] * 2
    same = mf.build_model(tiny(n_layer=4, layer_overrides=[
        {"attention": "sliding_window", "attention_options": {"window": 3}}, {}] * 2)).eval()
    same.load_state_dict(model.state_dict())                 # parameter names unchanged
    idx = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), same(idx), atol=0, rtol=0)
        wide = mf.build_model(tiny(window_pattern=[12], n_layer=4)).eval()
        wide.load_state_dict(model.state_dict())             # window >= T: exactly full attention
        dense = mf.build_model(tiny(n_layer=4)).eval()
        dense.load_state_dict(model.state_dict())
        torch.testing.assert_close(wide(idx), dense(idx), atol=0, rtol=0)
    mqa = mf.build_model(tiny(window_pattern=[2], attention="mqa"))
    assert mqa.blocks[0].attn.n_kv_heads == 1


def test_trains_one_batch_down():
    torch.manual_seed(0)
    model = mf.build_model(tiny(**COMPONENTS["all"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, V, (2, 12))
    first = None
    for _ in range(12):
        opt.zero_grad()
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first and first < 1.1 * math.log(V)


# ---- config errors: one line naming the field ----------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(value_embeds=3), r"model.value_embeds \(3\).*2 \* K must be <= model.n_layer \(4\)"),
    (dict(value_embeds=-1), "model.value_embeds"),
    (dict(logit_softcap=0.0), "model.logit_softcap"),
    (dict(window_pattern=[4, -1]), "model.window_pattern entries must be integers >= 0"),
    (dict(window_pattern=[4], attention="performer"), "model.window_pattern needs model.attention mha"),
    (dict(model="hourglass", unet_skips=True), "model.unet_skips is supported by model: gpt only"),
    (dict(model="hourglass", logit_softcap=30.0), "model.logit_softcap is supported by model: gpt only"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        tiny(**kw).validate()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, match", [
    (dict(unet_skips=True, model_options={"denseformer": True}), "unet_skips and model_options.denseformer"),
    (dict(value_embeds=1, attention="mla"), "value_embeds needs an attention with a value projection"),
])
def test_build_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        mf.build_model(tiny(**kw))
    assert "\n" not in str(e.value)


def test_yaml_overrides_reach_the_model(tmp_path):
    from modformer.config import RunConfig, load_config, save_yaml

    path = tmp_path / "run.yaml"
    save_yaml(RunConfig(model=tiny()), path)
    cfg = load_config(path, ["model.ffn=relu2", "model.logit_softcap=30", "model.value_embeds=1",
                             "model.unet_skips=true", "model.window_pattern=[16,0]", "model.zero_init_proj=true"])
    assert (cfg.model.logit_softcap, cfg.model.window_pattern, cfg.model.value_embeds) == (30.0, [16, 0], 1)
    with pytest.raises(ConfigError, match="window_pattern"):
        load_config(path, ["model.window_pattern=[16,-2]"])


@pytest.mark.parametrize("field, value", [("logit_softcap", 30.0), ("value_embeds", 1), ("unet_skips", True),
                                          ("window_pattern", [8])])
def test_hf_export_refuses_speedrun_components(field, value):
    gpt2 = dataclasses.replace(tiny(position="learned", norm="layernorm", ffn="gelu"), **{field: value})
    with pytest.raises(ValueError, match=f"model.{field}"):
        gpt2_hf_config(gpt2)
    llama = dataclasses.replace(tiny(ffn="swiglu"), **{field: value})
    with pytest.raises(ValueError, match=f"model.{field}"):
        llama_hf_config(llama)


# ---- the study's bookkeeping (modformer bench speedrun) --------------------------------------------------------
def test_speedrun_study_plan_and_headline():
    from modformer.bench.studies import speedrun

    runs = speedrun.plan(["baseline", "recipe", "ablations", "lrs"], [0, 1, 2], [3e-3], ["no_unet"])
    assert [r["name"] for r in runs] == ["baseline_s0", "baseline_s1", "baseline_s2", "recipe_s0", "recipe_s1",
                                         "recipe_s2", "no_unet_s0", "recipe_lr0.003_s0"]
    assert runs[6]["overrides"] == ["model.unet_skips=false"] and runs[7]["overrides"][0] == "train.lr=0.003"
    alone = speedrun.plan(["ablations"], [4, 5], [], ["no_unet"])     # the recipe's same-seed run comes along
    assert [r["name"] for r in alone] == ["recipe_s4", "no_unet_s4"]
    extra = speedrun.plan([], [0, 1], [], [], [["base_qk", "configs/x.yaml", "model.qk_norm=true"]])
    assert [(r["name"], r["group"], r["overrides"]) for r in extra] == [
        ("base_qk_s0", "base_qk", ["model.qk_norm=true"]), ("base_qk_s1", "base_qk", ["model.qk_norm=true"])]

    def row(name, group, seed, tokens, lr=5e-3):
        return {"name": name, "group": group, "seed": seed, "tokens_to_target": tokens, "lr": lr,
                "steps_to_target": None if tokens is None else tokens // 16384}

    rows = [row("baseline_s0", "baseline", 0, 800 * 16384), row("baseline_s1", "baseline", 1, 750 * 16384),
            row("baseline_s2", "baseline", 2, None), row("recipe_s0", "recipe", 0, 500 * 16384),
            row("recipe_s1", "recipe", 1, 550 * 16384), row("recipe_s2", "recipe", 2, 525 * 16384),
            row("no_unet_s0", "no_unet", 0, 600 * 16384), row("lr3_s0", "lr0.003", 0, 450 * 16384, 3e-3)]
    h = speedrun.headline(rows, 1.47)
    # baseline: one miss counts as +inf, so the median of {750, 800, inf} is 800; the max is unknown
    assert h["baseline"]["tokens_median"] == 800 * 16384 and h["baseline"]["tokens_max"] is None
    assert h["recipe"]["tokens_median"] == 525 * 16384 and h["recipe"]["tokens_min"] == 500 * 16384
    assert h["token_ratio_baseline_over_recipe"] == 800 / 525
    assert h["best_lr"] == 3e-3 and h["ablations"]["no_unet"]["ratio_to_recipe"] == 600 / 500
    h = speedrun.headline(rows + [row("base_qk_s0", "base_qk", 0, 600 * 16384)], 1.47)
    assert h["runs"] == {"base_qk": speedrun.group_stats(rows + [row("x", "base_qk", 0, 600 * 16384)], "base_qk")}
    two_missed = rows[:1] + [row("b1", "baseline", 1, None), row("b2", "baseline", 2, None)]
    assert speedrun.group_stats(two_missed, "baseline")["tokens_median"] is None
