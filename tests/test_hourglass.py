"""Hourglass model (issue 6): causality for every option combination, generation, hooks, options, FLOPs."""

import itertools

import pytest
import torch

import modformer as mf
from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.layers.shorten import shift_and_group
from modformer.train.logging import read_metrics
from modformer.train.trainer import Trainer

V = 23


pytestmark = pytest.mark.usefixtures("one_thread")


def hourglass(options: dict | None = None, **kw) -> mf.ModelConfig:
    base = dict(vocab_size=V, n_layer=1, d_model=16, n_head=2, max_seq_len=40, model="hourglass",
                model_options=options or {})
    base.update(kw)
    return mf.ModelConfig(**base)


def level_options(levels: int, k: int) -> dict:
    g = [3, 2] if k == 1 else [4, 4]
    return {"levels": levels, "group_len": g[:levels], "n_latents": [k] * levels}


def assert_causal(model: torch.nn.Module, length: int = 19, sees_itself: bool = True) -> None:
    """Row 0 is a random sequence; row t + 1 changes only token t. Logits before t must not move."""
    idx = torch.randint(0, V, (1, length))
    batch = idx.repeat(length + 1, 1)
    for t in range(length):
        batch[t + 1, t] = (idx[0, t] + 1 + t % 5) % V
    with torch.no_grad():
        out = model(batch)
    for t in range(length):
        torch.testing.assert_close(out[t + 1, :t], out[0, :t], atol=1e-5, rtol=1e-5, msg=f"token {t} leaked")
        if sees_itself:
            assert not torch.allclose(out[t + 1, t], out[0, t]), f"position {t} ignores its own token"
    assert not torch.allclose(out[1], out[0])


COMBOS = list(itertools.product(["perceiver", "last_k"], ["repeat", "attention"],
                                ["alternate", "local_first", "global", "local"], [1, 2], [1, 2]))


@pytest.mark.parametrize("compression,upsampling,schedule,levels,k", COMBOS)
def test_causality_every_combination(compression, upsampling, schedule, levels, k):
    opts = {**level_options(levels, k), "compression": compression, "upsampling": upsampling,
            "schedule": schedule, "encoder_layers": 2, "decoder_layers": 2, "latent_layers": 1}
    assert_causal(mf.build_model(hourglass(opts, position="rope")).eval())


EXTRAS = {
    "no_skip": ({"skip": False}, {}),
    "denseformer": ({"denseformer": True, "latent_layers": 3, "dwa_dilation": 2}, {}),
    "latent_loss": ({"latent_loss": 0.5}, {}),
    "latent_head_dim": ({"latent_block": {"n_head": 4, "d_head": 2}}, {}),
    "multichannel": ({"latent_block": {"attention": "multichannel", "attn_only": True,
                                       "attention_options": {"n_channels": 2}}}, {}),
    "latent_heads": ({"latent_block": {"n_head": 4}, "upsampling": "attention"}, {"position": "alibi"}),
    "moe_latents": ({"latent_block": {"ffn": "moe", "ffn_options": {"n_experts": 2, "top_k": 1}}}, {}),
    "learned": ({}, {"position": "learned"}),
    "sinusoidal": ({}, {"position": "sinusoidal"}),
    "alibi": ({"upsampling": "attention"}, {"position": "alibi"}),
    "nopos": ({"compression": "last_k"}, {"position": "none"}),
    "eager_post_swiglu": ({}, {"attn_backend": "eager", "norm_placement": "post", "ffn": "swiglu"}),
    "flex": ({"schedule": "local_first", "encoder_layers": 2}, {"attn_backend": "flex"}),
    "three_levels": ({"levels": 3, "group_len": [2, 2, 2], "n_latents": [1, 2, 1], "encoder_layers": 1,
                      "decoder_layers": [1, 2, 1], "upsampling": "attention"}, {"position": "learned"}),
    "g_equals_k": ({"group_len": 2, "n_latents": 2, "compression": "last_k"}, {}),
    "local_eager": ({"local_backend": "eager", "schedule": "alternate", "encoder_layers": 2, "levels": 2,
                     "group_len": [4, 2], "n_latents": [2, 1]}, {}),
    "rmsnorm_untied": ({"encoder_layers": 0, "decoder_layers": 0}, {"norm": "rmsnorm", "tie_embeddings": False}),
}


