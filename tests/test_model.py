"""GPT model: causality for every component combination, caches, round trips, checkpointing."""

import dataclasses
import itertools

import pytest
import torch
from _helpers import assert_cache_matches_full_forward

import modformer as mf
from modformer.layers.position import RotaryPosition


def tiny(**kw) -> mf.ModelConfig:
    base = dict(vocab_size=37, n_layer=2, d_model=32, n_head=4, max_seq_len=64)
    base.update(kw)
    return mf.ModelConfig(**base)


COMBOS = list(itertools.product(
    ["mha", "gqa", "mqa"], ["learned", "sinusoidal", "rope", "alibi", "none", "shortformer"], ["layernorm", "rmsnorm"],
    ["pre", "post", "sandwich"], ["relu", "gelu", "swiglu", "geglu"]))


@pytest.mark.parametrize("attention,position,norm,placement,ffn", COMBOS)
def test_causality_every_combination(attention, position, norm, placement, ffn):
    """Changing tokens after position t never changes logits at positions <= t."""
    cfg = tiny(n_layer=1, d_model=16, attention=attention, n_kv_heads=2 if attention == "gqa" else None,
               position=position, norm=norm, norm_placement=placement, ffn=ffn)
    model = mf.build_model(cfg).eval()
    idx = torch.randint(0, 37, (2, 12))
    t = 6
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 37, (2, 12 - t - 1))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("extra", [{}, {"attn_only": True}, {"rezero": True, "norm": "none"},
                                   {"qk_norm": True}, {"bias": False, "tie_embeddings": False}])
def test_backends_agree_in_full_model(backend, extra):
    cfg = tiny(position="alibi", **extra)
    ref = mf.build_model(tiny(position="alibi", attn_backend="eager", **extra)).eval()
    model = mf.build_model(cfg).eval()
    model.load_state_dict(ref.state_dict())
    if extra.get("rezero"):
        for p in model.parameters():      # open the zero-initialised gates so attention matters
            torch.nn.init.normal_(p, std=0.2)
        ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 37, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)


def test_bidirectional_model_sees_the_future():
    model = mf.build_model(tiny(causal=False)).eval()
    idx = torch.randint(0, 37, (1, 10))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 37
    with torch.no_grad():
        assert not torch.allclose(model(idx)[:, 0], model(changed)[:, 0])


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryPosition(tiny(rope_base=500.0))
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        qm, _ = rope.rotate(q, q, torch.tensor([m]))
        _, kn = rope.rotate(k, k, torch.tensor([n]))
        return (qm * kn).sum().item()

    assert score(7, 3) == pytest.approx(score(27, 23), abs=1e-4)
    assert score(5, 5) == pytest.approx((q * k).sum().item(), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "sinusoidal", "shortformer"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("attention", ["mha", "mqa"])
def test_cache_matches_full_forward(position, static, attention):
    model = mf.build_model(tiny(position=position, attention=attention)).eval()
    assert assert_cache_matches_full_forward(model, 37, static).length == 15


@pytest.mark.parametrize("static", [False, True])
def test_greedy_generation_same_with_and_without_cache(static):
    model = mf.build_model(tiny(position="rope", n_kv_heads=2)).eval()
    prompt = torch.randint(0, 37, (3, 5))
    a = model.generate(prompt, 20, temperature=0, use_cache=False)
    b = model.generate(prompt, 20, temperature=0, use_cache=True, static_cache=static)
    assert a.shape == (3, 25)
    assert torch.equal(a, b)


def test_shortformer_positions_reach_queries_and_keys_only():
    """The residual stream and the values carry no position; the queries and keys do, so patterns depend on it."""
    model = mf.build_model(tiny(position="shortformer", n_kv_heads=2)).eval()
    idx = torch.full((1, 6), 3)                              # one token repeated: only positions differ
    with torch.no_grad():
        _, cache = model.run_with_cache(idx)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], model.tok_emb.weight[idx])
    v, k = cache["blocks.0.attn.hook_v"][0], cache["blocks.0.attn.hook_k"][0]       # (Hkv, T, Dh)
    torch.testing.assert_close(v, v[:, :1].expand_as(v))
    assert not torch.allclose(k, k[:, :1].expand_as(k))
    assert model.num_params(non_embedding=True) == model.num_params() - 37 * 32 - 64 * 32
    assert 0.9 < float(model.position.wpe.weight.detach().std()) < 1.1                 # the normed input's scale
    no_norm = mf.build_model(tiny(position="shortformer", norm="none"))
    assert float(no_norm.position.wpe.weight.detach().std()) < 0.03                    # the residual's scale (init_std)


