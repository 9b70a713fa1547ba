"""Circuits on every model kind the toolbox makes: structurally pruned (per-layer head counts / FFN widths) and
LoRA-adapted (merged, and the adapter's per-head QK / OV deltas)."""

import copy
import json

import pytest
import torch
from _helpers import randomized

from modformer import interp
from modformer.compress.structured import remove_heads, remove_neurons
from modformer.interp.deltas import adapter_head_deltas, head_deltas


def test_pruned_model_weights_and_scores_keep_the_surviving_heads():
    model = randomized()
    pruned = remove_heads(model, {0: [1], 1: [0, 3]})
    w0, w = interp.extract_weights(model), interp.extract_weights(pruned)
    assert w.W_Q.shape == (2, 3, 32, 8) and w.head_counts == [3, 2]
    assert w.present().tolist() == [[True, True, True], [True, True, False]]
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q"):
        torch.testing.assert_close(getattr(w, name)[0], getattr(w0, name)[0, [0, 2, 3]])
        torch.testing.assert_close(getattr(w, name)[1, :2], getattr(w0, name)[1, [1, 2]])
        assert not getattr(w, name)[1, 2].any()                        # padding is a zero head
    s0, s = interp.head_scores(model, length=8, batch=4), interp.head_scores(pruned, length=8, batch=4)
    for key in ("prev_token", "induction", "copying"):
        # layer 0 reads the same residual stream, so its surviving heads score exactly as before
        torch.testing.assert_close(s[key][0], s0[key][0, [0, 2, 3]], atol=1e-6, rtol=1e-5)
        assert torch.isnan(s[key][1, 2]) and torch.isfinite(s[key][1, :2]).all()
    assert [r["name"] for r in interp.head_table(s)] == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1"]


def test_analyze_writes_valid_json_for_pruned_heads_and_neurons(tmp_path):
    model = randomized(attn_only=False, d_ff=16)
    pruned = remove_neurons(remove_heads(model, {1: [2]}), {0: list(range(5))})
    summary = interp.analyze(pruned, tmp_path)
    data = json.loads((tmp_path / "head_scores.json").read_text())   # strict JSON: no NaN for the absent head
    assert "NaN" not in (tmp_path / "head_scores.json").read_text()
    assert data["model"]["head_counts"] == [4, 3] and len(summary["heads"]) == 7
    assert len(data["composition"]["k"][0]) == 4


def test_transformer_lens_conversion_refuses_per_layer_shapes():
    pytest.importorskip("transformer_lens")
    from modformer.interp.tl import tl_config

    with pytest.raises(ValueError, match="layer_overrides"):
        tl_config(remove_heads(randomized(), {0: [0]}))


def _dense_delta(w0, w1, kind: str) -> torch.Tensor:
    if kind == "qk":
        m0, m1 = w0.W_Q @ w0.W_K.transpose(-1, -2), w1.W_Q @ w1.W_K.transpose(-1, -2)
    else:
        m0, m1 = w0.W_V @ w0.W_O, w1.W_V @ w1.W_O
    return (m1 - m0).double().pow(2).sum((-1, -2)).sqrt() / m0.double().pow(2).sum((-1, -2)).sqrt()


