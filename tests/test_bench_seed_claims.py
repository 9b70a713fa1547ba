"""Issue 29's study entries at toy scale through ``modformer bench``: positions, grad-checkpointing,
recipe-stability, multichannel (schema, the cells each must fill or leave empty, and their own sanity checks)."""

from __future__ import annotations

import json

import pytest

from modformer.cli import main


def result(path) -> dict:
    data = json.loads(path.read_text())
    assert {"benchmark", "command", "device", "torch", "git_commit", "date", "headline", "rows"} <= set(data)
    return data


def test_positions_learned_cannot_extrapolate_the_others_do(tmp_path, capsys):
    assert main(["bench", "positions", "--tiny", "--steps", "2", "--seeds", "1", "--positions", "learned", "alibi",
                 "--seq-len", "8", "--factors", "1", "2", "--eval-tokens", "64", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = result(tmp_path / "positions.json")
    cell = {(r["position"], r["factor"]): r for r in data["rows"]}
    assert cell["learned", 2]["loss"] is None and "cannot" in cell["learned", 2]["note"]
    assert cell["learned", 1]["loss"] > 0 and cell["learned", 1]["loss_beyond"] is None   # nothing beyond T at T
    assert cell["alibi", 2]["loss"] > 0 and cell["alibi", 2]["loss_beyond"] > 0
    assert {r["position"] for r in data["summary"]} == {"learned", "alibi"}
    assert (tmp_path / "positions.png").stat().st_size > 0


def test_grad_checkpointing_changes_memory_not_the_loss(tmp_path, capsys):
    assert main(["bench", "grad-checkpointing", "--tiny", "--models", "tiny-4l", "--warmup", "1", "--steps", "1",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = result(tmp_path / "grad_checkpointing.json")
    off, on = data["rows"]
    assert (off["grad_checkpointing"], on["grad_checkpointing"]) == (False, True)
    assert off["first_loss"] == on["first_loss"]                   # recomputation, not approximation
    assert on["peak_above_start_mib"] < off["peak_above_start_mib"]   # fewer saved activations (4 x 128 tokens)
    assert data["headline"]["tiny-4l_first_loss_diff"] == 0


def test_recipe_stability_counts_non_finite_runs_and_steps_to_target(tmp_path, capsys):
    common = ["bench", "recipe-stability", "--tiny", "--seeds", "2", "--depths", "1", "--steps", "4",
              "--eval-every", "2", "--log-every", "1", "--device", "cpu"]
    assert main([*common, "--target", "99", "--out", str(tmp_path / "ok")]) == 0
    data = result(tmp_path / "ok" / "recipe_stability.json")
    assert data["headline"]["y2017_nonfinite_share"] == data["headline"]["modern_nonfinite_share"] == 0
    assert all(r["steps_to_target"] == 2 and r["grad_cv_time"] is not None for r in data["rows"])
    assert [(s["recipe"], s["runs"], s["reached"]) for s in data["summary"]] == [("y2017", 2, 2), ("modern", 2, 2)]
    # the same cells in two processes at once: the same rows, in the same order (a child may use another CPU
    # thread count, so float32 reductions may round differently: ~1e-7 relative per operation)
    assert main([*common, "--target", "99", "--jobs", "2", "--out", str(tmp_path / "jobs")]) == 0
    jobs = result(tmp_path / "jobs" / "recipe_stability.json")["rows"]
    assert [{k: v for k, v in r.items() if not isinstance(v, float)} for r in jobs] == \
        [{k: v for k, v in r.items() if not isinstance(v, float)} for r in data["rows"]]
    floats = [{k: v for k, v in r.items() if isinstance(v, float)} for r in data["rows"]]
    assert [{k: v for k, v in r.items() if isinstance(v, float)} for r in jobs] == \
        [pytest.approx(f, rel=1e-5) for f in floats]
    # an absurd learning rate without clipping: every run diverges, and the study records it instead of failing
    nan = ["--recipes", "y2017", "--lrs", "1e4", "--grad-clip", "0", "--name", "diverged",
           "--out", str(tmp_path / "nan")]
    assert main([*common, *nan]) == 0
    capsys.readouterr()
    data = result(tmp_path / "nan" / "diverged.json")                  # --name: another question, another file
    assert data["headline"]["y2017_nonfinite_share"] == 1
    assert all(r["nonfinite"] and r["nonfinite_step"] >= 1 for r in data["rows"])


def test_multichannel_gains_are_paired_against_mha(tmp_path, capsys):
    assert main(["bench", "multichannel", "--tiny", "--sizes", "1x32x2", "--seq-lens", "16", "32", "--variants", "mha",
                 "multichannel_s2", "--steps", "2", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    data = result(tmp_path / "multichannel.json")
    loss = {(r["seq_len"], r["variant"]): r["final_val_loss"] for r in data["rows"]}
    for r in data["rows"]:
        assert r["gain"] == pytest.approx(loss[r["seq_len"], "mha"] - r["final_val_loss"])
        assert r["batch"] == 64 // r["seq_len"]                     # the same tokens per step at every T
    mc = [r for r in data["rows"] if r["variant"] == "multichannel_s2"]
    assert all(abs(r["non_embedding_params"] / data["rows"][0]["non_embedding_params"] - 1) < 0.05 for r in mc)
    head = data["headline"]
    assert head["gain_multichannel_s2_1x32x2_T32"] == pytest.approx(mc[1]["gain"])
    assert head["gain_grows_with_T"] == (mc[1]["gain"] > mc[0]["gain"])
    assert head["gain_grows_with_size"] is None                      # one size: no claim either way
    assert (tmp_path / "multichannel.png").stat().st_size > 0


def test_multichannel_rejects_a_bad_size(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "multichannel", "--sizes", "4x250x3", "--tiny"])
    assert "width divisible by heads" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["positions", "grad-checkpointing", "recipe-stability", "multichannel"])
def test_entries_are_listed(name, capsys):
    assert main(["bench", "list"]) == 0
    assert name in capsys.readouterr().out