def test_sampling_respects_top_k_and_top_p():
    from modformer.models.generation import sample_next

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).flatten().tolist()) <= {3, 4}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).flatten().tolist()) == {4}
    assert set(sample_next(logits, 100.0, generator=g).flatten().tolist()) == {0, 1, 2, 3, 4}


def test_return_cache_api():
    model = mf.build_model(tiny()).eval()
    idx = torch.randint(0, 37, (1, 6))
    logits, cache = model(idx, return_cache=True)
    nxt, cache = model(idx[:, :1], cache=cache, return_cache=True)
    assert logits.shape == (1, 6, 37) and nxt.shape == (1, 1, 37) and cache.length == 7


def test_save_load_round_trip(tmp_path):
    model = mf.build_model(tiny(position="rope", ffn="swiglu", norm="rmsnorm", n_kv_heads=2,
                                attention_options={}))
    idx = torch.randint(0, 37, (2, 10))
    mf.save(model, tmp_path / "m")
    loaded = mf.load(tmp_path / "m")
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert loaded.lm_head.weight is loaded.tok_emb.weight     # tying survives the round trip
    assert not list(tmp_path.glob("m/*.tmp"))


def test_gradient_checkpointing_gives_identical_gradients():
    cfg = tiny(grad_checkpointing=False)
    a = mf.build_model(cfg)
    b = mf.build_model(tiny(grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 37, (2, 16))
    for m in (a, b):
        m.train()
        m.loss(idx[:, :-1], idx[:, 1:]).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_tiny_model_overfits_a_batch():
    model = mf.build_model(tiny(position="rope", ffn="swiglu"))
    idx = torch.randint(0, 37, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.05


def test_param_and_flop_counts():
    cfg = tiny(bias=False, final_norm=False, norm="rmsnorm", position="rope", d_ff=64)
    model = mf.build_model(cfg)
    D, L, V, F = 32, 2, 37, 64
    per_block = 4 * D * D + 2 * D * F + 2 * D          # qkv + out, up + down, two RMSNorm weights
    assert model.num_params() == V * D + L * per_block
    assert model.num_params(non_embedding=True) == L * per_block
    assert model.flops_per_token(10) == 6 * (V * D + L * per_block) + 12 * L * 4 * 8 * 10


def test_glu_hidden_size_rounded_like_llama():
    model = mf.build_model(tiny(d_model=128, ffn="swiglu", ffn_multiple_of=64))
    assert model.blocks[0].mlp.up.out_features == 384     # int(2/3 * 512) = 341 -> 384


def test_compiled_static_decoding_matches_eager():
    """generate(compile=True): positions enter as a tensor, cache writes are index_copy_; same tokens."""
    model = mf.build_model(tiny(position="rope", n_kv_heads=2)).eval()
    prompt = torch.randint(0, 37, (2, 4))
    eager = model.generate(prompt, 8, temperature=0, use_cache=False)
    assert torch.equal(model.generate(prompt, 8, temperature=0, compile=True), eager)
    other = torch.randint(0, 37, (2, 5))     # same total length: the decoder and its cache are reused
    assert torch.equal(model.generate(other, 7, temperature=0, compile=True),
                       model.generate(other, 7, temperature=0, use_cache=False))
    model.double()                          # new weight tensors (and dtype): the decoder must be rebuilt
    assert torch.equal(model.generate(other, 7, temperature=0, compile=True),
                       model.generate(other, 7, temperature=0, use_cache=False))


def test_graph_decoder_stops_at_eos_like_the_eager_loop(monkeypatch):
    """With an EOS token the graph decoder pads finished rows with EOS and trims where every row has ended."""
    from modformer.models.generation import GraphDecoder

    monkeypatch.setattr(GraphDecoder, "check_every", 4)
    torch.manual_seed(0)
    model = mf.build_model(tiny()).eval()
    prompt = torch.randint(0, 37, (3, 4))
    eos = int(model.generate(prompt, 12, temperature=0)[0, -1])     # a token the first row emits
    for batch in [prompt, prompt[:1].repeat(2, 1)]:                 # one row finishes / every row finishes
        eager = model.generate(batch, 40, temperature=0, eos_token_id=eos)
        assert torch.equal(model.generate(batch, 40, temperature=0, eos_token_id=eos, compile=True), eager)
    assert eager.shape[1] < 44 and (eager[:, -1] == eos).all()


@pytest.mark.parametrize("model", ["gpt", "hourglass"])
def test_scale_embeddings_is_sqrt_d_times_the_token_embedding(model):
    """scale_embeddings=True equals the unscaled model whose embedding table is multiplied by sqrt(d)."""
    kw = dict(vocab_size=50, n_layer=2, d_model=32, n_head=4, max_seq_len=16, position="sinusoidal",
              tie_embeddings=False, model=model)
    torch.manual_seed(0)
    scaled = mf.build_model(mf.ModelConfig(scale_embeddings=True, **kw)).eval()
    plain = mf.build_model(mf.ModelConfig(**kw)).eval()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        plain.tok_emb.weight.mul_(32 ** 0.5)
    idx = torch.randint(50, (2, 16))
    torch.testing.assert_close(scaled(idx), plain(idx))
    assert not torch.allclose(scaled(idx), mf.build_model(mf.ModelConfig(**kw)).eval()(idx))


def test_counted_flops_are_6n_plus_full_attention():
    """flop_counter on one training step = 6 x matmul weights + 3 x 4 x T x d per layer (full score matrix)."""
    from modformer.bench.common import counted_train_flops_per_token

    V, L, D, T = 100, 2, 64, 32
    model = mf.build_model(mf.ModelConfig(vocab_size=V, n_layer=L, d_model=D, n_head=4, max_seq_len=T))
    matmul_weights = L * (4 * D * D + 2 * D * 4 * D) + V * D          # qkv + out, MLP up + down, tied LM head
    assert counted_train_flops_per_token(model, T, V) == 6 * matmul_weights + 3 * L * 4 * T * D


def test_throughput_bench_runs_tiny_preset_and_writes_profiles(tmp_path):
    """`modformer bench throughput` on the tiny preset: every variant timed, the HF peer included, JSON and the
    per-variant profiler tables written."""
    import json

    from modformer.bench import throughput

    assert throughput.main(["--preset", "tiny", "--steps", "1", "--no-compile", "--device", "cpu",
                            "--profile-dir", str(tmp_path / "prof"), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "throughput.json").read_text())
    variants = [r["variant"] for r in result["rows"]]
    assert variants == ["modformer fp32", "modformer +bf16 autocast", "modformer +fused AdamW",
                        "HF GPT2LMHeadModel (sdpa)"]
    assert all(r["step_ms"] > 0 for r in result["rows"])
    tables = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert len(tables) == 4 and "aten::" in (tmp_path / "prof" / tables[0]).read_text()


def test_write_result_to_a_chosen_file_leaves_the_default_file_alone(tmp_path):
    """A benchmark's ``--out FILE`` in the results folder must not overwrite (or move) ``<name>.json``."""
    import json

    from modformer.bench.common import write_result

    (tmp_path / "hourglass.json").write_text("{}")
    path = write_result("hourglass", {"x": 1}, [], "cpu", out_dir=tmp_path, filename="hourglass_t8192.json")
    assert path == tmp_path / "hourglass_t8192.json" and json.loads(path.read_text())["headline"] == {"x": 1}
    assert (tmp_path / "hourglass.json").read_text() == "{}"


def test_time_to_loss_bench_times_child_runs_to_the_target(tmp_path):
    """`modformer bench time-to-loss` on CPU: a real `modformer train` child process per run, timed to its early
    stop at the target; a run that cannot reach it has no time; the headline compares with the nanoGPT-like peer."""
    import json

    from modformer.cli import main

    tiny_run = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=32", "data.seq_len=32",
                "train.batch_size=8", "train.steps=20", "train.eval_every=10", "train.eval_batches=2",
                "train.compile=false", "train.log_every=10", "train.sample_tokens=0", "train.tensorboard=false"]
    args = ["bench", "time-to-loss", "--device", "cpu", "--target", "4.6", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path), "--set", "train.threads=1",
            "--run", "nanogpt_like", "configs/shakespeare_char.yaml", *tiny_run,
            "--run", "muon", "configs/shakespeare_char.yaml", *tiny_run, "train.early_stop_target=1.0"]
    assert main(args) == 0
    result = json.loads((tmp_path / "time_to_loss.json").read_text())
    peer, ours = result["rows"]
    assert peer["returncode"] == 0 and 0 < peer["seconds_to_target"] < peer["process_seconds"]
    assert peer["steps_to_target"] == 10                       # ln(65) = 4.17 < 4.6 at the first evaluation
    assert ours["returncode"] == 0 and ours["seconds_to_target"] is None and ours["steps"] == 20   # never 1.0
    head = result["headline"]
    assert head["nanogpt_like_seconds_to_target"] == peer["seconds_to_target"] and head["seconds_to_target"] is None
    assert head["best_run"] == "nanogpt_like" and "speedup_vs_nanogpt_like" not in head
    assert result["device"].startswith("cpu")


