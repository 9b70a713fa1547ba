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