@pytest.mark.parametrize("name", sorted(EXTRAS))
def test_causality_extra_options(name):
    opts, kw = EXTRAS[name]
    kw = {"position": "rope", **kw}
    model = mf.build_model(hourglass(opts, **kw)).eval()
    # without a skip connection (or token-level layers) position t only learns token t through its
    # group's latent, which serves it only when t is the first position of a group
    sees = opts.get("skip", True) and sum(model.opts.encoder_layers[:1] + model.opts.decoder_layers[:1]) > 0
    assert_causal(model, sees_itself=sees)


def test_shift_is_g_minus_one():
    x = torch.arange(1, 8, dtype=torch.float32).view(1, 7, 1)        # positions 0..6 hold 1..7
    groups = shift_and_group(x, torch.zeros(1), 3)                   # n = 3 groups
    assert groups.squeeze(-1).tolist() == [[[0, 0, 1], [2, 3, 4], [5, 6, 7]]]   # group i ends at position 3i


CACHE_OPTIONS = [
    ({"schedule": "global"}, {"position": "rope"}, True),
    ({"schedule": "global", "upsampling": "attention", "compression": "last_k", "group_len": 4, "n_latents": 2,
      "encoder_layers": [1, 2], "decoder_layers": [2]}, {"position": "learned"}, True),
    ({"schedule": "global", "skip": False, "latent_loss": 0.2, "denseformer": True}, {"position": "alibi"}, True),
    ({"schedule": "global", "latent_block": {"attention": "multichannel", "attn_only": True}},
     {"position": "sinusoidal", "attention": "gqa", "n_kv_heads": 1}, True),
    ({"schedule": "alternate"}, {"position": "rope"}, False),                    # local token layer: fallback
    ({"levels": 2, "group_len": [2, 2], "upsampling": "attention"}, {"position": "rope"}, False),
]


@pytest.mark.parametrize("options,kw,incremental", CACHE_OPTIONS)
def test_greedy_generation_same_with_and_without_cache(options, kw, incremental):
    model = mf.build_model(hourglass(options, **kw)).eval()
    assert model.incremental == incremental
    prompt = torch.randint(0, V, (2, 5))
    a = model.generate(prompt, 12, temperature=0, use_cache=False)
    b = model.generate(prompt, 12, temperature=0, use_cache=True)
    assert a.shape == (2, 17) and torch.equal(a, b)
    with pytest.raises(ValueError, match="compiled"):
        model.generate(prompt, 2, compile=True)