def test_attention_bench_compares_each_path_with_raw_sdpa(tmp_path):
    """`modformer bench attention` on CPU: raw SDPA and our dispatcher timed on the same q/k/v, ratios to raw SDPA
    (1 for raw itself) and the headline written."""
    import json

    from modformer.bench import attention

    assert attention.main(["--seq", "32", "--head-dim", "8", "--tokens", "64", "--width", "16", "--iters", "1",
                           "--rounds", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "attention.json").read_text())
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"raw_sdpa", "modformer_sdpa"}             # flex has no CPU backward: not timed
    assert rows["raw_sdpa"]["fwd_ratio_vs_sdpa"] == 1.0 and rows["raw_sdpa"]["fwd_bwd_ratio_vs_sdpa"] == 1.0
    assert rows["modformer_sdpa"]["fwd_bwd_ms"] > 0 and rows["modformer_sdpa"]["batch"] == 2
    assert result["headline"]["min_ratio_vs_sdpa"] > 0


@pytest.mark.parametrize("family", ["gpt", "hourglass"])
def test_embed_noise_only_in_training_and_within_the_neftune_bound(family):
    """model.embed_noise (NEFTune): eval outputs unchanged; in training the embeddings move by <= alpha/sqrt(T d)."""
    cfg = mf.ModelConfig(model=family, vocab_size=11, n_layer=2, d_model=16, n_head=2, max_seq_len=16, dropout=0.0)
    torch.manual_seed(0)
    plain = mf.build_model(cfg)
    noisy = mf.build_model(dataclasses.replace(cfg, embed_noise=5.0))
    noisy.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 11, (3, 16))
    torch.testing.assert_close(noisy.eval()(idx), plain.eval()(idx), rtol=0, atol=0)
    seen = {}
    noisy.train()
    noisy.hook_embed.add_hook(lambda x, hook: seen.setdefault("x", x.detach()))
    noisy(idx)
    delta = seen["x"] - plain.tok_emb(idx)
    assert 0 < delta.abs().max() <= 5.0 / (16 * 16) ** 0.5
