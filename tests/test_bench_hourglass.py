"""`modformer bench hourglass`: the fair-baseline protocol's arithmetic (time to the tuned GPT's best loss, lr
choice, seed pairing), the profiler's component split, and a tiny CPU run through the registry."""

from __future__ import annotations

import json

import pytest
import torch

from modformer.bench.common import RESULT_KEYS
from modformer.bench.studies import hourglass as hg
from modformer.bench.studies.hourglass_profile import parts
from modformer.cli import main
from modformer.config import ModelConfig
from modformer.layers.context import Context
from modformer.saving import build_model


def curve(points: list[tuple[float, float]]) -> list[dict]:
    """Evaluation points (train_s, loss) every 100 steps; FLOPs = 10 per step."""
    return [{"step": 100 * (i + 1), "train_s": t, "loss": loss, "flops": 1000 * (i + 1)}
            for i, (t, loss) in enumerate(points)]


def row(arm: str, role: str, lr: float, seed: int, points: list[tuple[float, float]], warmup: float = 2.0) -> dict:
    c = curve(points)
    return {"arm": arm, "role": role, "lr": lr, "seed": seed, "curve": c, "warmup_s": warmup,
            "best_val_loss": min(p["loss"] for p in c), "tokens_per_s": 1e6 if arm == "gpt" else 9e5,
            "params_non_embedding": 1000 if arm == "gpt" else 1010}


def test_compare_times_the_hourglass_to_gpts_best_loss_without_compile_warmup():
    gpt = row("gpt", "sweep", 1e-3, 0, [(12, 2.0), (22, 1.6), (32, 1.5)])
    fast = row("hourglass", "sweep", 1e-3, 0, [(7, 1.7), (12, 1.5), (17, 1.4)])
    out = hg.compare(gpt, fast)
    assert out["target_loss"] == 1.5
    assert out["time_ratio"] == pytest.approx((32 - 2) / (12 - 2))          # first evaluation at or below 1.5
    assert out["time_ratio_incl_compile"] == pytest.approx(32 / 12)
    assert out["flops_ratio"] == pytest.approx(3 / 2)                       # 3rd vs 2nd evaluation
    assert out["time_ratio_at_hourglass_best"] is None                      # GPT never reaches 1.4
    slow = row("hourglass", "sweep", 1e-3, 0, [(10, 1.9), (20, 1.7), (30, 1.55)])
    out = hg.compare(gpt, slow)
    assert out["time_ratio"] is None and out["hourglass_s_to_target"] is None
    assert out["time_ratio_at_hourglass_best"] == pytest.approx((32 - 2) / (30 - 2))   # both reach 1.55