@pytest.mark.parametrize("options,kw,incremental", CACHE_OPTIONS)
def test_cache_calls_match_full_forward(options, kw, incremental):
    model = mf.build_model(hourglass(options, **kw)).eval()
    idx = torch.randint(0, V, (2, 14))
    with torch.no_grad():
        full = model(idx)
        first, cache = model(idx[:, :6], return_cache=True)
        steps = [model(idx[:, t:t + 1], cache=cache) for t in range(6, 9)]
        rest = model(idx[:, 9:], cache=cache)
        last = model(torch.randint(0, V, (2, 1)), cache=cache, last_only=True)
    torch.testing.assert_close(torch.cat([first, *steps, rest], 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 15 and last.shape == (2, 1, V)
    assert type(cache).__name__ == ("HourglassCache" if incremental else "TokenCache")


def test_run_with_cache_exposes_latents_per_level():
    model = mf.build_model(hourglass({"levels": 2, "group_len": [4, 3], "n_latents": [2, 1]})).eval()
    logits, acts = model.run_with_cache(torch.randint(0, V, (2, 17)))
    assert acts["shorten.0.hook_latents"].shape == (2, 10, 16)        # ceil(17 / 4) groups x 2 latents
    assert acts["shorten.1.hook_latents"].shape == (2, 4, 16)         # ceil(10 / 3) groups x 1
    assert acts["hook_latent_out"].shape == (2, 4, 16)
    assert acts["hook_upsampled_1"].shape == (2, 10, 16) and acts["hook_upsampled_0"].shape == (2, 17, 16)
    assert "latent_blocks.0.attn.hook_pattern" in acts and logits.shape == (2, 17, V)
    assert model.lengths(17) == [17, 10, 4]


@pytest.mark.parametrize("options,match", [
    ({"levls": 2}, "unknown"),
    ({"group_len": 4, "n_latents": 3}, "n_latents"),
    ({"levels": 2, "group_len": [4]}, "group_len"),
    ({"compression": "mean"}, "compression"),
    ({"upsampling": "linear"}, "upsampling"),
    ({"schedule": "random"}, "schedule"),
    ({"encoder_layers": [1, 1, 1]}, "encoder_layers"),
    ({"latent_loss": -1}, "latent_loss"),
    ({"latent_block": {"vocab_size": 3}}, "latent_block"),
    ({"skip": "yes"}, "skip"),
    ({"local_backend": "fast"}, "local_backend: unknown attn_backend 'fast'"),
])
def test_bad_options_raise_config_errors(options, match):
    with pytest.raises(mf.ConfigError, match=match):
        mf.build_model(hourglass(options))


def test_latent_loss_is_an_aux_loss_in_training_only():
    model = mf.build_model(hourglass({"latent_loss": 0.3}))
    idx = torch.randint(0, V, (2, 16))
    model.train()
    model(idx)
    assert model.aux_loss is not None and model.aux_loss > 0 and "latent_loss" in model.aux_stats
    model.aux_loss.backward()
    assert model.latent_head.weight.grad.abs().sum() > 0
    model.eval()
    model(idx)
    assert model.aux_loss is None


def test_params_and_flops():
    # g = K = 1: every part runs on every token, so the matmul term is 6 x (non-position parameters)
    model = mf.build_model(hourglass({"group_len": 1, "n_latents": 1, "schedule": "global"}, position="learned"))
    n = model.num_params() - sum(p.numel() for m in (model.position, *model.positions) for p in m.parameters())
    T, hd = 32, 16
    attn = 12 * hd * (T * 3 + 1)            # 3 global self-attention layers over T keys, perceiver over g = 1
    assert model.flops_per_token(T) == pytest.approx(6 * n + attn)
    assert model.num_params(non_embedding=True) < model.num_params()
    # shortening by 4 with most layers in the latent stack costs far fewer FLOPs than a GPT of equal depth
    deep = mf.build_model(hourglass({"group_len": 4, "latent_layers": 6}, max_seq_len=2048))
    gpt = mf.build_model(mf.ModelConfig(vocab_size=V, n_layer=8, d_model=16, n_head=2, max_seq_len=2048))
    assert deep.flops_per_token(2048) < 0.5 * gpt.flops_per_token(2048)


def test_save_load_round_trip(tmp_path):
    model = mf.build_model(hourglass({"levels": 2, "group_len": [2, 2], "compression": "last_k",
                                      "latent_loss": 0.1, "denseformer": True}, position="learned"))
    idx = torch.randint(0, V, (2, 11))
    mf.save(model, tmp_path / "m")
    loaded = mf.load(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))


def test_gradient_checkpointing_gives_identical_gradients():
    opts = {"schedule": "alternate", "encoder_layers": [2, 1], "decoder_layers": [2]}
    a = mf.build_model(hourglass(opts))
    b = mf.build_model(hourglass(opts, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, V, (2, 13))
    for m in (a, b):
        m.loss(idx[:, :-1], idx[:, 1:]).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_tiny_hourglass_overfits_a_batch():
    model = mf.build_model(hourglass({"group_len": 2}, d_model=32, position="rope"))
    idx = torch.randint(0, V, (2, 12))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(40):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3


def test_trainer_runs_hourglass_with_latent_loss(tmp_path):
    cfg = RunConfig(name="hg", out_dir=str(tmp_path),
                    model=ModelConfig(model="hourglass", n_layer=1, d_model=16, n_head=2, max_seq_len=8,
                                      model_options={"group_len": 2, "latent_loss": 0.1}),
                    data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                    train=TrainConfig(steps=4, batch_size=16, eval_every=4, eval_batches=1, log_every=2,
                                      progress=False, tensorboard=False, device="cpu"))
    Trainer(cfg).fit()
    rows = [r for r in read_metrics(tmp_path / "hg" / "metrics.jsonl") if r["split"] == "train"]
    assert rows and all(r["aux_loss"] > 0 and "latent_loss" in r for r in rows)


# ---- the fused / cached training path against a plain float64 reference (issue 6 overhead work) ----------------

def _ref_perceiver(c, groups, position):
    """PerceiverCompress as first written: k/v by permuting a (N, g, 2, H, Dh) view, queries per group."""
    N, g, D = groups.shape
    H, Dh = c.n_head, c.head_dim
    kv = c.kv(c.ln_kv(groups + c.group_pos[:g]))
    k, v = kv.view(N, g, 2, H, Dh).permute(2, 0, 3, 1, 4)
    lat = c.queries.expand(N, -1, -1)
    q = c.q(c.ln_q(lat)).view(N, -1, H, Dh).transpose(1, 2)
    z = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    lat = lat + c.out(z.transpose(1, 2).reshape(N, -1, H * Dh))
    return lat + c.mlp(c.ln2(lat))


def _ref_forward(model, idx):
    """Hourglass logits the straightforward way: a fresh arange and position lookup (``embed``) at every use,
    per-layer contexts, padding every local window, materialised repeat upsampling, explicit upsample mask."""
    from modformer.layers.context import Context
    from modformer.layers.shorten import LastKCompress, shift_and_group, upsample_mask

    o = model.opts
    positions = [model.position, *model.positions]

    def add_pos(x, p):
        e = p.embed(torch.arange(x.shape[1]))
        return x if e is None else x + e

    def stage(st, x, p):
        B, L, D = x.shape
        for kind, block in zip(st.kinds, st.blocks):
            if kind == "global":
                x = block(x, Context(pos=torch.arange(L), position=p))
            else:
                w, n = st.window, -(-L // st.window)
                xp = torch.nn.functional.pad(x, (0, 0, 0, n * w - L)).reshape(B * n, w, D)
                x = block(xp, Context(pos=torch.arange(w), position=p)).reshape(B, n * w, D)[:, :L]
        return x

    def shorten(sh, x, p):
        B = x.shape[0]
        groups = shift_and_group(x, sh.pad, sh.g)
        n = groups.shape[1]
        groups = groups.reshape(B * n, sh.g, -1)
        if isinstance(sh.compress, LastKCompress):
            c = sh.compress
            lat = c.block(groups + c.group_pos, Context(pos=torch.arange(sh.g), position=p))[:, -c.k:]
        else:
            lat = _ref_perceiver(sh.compress, groups, p)
        return lat.reshape(B, n * sh.k, -1)

    def up_attn(u, x, lat, g, k):
        B, L, D = x.shape
        H, Dh = u.n_head, u.head_dim
        q = u.q(u.ln_q(x)).view(B, L, H, Dh).transpose(1, 2)
        k_, v = u.kv(u.ln_kv(lat)).view(B, lat.shape[1], 2, H, Dh).permute(2, 0, 3, 1, 4)
        mask = upsample_mask(L, lat.shape[1], g, k, x.device)
        z = torch.nn.functional.scaled_dot_product_attention(q, k_, v, attn_mask=mask)
        return u.out(z.transpose(1, 2).reshape(B, L, H * Dh))

    x = add_pos(model.tok_emb(idx) * model.embed_scale, model.position)
    skips = []
    for r in range(o.levels):
        x = stage(model.encoders[r], x, positions[r])
        skips.append(x)
        x = add_pos(shorten(model.shorten[r], x, positions[r]), positions[r + 1])
    x = stage(model.encoders[o.levels], x, positions[-1])
    ctx = Context(pos=torch.arange(x.shape[1]), position=model.latent_position or positions[-1])
    history = [x]
    for i, block in enumerate(model.latent_blocks):
        x = block(x, ctx)
        if model.dwa is not None:
            history.append(x)
            x = model.dwa(i, history)
    for r in reversed(range(o.levels)):
        g, k = o.group_len[r], o.n_latents[r]
        lat = x
        x = lat.repeat_interleave(g // k, dim=1)[:, :skips[r].shape[1]]
        if o.skip:
            x = x + skips[r]
        if model.upsample_attn is not None:
            x = x + up_attn(model.upsample_attn[r], x, lat, g, k)
        x = stage(model.decoders[r], add_pos(x, positions[r]), positions[r])
    return model.lm_head(model.ln_f(x))


REFERENCE_CASES = {
    "shakespeare_like": ({"schedule": "global"}, {"position": "learned"}),
    "local_last_k_attn_up": ({"schedule": "alternate", "compression": "last_k", "upsampling": "attention",
                              "encoder_layers": [2, 1], "decoder_layers": [2]}, {"position": "rope"}),
    "two_levels_k2_sinusoidal": ({"levels": 2, "group_len": [4, 2], "n_latents": [2, 1], "schedule": "local_first",
                                  "encoder_layers": 2, "decoder_layers": 2}, {"position": "sinusoidal"}),
    "no_skip_dwa_alibi": ({"skip": False, "denseformer": True, "latent_layers": 2, "upsampling": "attention"},
                          {"position": "alibi"}),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CASES))
@pytest.mark.parametrize("length", [16, 19])                 # a whole number of groups, and a partial last group
def test_training_path_matches_float64_reference(name, length):
    opts, kw = REFERENCE_CASES[name]
    model = mf.build_model(hourglass(opts, **kw)).double().train()
    idx = torch.randint(0, V, (2, length))
    out = model(idx)
    ref = _ref_forward(model, idx)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()), allow_unused=True)
    ref_grads = torch.autograd.grad(ref.square().mean(), list(model.parameters()), allow_unused=True)
    for (pname, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        assert (a is None) == (b is None), pname
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=pname)


@pytest.mark.parametrize("compression", ["perceiver", "last_k"])
def test_local_backend_computes_the_same_function(compression):
    """``local_backend: eager`` (local layers and the compressor attend through the eager path) gives the default
    SDPA model's logits and gradients with the same weights, in float64, in training mode."""
    opts = {"schedule": "alternate", "encoder_layers": [2, 1], "decoder_layers": [2], "compression": compression,
            "levels": 1, "group_len": 4, "n_latents": 2}
    sdpa = mf.build_model(hourglass(opts, position="rope")).double().train()
    eager = mf.build_model(hourglass({**opts, "local_backend": "eager"}, position="rope")).double().train()
    eager.load_state_dict(sdpa.state_dict())
    local = [b.attn.backend for s in eager.encoders for b, kind in zip(s.blocks, s.kinds) if kind == "local"]
    assert local == ["eager", "eager"] and eager.encoders[0].blocks[1].attn.backend == "sdpa"   # token, latent
    compress = eager.shorten[0].compress
    assert (compress.backend if compression == "perceiver" else compress.block.attn.backend) == "eager"
    idx = torch.randint(0, V, (2, 19))
    a, b = sdpa(idx), eager(idx)
    torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(a.square().mean(), list(sdpa.parameters()))
    for (name, _), g, ref in zip(eager.named_parameters(),
                                 torch.autograd.grad(b.square().mean(), list(eager.parameters())), grads):
        torch.testing.assert_close(g, ref, atol=1e-12, rtol=1e-12, msg=name)


def test_training_forward_traces_as_one_graph():
    """No graph breaks in the training forward (torch.compile fullgraph, CPU token-range check included)."""
    model = mf.build_model(hourglass({"schedule": "alternate", "encoder_layers": 2}, position="learned")).train()
    idx = torch.randint(0, V, (2, 16))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
