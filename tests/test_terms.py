"""Term importance (interp/terms.py): exact path expansion with frozen patterns, per-head attribution,
ablation of term classes, second-layer (composition) eigenvalues and the OV/QK dump."""

import json

import pytest
import torch
from _helpers import randomized
from safetensors.torch import load_file
from test_interp import induction_model

from modformer import interp
from modformer.compress.structured import remove_heads
from modformer.interp import terms
from modformer.interp.circuits import composition_eigenvalues


@pytest.mark.parametrize("kw", [{"n_layer": 1}, {}, {"norm": "rmsnorm", "attention": "gqa", "n_kv_heads": 2},
                                {"norm": "none", "final_norm": False, "bias": False},
                                {"position": "shortformer", "rezero": True}])
def test_path_terms_sum_to_the_logits(kw):
    model = randomized(**kw)
    if kw.get("rezero"):
        with torch.no_grad():
            for b in model.blocks:
                b.gate_attn.fill_(0.7)
    idx = torch.randint(0, 37, (2, 12))
    parts, logits = terms.path_terms(model, idx)
    L, H = model.cfg.n_layer, 4
    assert len(parts) == (H + 1) ** L + 1                              # every head sequence + the bias term
    assert parts[()].dtype == torch.float64
    # float64 throughout: only rounding of a few hundred products of O(1) numbers separates them
    torch.testing.assert_close(sum(parts.values()), logits, atol=1e-10, rtol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(logits.float(), model(idx), atol=1e-4, rtol=1e-4)
    sums = terms.class_sums(parts)
    assert list(sums) == (["direct", "one_head", "bias"] if L == 1 else ["direct", "one_head", "two_head", "bias"])


def test_paths_ending_in_a_head_are_that_heads_output():
    """No norms, no biases: a head's direct logit effect (hook_result @ W_U) is the sum of the paths ending in it."""
    model = randomized(norm="none", final_norm=False, bias=False).double()
    idx = torch.randint(0, 37, (2, 12))
    parts, _ = terms.path_terms(model, idx)
    _, cache = model.run_with_cache(idx, names_filter=lambda n: n.endswith("hook_result"))
    W_U = model.lm_head.weight.T
    for layer in range(2):
        for h in range(4):
            ending = sum(t for k, t in parts.items() if k != "bias" and k and k[-1] == (layer, h))
            direct = cache[f"blocks.{layer}.attn.hook_result"][:, :, h] @ W_U
            torch.testing.assert_close(ending, direct, atol=1e-10, rtol=1e-10)


def test_term_importance_names_the_induction_heads_value_path():
    """Hand-wired induction circuit: with patterns frozen, L1H0 copies the embedding (a one-head path); its
    K-composition with L0H0 lives in the frozen pattern, and no value path runs through L0H0 -> L1H0."""
    model = induction_model()
    g = torch.Generator().manual_seed(0)
    half = torch.stack([torch.randperm(12, generator=g)[:8] + 4 for _ in range(4)])
    idx = torch.cat([half, half], 1)
    targets = torch.full_like(idx, -100)
    targets[:, 8:-1] = idx[:, 9:]                                      # the predictable second copy
    result = terms.term_importance(model, idx, targets)
    assert result["top_paths"][0]["path"] == "L1H0" and result["top_paths"][0]["delta_loss"] > 1.0
    assert result["classes"]["one_head"]["delta_loss"] > 1.0
    assert result["classes"]["two_head"]["delta_loss"] == pytest.approx(0.0, abs=1e-9)
    assert result["loss"] < 0.1


def test_composition_eigenvalues_match_dense_matrices_and_find_induction():
    model = randomized(vocab_size=20, d_model=16, n_head=2)
    w = interp.extract_weights(model)
    ev = composition_eigenvalues(w, layer=1)
    assert ev["qk_k"].shape == (1, 2, 2, 8) and ev["ov_v_score"].shape == (1, 2, 2)
    E, U = w.W_E.double(), w.W_U.double()
    for g, h in [(0, 1), (1, 0)]:
        ov0 = w.W_V[0, g].double() @ w.W_O[0, g].double()
        dense = {"qk_k": E @ w.W_Q[1, h].double() @ w.W_K[1, h].double().T @ ov0.T @ E.T,
                 "ov_v": E @ ov0 @ w.W_V[1, h].double() @ w.W_O[1, h].double() @ U}
        for name, m in dense.items():
            big = torch.linalg.eigvals(m)
            big = big[big.abs().argsort(descending=True)][:8]             # rank 8: the rest are ~0
            small = ev[name][0, g, h]
            dist = (small[:, None] - big[None, :]).abs()
            assert dist.min(1).values.max() < 1e-8 * big.abs().max()
    hand = composition_eigenvalues(interp.extract_weights(induction_model(), fold_ln=False))
    assert hand["qk_k_score"][0, 0, 0] > 0.99                           # previous-token writer -> induction reader
    assert hand["qk_k_score"][0, 1, 0] == 0                             # a zero writer composes with nothing
    with pytest.raises(ValueError, match="layer must be"):
        composition_eigenvalues(w, layer=0)


def test_dump_circuits_round_trips(tmp_path):
    model = remove_heads(randomized(), {1: [3]})
    w = interp.extract_weights(model)
    path = terms.dump_circuits(w, [3, 5, 7], tmp_path / "heads.safetensors", token_strings=["a", "b", "c"])
    loaded = load_file(path)
    index = json.loads((tmp_path / "heads.safetensors.json").read_text())
    assert sorted(loaded) == sorted(index["tensors"]) and len(loaded) == 2 * 7     # 4 + 3 heads, OV and QK
    assert "L1H3.ov" not in loaded and index["tokens"] == [3, 5, 7]
    ov, qk = interp.ov_circuit(w), interp.qk_circuit(w)
    torch.testing.assert_close(loaded["L1H2.ov"], ov[1, 2].full()[[3, 5, 7]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded["L0H1.qk"], qk[0, 1].full()[[3, 5, 7]], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tokens must be"):
        terms.dump_circuits(w, [99], tmp_path / "bad.safetensors")


def test_term_importance_refuses_models_with_ffns():
    with pytest.raises(ValueError, match="attention-only"):
        terms.path_terms(randomized(attn_only=False), torch.zeros(1, 4, dtype=torch.long))