def test_summarise_pairs_seeds_at_each_models_own_best_lr():
    """GPT's best lr is 2e-3, the hourglass's 1e-3; seeds 1, 2 run at those; ratios are paired by seed."""
    rows = [row("gpt", "sweep", 1e-3, 0, [(10, 1.8), (20, 1.6)]),
            row("gpt", "sweep", 2e-3, 0, [(10, 1.7), (20, 1.5)]),
            row("hourglass", "sweep", 1e-3, 0, [(4, 1.5), (8, 1.4)]),       # reaches 1.5 at 4 s: (20-2)/(4-2) = 9
            row("hourglass", "sweep", 2e-3, 0, [(4, 1.9), (8, 1.8)]),
            row("gpt", "seed", 2e-3, 1, [(10, 1.7), (20, 1.52)]),
            row("hourglass", "seed", 1e-3, 1, [(5, 1.6), (8, 1.5)]),        # 1.52 at 8 s: 18 / 6 = 3
            row("gpt", "seed", 2e-3, 2, [(10, 1.7), (20, 1.49)]),
            row("hourglass", "seed", 1e-3, 2, [(6, 1.6), (11, 1.45)])]      # 1.49 at 11 s: 18 / 9 = 2
    head, pairs = hg.summarise(rows, [1e-3, 2e-3])
    assert (head["lr_gpt"], head["lr_hourglass"], head["seeds"]) == (2e-3, 1e-3, 3)
    assert [p["seed"] for p in pairs] == [0, 1, 2]
    assert head["time_ratio_vs_tuned_gpt_per_seed"] == pytest.approx([9.0, 3.0, 2.0])
    assert head["time_ratio_vs_tuned_gpt"] == pytest.approx(3.0)
    assert head["time_ratio_vs_tuned_gpt_min"] == pytest.approx(2.0) and head["goal_2x_met"]
    assert head["best_val_loss_gpt"] == pytest.approx(1.5) and head["baseline"] == "rope, lr swept"
    assert head["tokens_per_s_ratio"] == pytest.approx(0.9) and head["params_ratio"] == pytest.approx(1.01)
    rows[-1] = row("hourglass", "seed", 1e-3, 2, [(6, 1.6), (11, 1.5)])    # seed 2 never reaches 1.49
    head, _ = hg.summarise(rows, [1e-3, 2e-3])
    assert head["time_ratio_vs_tuned_gpt"] is None and not head["goal_2x_met"]


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_profiled_components_chain_back_to_the_models_loss(position):
    """The profiler times the pieces it should: chaining them (compression output + the latent position
    embedding, if any, into the latent stack) reproduces the model's loss, so no part of the path is missing."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, n_layer=2, d_model=16, n_head=2, max_seq_len=32, model="hourglass",
                      position=position, model_options={"schedule": "alternate", "encoder_layers": [2, 0],
                                                        "decoder_layers": [2]})
    model = build_model(cfg).double().eval()
    idx, targets = torch.randint(11, (2, 32)), torch.randint(11, (2, 32))
    layers, components = parts(model, idx, targets)
    p = {name: f for name, (f, _) in components.items()}
    x = model.tok_emb(idx) + (model.position.embed_arange(torch.arange(32)) if position == "learned" else 0)
    skip = p["token_layers_before"](x)
    lat = p["compression"](skip)
    if position == "learned":
        lat = lat + model.positions[0].embed_arange(torch.arange(lat.shape[1]))
    up = p["upsampling"](p["latent_stack"](lat), skip)
    if position == "learned":
        up = up + model.position.embed_arange(torch.arange(32))
    loss = p["head_and_loss"](p["token_layers_after"](up))
    assert torch.allclose(loss, model.loss(idx, targets), rtol=1e-12, atol=0)
    # one layer of each kind on its own input: the local one on groups of 4 folded into the batch
    (f_local, (x_local,)), (f_global, (x_global,)) = layers["local_layer"], layers["global_layer"]
    assert x_local.shape == (2 * 8, 4, 16) and x_global.shape == (2, 32, 16)
    torch.testing.assert_close(f_local(x_local), model.encoders[0].blocks[0](
        x_local, Context(pos=torch.arange(4), position=model.position)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f_global(x_global), model.encoders[0].blocks[1](
        x_global, Context(pos=torch.arange(32), position=model.position, q_offset=0)), rtol=1e-12, atol=1e-12)


def test_tiny_study_through_the_registry_writes_sweep_seed_rows_and_a_profile(tmp_path):
    """CPU smoke run (tiny models, 2 steps; not a measurement): one sweep run per model, a second seed at the
    chosen lr, the headline keys of issue 25 and the per-component profile, in the results schema."""
    out = tmp_path / "hg.json"
    assert main(["bench", "hourglass", "--tiny", "--steps", "2", "--lrs", "1e-3", "--seeds", "2", "--profile",
                 "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(k in result for k in RESULT_KEYS) and result["benchmark"] == "hourglass"
    assert [(r["arm"], r["role"], r["seed"]) for r in result["rows"]] == [
        ("gpt", "sweep", 0), ("hourglass", "sweep", 0), ("gpt", "seed", 1), ("hourglass", "seed", 1)]
    assert all(r["position"] == "rope" and r["norm_placement"] == "pre" for r in result["rows"])
    head = result["headline"]
    for key in ("time_ratio_vs_tuned_gpt", "time_ratio_vs_tuned_gpt_min", "tokens_per_s_gpt",
                "tokens_per_s_hourglass"):
        assert key in head
    assert head["seeds"] == 2 and head["baseline"] == "rope, lr swept" and len(result["pairs"]) == 2
    comps = result["profile"]["hourglass"]["components"]
    assert list(comps) == ["token_layers_before", "compression", "latent_stack", "upsampling",
                           "token_layers_after", "head_and_loss", "other"]
    assert all(comps[name]["wall_ms"] > 0 for name in list(comps)[:-1])
    prof = result["profile"]
    assert set(prof["hourglass"]["layers"]) == {"local_layer", "global_layer"}
    assert (prof["hourglass"]["local_backend"], prof["hourglass_local_eager"]["local_backend"]) == ("sdpa", "eager")
    # a second call adds an lr to the sweep: the earlier runs are kept, not rerun
    again = tmp_path / "hg2.json"
    assert main(["bench", "hourglass", "--tiny", "--steps", "2", "--lrs", "1e-3,2e-3", "--seeds", "2",
                 "--reuse", str(out), "--runs-dir", str(tmp_path / "runs"), "--out", str(again)]) == 0
    result = json.loads(again.read_text())
    names = [r["name"] for r in result["rows"]]
    assert len(names) == len(set(names)) and sum(bool(r.get("reused_from")) for r in result["rows"]) == 4
    assert {"shakespeare_gpt_lr0.002_s0", "shakespeare_hourglass_lr0.002_s0"} <= set(names)
    assert result["profile"]["reused_from"] == str(out) and result["headline"]["seeds"] == 2


def test_budget_skips_runs_that_would_not_fit(tmp_path):
    out = tmp_path / "hg.json"
    assert main(["bench", "hourglass", "--tiny", "--budget-s", "1e-9", "--lrs", "1e-3,2e-3", "--seeds", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == [] and len(result["skipped"]) == 4 and result["headline"]["seeds"] == 0


def test_unknown_variant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        hg.main(["--variants", "nope"])
    assert exc.value.code == 2 and "--variants: unknown ['nope']" in capsys.readouterr().err