def test_lora_adapter_deltas_name_the_adapted_heads():
    pytest.importorskip("peft")
    from modformer.compress.lora import add_lora, merged_model

    model = randomized()
    base = copy.deepcopy(model)
    pm = add_lora(model, r=2, targets=("blocks.1.attn.qkv", "blocks.0.attn.out"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    d = adapter_head_deltas(pm)
    # layer-0 queries/keys untouched: zero up to the float64 cancellation in the factored norm (~sqrt(1e-16))
    assert (d["qk"][0] < 1e-6).all() and (d["qk"][1] > 1e-3).all()
    assert (d["ov"] > 1e-3).all()                                     # layer 0 via out, layer 1 via v
    merged = merged_model(copy.deepcopy(pm))
    w0, w1 = interp.extract_weights(base, fold_ln=False), interp.extract_weights(merged, fold_ln=False)
    for kind in ("qk", "ov"):
        torch.testing.assert_close(d[kind].double(), _dense_delta(w0, w1, kind), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head_deltas(base, merged)["ov"], d["ov"])
    # the merged model is an ordinary model: circuits run on it and see the changed OV circuits
    assert not torch.equal(interp.copying_scores(w1)[1], interp.copying_scores(w0)[1])
    scores = interp.head_scores(merged, length=8, batch=4)
    assert torch.isfinite(scores["induction"]).all()


def test_mixed_induction_batches_hold_one_repeat_inside_filler():
    from modformer.interp.studies import MixedInduction

    data = MixedInduction((3, 5), n_symbols=16, seq_len=12)
    x, y = data.batch("train", 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 12)
    starts = set()
    for row_x, row_y in zip(x, y):
        targets = (row_y != -100).nonzero().flatten()
        L = len(targets)                                         # targets: the whole second copy (the task's)
        assert L in (3, 5) and torch.equal(targets, torch.arange(targets[0], targets[0] + L))
        s0 = int(targets[0]) - L + 1                             # the block's first token
        block = torch.cat([row_x[s0:s0 + 2 * L - 1], row_y[s0 + 2 * L - 2:s0 + 2 * L - 1]])
        assert torch.equal(block[:L], block[L:]) and torch.equal(row_y[targets], block[L:])
        starts.add(s0)
    assert len(starts) > 3                                       # the block moves


def test_pruning_circuits_study_rows_track_the_named_heads():
    from modformer.interp.studies import pruning_circuits_study

    result = pruning_circuits_study(levels=(0.5,), steps=5, d_model=16, n_head=4, probe_length=3, threshold=0.0,
                                    lengths=(3, 4), n_symbols=16, seq_len=8, batch_size=8)
    base, half = result["rows"]
    assert base["level"] == 0.0 and half["level"] == 0.5 and len(half["removed"]) == 4
    assert len(base["induction_heads"]) == 4 and len(base["prev_token_heads"]) == 4     # threshold 0: every head
    kept = set(half["induction_heads_kept"]) | set(half["prev_token_heads_kept"])
    assert kept == {f"L{i}H{h}" for i in range(2) for h in range(4)} - set(half["removed"])
    assert len(result["heads"]) == 8 and all("importance" in r for r in result["heads"])
    assert result["headline"]["largest_level_within_5pct_loss"] in (0.0, 0.5)


def test_circuits_cli_analyses_a_lora_adapter(tmp_path, capsys):
    pytest.importorskip("peft")
    from test_compress import run_cfg

    from modformer.cli import main
    from modformer.train.trainer import Trainer

    Trainer(run_cfg(tmp_path, steps=2)).fit()
    run = tmp_path / "r"
    assert main(["lora", str(run), "--rank", "2", "--steps", "3", "--out", str(tmp_path / "ad")]) == 0
    capsys.readouterr()
    assert main(["circuits", str(run), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "c")]) == 0
    assert str(tmp_path / "c" / "adapter_deltas.json") in capsys.readouterr().out
    rows = json.loads((tmp_path / "c" / "adapter_deltas.json").read_text())["heads"]
    assert len(rows) == 8 and all(r["qk"] >= 0 and r["ov"] > 0 for r in rows)     # qkv and out are adapted
    assert (tmp_path / "c" / "head_scores.json").is_file()
    assert main(["circuits", str(run), "--adapter", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_pruning_study_on_a_saved_run(tmp_path):
    from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from modformer.interp.studies import pruning_circuits_study
    from modformer.train.trainer import Trainer

    cfg = RunConfig(name="ind", out_dir=str(tmp_path),
                    model=ModelConfig(n_layer=2, d_model=16, n_head=4, max_seq_len=8, attn_only=True),
                    data=DataConfig(name="induction", options={"length": 4, "n_symbols": 16, "n_examples": 200}),
                    train=TrainConfig(steps=2, batch_size=8, eval_every=2, eval_batches=1, progress=False,
                                      tensorboard=False, device="cpu", sample_tokens=0))
    Trainer(cfg).fit()
    result = pruning_circuits_study(levels=(0.5,), probe_length=3, threshold=0.0, run_dir=str(tmp_path / "ind"))
    base, half = result["rows"]
    assert result["train"]["run_dir"] == str(tmp_path / "ind") and len(half["removed"]) == 4
    assert base["loss"] > 0 and half["loss_ratio"] == pytest.approx(half["loss"] / base["loss"], rel=1e-3)


# ---- the hourglass: circuits on its attention layers over tokens (views.py) ----------------------------------

def _hourglass(options: dict | None = None, **kw) -> torch.nn.Module:
    import modformer as mf

    base = dict(vocab_size=32, n_layer=2, d_model=32, n_head=2, max_seq_len=32, model="hourglass",
                model_options=options or {})
    base.update(kw)
    torch.manual_seed(0)
    model = mf.build_model(mf.ModelConfig(**base)).eval()
    with torch.no_grad():                       # far from initialisation: every head and path carries signal
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln" in name and name.endswith("weight") else 0.0, 0.3)
    return model


def test_hourglass_previous_token_head_scores_one_at_its_real_layer():
    """Decoder head 0 is wired (positional QK) to attend to the previous token; everything else attends uniformly
    or is silenced. Only that head, reported at the decoder's path, may score ~1."""
    import modformer as mf

    D, Dh = 64, 32
    model = mf.build_model(mf.ModelConfig(
        vocab_size=32, n_layer=1, d_model=D, n_head=2, max_seq_len=32, model="hourglass", attn_only=True,
        position="learned", model_options={"schedule": "global", "group_len": 4})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if name.endswith("ln1.weight") or name == "ln_f.weight" else 0.0)
        model.tok_emb.weight[:, 32:] = 0.1 * torch.eye(32)                    # tokens: dims 32..63, small
        model.position.wpe.weight[:, :32] = torch.eye(32)                     # position t: dim t
        qkv = model.decoders[0].blocks[0].attn.qkv.weight                     # rows [q h0, q h1, k h0, k h1, v ...]
        a = 2.0
        qkv[:31, 1:32] = a * torch.eye(31)          # head 0: q_j = a x[j + 1], so q(t) points at position t - 1
        qkv[2 * Dh:2 * Dh + 32, :32] = a * torch.eye(32)                     # head 0: k_j = a x[j]
        model.lm_head.weight.normal_(0.0, 0.1)
    view = interp.circuit_view(model)
    assert view.layer_names == ["encoders.0.blocks.0", "decoders.0.blocks.0"]
    s = interp.head_scores(model, length=16, batch=4)
    assert s["prev_token"].shape == (2, 2)
    assert s["prev_token"][1, 0] > 0.95, s["prev_token"]
    assert (s["prev_token"][0] < 0.3).all() and s["prev_token"][1, 1] < 0.3       # uniform heads
    rows = {r["name"]: r for r in interp.head_table(s, modules=view.layer_names)}
    assert rows["L1H0"]["module"] == "decoders.0.blocks.0" and rows["L0H0"]["module"] == "encoders.0.blocks.0"
    # the view's pattern is the real module's hook, not another layer's
    idx = torch.randint(0, 32, (2, 20))
    _, real = model.run_with_cache(idx, names_filter="decoders.0.blocks.0.attn.hook_pattern")
    torch.testing.assert_close(interp.heads.attention_patterns(model, idx)["blocks.1.attn.hook_pattern"],
                               real["decoders.0.blocks.0.attn.hook_pattern"])


def test_hourglass_token_level_patterns_are_causal_and_local_ones_block_diagonal():
    g, T = 4, 10                                    # T not a multiple of g: the last window is padded, then cropped
    model = _hourglass({"schedule": "alternate", "encoder_layers": [2, 0], "decoder_layers": [1], "group_len": g})
    view = interp.circuit_view(model)
    assert [(t.module, t.attention) for t in view.layers] == [
        ("encoders.0.blocks.0", "local"), ("encoders.0.blocks.1", "global"), ("decoders.0.blocks.0", "local")]
    idx = torch.randint(0, 32, (3, T))
    cache = interp.heads.attention_patterns(model, idx)
    pats = interp.heads.stack_patterns(cache, 3)                              # (L, B, H, T, T)
    assert pats.shape == (3, 3, 2, T, T)
    assert not pats.triu(1).any()                                            # causal: nothing above the diagonal
    torch.testing.assert_close(pats.sum(-1), torch.ones(3, 3, 2, T))
    assert (pats[1].tril(-g) > 0).any()                                      # the global layer looks back further
    window = torch.arange(T) // g
    outside = window[:, None] != window[None, :]
    for i in (0, 2):
        assert not pats[i][..., outside].any()                               # local: within the token's window
    _, raw = model.run_with_cache(idx, names_filter="encoders.0.blocks.0.attn.hook_pattern")
    raw = raw["encoders.0.blocks.0.attn.hook_pattern"].view(3, 3, 2, g, g)    # (B, windows, H, g, g)
    for k in range(3):
        w = min(g, T - k * g)
        torch.testing.assert_close(pats[0, :, :, k * g:k * g + w, k * g:k * g + w], raw[:, k, :, :w, :w])


def test_analyze_on_an_hourglass_scores_token_layers_and_notes_the_rest(tmp_path):
    model = _hourglass({"encoder_layers": [1, 0], "decoder_layers": [1]}, attn_only=True)
    summary = interp.analyze(model, tmp_path)
    text = (tmp_path / "head_scores.json").read_text()
    data = json.loads(text)
    assert "NaN" not in text and data["model"]["kind"] == "hourglass"
    assert [r["module"] for r in data["model"]["layers"]] == ["encoders.0.blocks.0", "decoders.0.blocks.0"]
    assert {r["module"] for r in summary["heads"]} == {"encoders.0.blocks.0", "decoders.0.blocks.0"}
    assert len(summary["heads"]) == 4 and {"prev_token", "induction", "copying", "copying_rank"} <= set(
        summary["heads"][0])
    notes = " ".join(data["notes"])
    assert "latent_blocks.0" in notes and "latent_blocks.1" in notes and "not a product of weight" in notes
    assert {r["module"] for r in data["skipped"]} == {"latent_blocks.0", "latent_blocks.1", "shorten.0"}
    assert len(data["composition"]["q"]) == 2                                # encoder -> decoder through the skip
    md = (tmp_path / "head_scores.md").read_text()
    assert "decoders.0.blocks.0" in md and "## Skipped modules" in md and "## Notes" in md
    for name in ("circuits.html", "plots/head_scores.png", "plots/patterns.png", "plots/ov_eigenvalues.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    # without skips no W_E -> W_U reading holds: pattern scores only, and the note says why
    summary = interp.analyze(_hourglass({"skip": False}), tmp_path / "noskip")
    text = (tmp_path / "noskip" / "head_scores.json").read_text()
    assert "NaN" not in text and "copying" not in summary["heads"][0]
    assert any("weight-based circuits skipped" in n and "skip: false" in n for n in summary["notes"])
    assert summary["heads"][0]["copying_rank"] is None and summary["heads"][-1]["copying_rank"] is not None
    with pytest.raises(ValueError, match="skip: false"):
        interp.extract_weights(_hourglass({"skip": False}))


def test_circuits_refuses_unreadable_model_kinds_in_one_line(tmp_path, capsys):
    import modformer as mf
    from modformer.cli import main

    no_tokens = _hourglass({"encoder_layers": [0, 1], "decoder_layers": [0]})
    with pytest.raises(ValueError, match="'hourglass'") as e:
        interp.analyze(no_tokens, tmp_path / "a")
    assert "\n" not in str(e.value) and "attention variant" not in str(e.value)
    with pytest.raises(ValueError, match="model kind 'Linear'"):
        interp.head_scores(torch.nn.Linear(2, 2))
    mf.save(no_tokens, tmp_path / "saved")
    capsys.readouterr()
    assert main(["circuits", str(tmp_path / "saved"), "--out", str(tmp_path / "c")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[circuits]")]
    assert len(err) == 1 and err[0].startswith("error:") and "'hourglass'" in err[0], err


def test_circuits_cli_on_an_hourglass_run(tmp_path, capsys):
    from modformer.cli import main
    from modformer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from modformer.train.trainer import Trainer

    cfg = RunConfig(name="hg", out_dir=str(tmp_path),
                    model=ModelConfig(model="hourglass", n_layer=1, d_model=16, n_head=2, max_seq_len=8,
                                      model_options={"group_len": 2, "schedule": "global"}),
                    data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                    train=TrainConfig(steps=2, batch_size=16, eval_every=2, eval_batches=1, progress=False,
                                      tensorboard=False, device="cpu", sample_tokens=0))
    Trainer(cfg).fit()
    run = tmp_path / "hg"
    capsys.readouterr()
    assert main(["circuits", str(run)]) == 0
    assert str(run / "circuits" / "head_scores.json") in capsys.readouterr().out
    data = json.loads((run / "circuits" / "head_scores.json").read_text())
    assert data["model"]["kind"] == "hourglass" and len(data["heads"]) == 4
    assert [r["module"] for r in data["model"]["layers"]] == ["encoders.0.blocks.0", "decoders.0.blocks.0"]
    assert any("latent_blocks.0" in n for n in data["notes"]) and "fourier" in data
    assert (run / "circuits" / "circuits.html").stat().st_size > 0
