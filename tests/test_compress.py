"""Compression: structured pruning == masking, per-layer shapes, unstructured masks, schedules, LoRA, CLI."""

import copy
import json

import pytest
import torch

import modformer as mf
from modformer.cli import main
from modformer.compress import (
    GradualPruning,
    finetune,
    iterative_magnitude_pruning,
    magnitude_prune,
    make_permanent,
    masked,
    polynomial_sparsity,
    prune_structured,
    remove_heads,
    remove_layers,
    remove_neurons,
    sparsity_of,
)
from modformer.compress.unstructured import round_sparsities
from modformer.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from modformer.train.trainer import Trainer


def tiny(**kw) -> torch.nn.Module:
    base = dict(vocab_size=17, n_layer=2, d_model=32, n_head=4, d_ff=48, max_seq_len=8)
    return mf.build_model(ModelConfig(**{**base, **kw})).eval()


X = torch.randint(0, 17, (3, 6), generator=torch.Generator().manual_seed(0))


def head_masks(model, remove):
    masks = [torch.ones(b.attn.n_head) for b in model.blocks]
    for i, hs in remove.items():
        masks[i][hs] = 0.0
    return masks


@pytest.mark.parametrize("kw,remove", [
    ({}, {0: [1], 1: [0, 3]}),
    ({"attention": "gqa", "n_kv_heads": 2}, {1: [2, 3]}),       # a whole GQA group
    ({"attention": "mqa", "norm_placement": "post", "qk_norm": True}, {0: [0, 2]}),
])
def test_removed_heads_match_zeroed_heads(kw, remove, tmp_path):
    model = tiny(**kw)
    with torch.no_grad(), masked(model, heads=head_masks(model, remove)):
        ref = model(X)
    small = remove_heads(model, remove)
    torch.testing.assert_close(small(X), ref, rtol=1e-5, atol=1e-5)
    for i, hs in remove.items():                                     # really gone
        attn = small.blocks[i].attn
        assert attn.n_head == model.blocks[i].attn.n_head - len(hs)
        assert attn.out.weight.shape == (32, attn.n_head * 8)
        assert attn.qkv.weight.shape[0] == (attn.n_head + 2 * attn.n_kv_heads) * 8
    assert small.num_params() < model.num_params()
    mf.save(small, tmp_path / "m")                                   # an ordinary model
    again = mf.load(tmp_path / "m")
    torch.testing.assert_close(again(X), ref, rtol=1e-5, atol=1e-5)
    assert again.cfg.layer_overrides == small.cfg.layer_overrides


def test_gqa_partial_group_is_refused():
    with pytest.raises(ValueError, match="whole groups"):
        remove_heads(tiny(attention="gqa", n_kv_heads=2), {0: [0]})


@pytest.mark.parametrize("ffn", ["relu", "swiglu"])
def test_removed_neurons_match_zeroed_neurons(ffn):
    model = tiny(ffn=ffn)
    masks = [torch.ones(48), torch.ones(48)]
    masks[0][:30] = 0.0
    masks[1][[1, 5, 7]] = 0.0
    with torch.no_grad(), masked(model, neurons=masks):
        ref = model(X)
    small = remove_neurons(model, {0: range(30), 1: [1, 5, 7]})
    torch.testing.assert_close(small(X), ref, rtol=1e-5, atol=1e-5)
    assert small.blocks[0].mlp.up.weight.shape == (18, 32) and small.blocks[1].mlp.down.weight.shape == (32, 45)
    assert small.cfg.layer_overrides == [{"d_ff": 18}, {"d_ff": 45}]


def test_removed_layer_matches_skipped_layer_and_composes():
    model = tiny(n_layer=3)
    with torch.no_grad(), masked(model, layers=torch.tensor([1.0, 0.0, 1.0])):
        ref = model(X)
    small = remove_layers(remove_heads(model, {2: [0]}), [1])
    assert small.cfg.n_layer == 2 and small.cfg.layer_overrides == [{}, {"n_head": 3, "d_head": 8}]
    with torch.no_grad(), masked(model, layers=torch.tensor([1.0, 0.0, 1.0]),
                                 heads=head_masks(model, {2: [0]})):
        ref = model(X)
    torch.testing.assert_close(small(X), ref, rtol=1e-5, atol=1e-5)


def test_layer_overrides_validation():
    with pytest.raises(ConfigError, match="one entry per layer"):
        ModelConfig(vocab_size=5, n_layer=2, layer_overrides=[{}]).validate()
    with pytest.raises(ConfigError, match="cannot vary per layer"):
        ModelConfig(vocab_size=5, n_layer=1, layer_overrides=[{"d_model": 3}]).validate()
    cfg = ModelConfig(vocab_size=5, n_layer=2, d_model=32, n_head=4, layer_overrides=[{"n_head": 2}, {}])
    assert cfg.for_layer(0).head_dim == 8 and cfg.for_layer(1) is cfg


@pytest.mark.parametrize("method,importance", [("heads", "gradient"), ("heads", "ablation"),
                                                ("neurons", "gradient"), ("layers", "gradient")])
def test_prune_structured_shrinks(method, importance):
    model = tiny()
    batches = [(X, torch.roll(X, -1, 1))]
    small, info = prune_structured(model, method, 0.5, batches, importance)
    assert small.num_params() < model.num_params() and info["removed"]
    if method == "heads":
        assert sum(b.attn.n_head for b in small.blocks) == 4
        assert all(b.attn.n_head >= 1 for b in small.blocks)


def test_magnitude_masks_exact_sparsity_save_and_permanent(tmp_path):
    model = tiny(tie_embeddings=True)
    assert magnitude_prune(model, 0.9) == pytest.approx(0.9, abs=1e-4)
    assert model.lm_head.weight_mask is not None and torch.equal(model.lm_head.weight, model.tok_emb.weight)
    with torch.no_grad():
        ref = model(X)
    mf.save(model, tmp_path / "masked")                       # masked weights, ordinary keys
    torch.testing.assert_close(mf.load(tmp_path / "masked")(X), ref)
    assert magnitude_prune(model, 0.95, scope="layer") == pytest.approx(0.95, abs=1e-3)
    zeros = model.blocks[0].mlp.up.weight == 0
    assert zeros.float().mean() == pytest.approx(0.95, abs=1e-3)
    with torch.no_grad():
        ref = model(X)
    make_permanent(model)
    assert not any("mask" in k or "orig" in k for k in model.state_dict())
    assert model.lm_head.weight is model.tok_emb.weight
    torch.testing.assert_close(model(X), ref)
    assert torch.equal(model.blocks[0].mlp.up.weight == 0, zeros)


def test_schedule_math():
    assert polynomial_sparsity(5, 10, 20, 0.9) == 0.0
    assert polynomial_sparsity(10, 10, 20, 0.9) == pytest.approx(0.0)
    assert polynomial_sparsity(15, 10, 20, 0.9) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert polynomial_sparsity(20, 10, 20, 0.9) == pytest.approx(0.9)
    assert polynomial_sparsity(99, 10, 20, 0.9) == pytest.approx(0.9)
    s = round_sparsities(0.9, 3)
    assert s[-1] == pytest.approx(0.9)
    kept = [1 - v for v in [0.0, *s]]
    ratios = [kept[i + 1] / kept[i] for i in range(3)]           # same fraction of survivors each round
    assert ratios == pytest.approx([0.1 ** (1 / 3)] * 3)


def test_iterative_pruning_rewinds_survivors():
    model = tiny()
    init = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)                                       # "trained"
    seen = []

    def train_fn(m):
        seen.append(sparsity_of(m))
        w = m.blocks[0].mlp.up
        survivors = w.weight_mask.bool()
        assert torch.equal(w.weight_orig[survivors], init["blocks.0.mlp.up.weight"][survivors])

    rows = iterative_magnitude_pruning(model, train_fn, 0.8, 2, rewind_state=init)
    assert [r["sparsity"] for r in rows] == pytest.approx(round_sparsities(0.8, 2), abs=1e-4)
    assert seen == pytest.approx(round_sparsities(0.8, 2), abs=1e-4)


def run_cfg(tmp_path, name="r", steps=12):
    return RunConfig(name=name, out_dir=str(tmp_path),
                     model=ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, max_seq_len=3),
                     data=DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}),
                     train=TrainConfig(steps=steps, batch_size=32, lr=3e-3, eval_every=6, eval_batches=0,
                                       log_every=6, progress=False, tensorboard=False, device="cpu",
                                       sample_tokens=0, threads=2))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    cb = GradualPruning(final=0.8, start=2, end=8, every=2)
    trainer = Trainer(run_cfg(tmp), callbacks=[cb])
    trainer.fit()
    return tmp / "r", trainer, cb


def test_gradual_pruning_callback(tiny_run):
    run, trainer, cb = tiny_run
    assert [s for s, _ in cb.history] == [2, 4, 6, 8]
    assert [v for _, v in cb.history] == pytest.approx([polynomial_sparsity(s, 2, 8, 0.8) for s in (2, 4, 6, 8)],
                                                       abs=1e-3)
    assert not hasattr(trainer.raw_model.blocks[0].mlp.up, "weight_mask")       # permanent at the end
    assert sparsity_of(trainer.raw_model) == pytest.approx(0.8, abs=1e-3)
    from modformer.runs import run_model
    assert sparsity_of(run_model(run)) == pytest.approx(0.8, abs=1e-3)         # checkpoints hold the zeros


def test_lora_merge_save_load_switch(tmp_path):
    from modformer.compress import lora

    base = tiny()
    base_state = copy.deepcopy(base.state_dict())
    with torch.no_grad():
        ref = base(X)
    pm = lora.add_lora(base, r=2, targets=["qkv", "up"], adapter_name="first")
    trainable, total, frac = lora.trainable_fraction(pm)
    assert trainable == 2 * ((32 + 96) * 2 + (32 + 48) * 2) and 0 < frac < 0.1
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)                  # B starts at zero: make the adapter matter
    with torch.no_grad():
        out_a = pm(X)
        assert not torch.allclose(out_a, ref)
        pm.merge_adapter()
        torch.testing.assert_close(pm(X), out_a, rtol=1e-5, atol=1e-5)
        pm.unmerge_adapter()
        torch.testing.assert_close(pm(X), out_a, rtol=1e-5, atol=1e-5)
    lora.save_adapter(pm, tmp_path / "first", meta={"task": "t"})
    assert (tmp_path / "first" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "first" / "modformer.json").read_text())["task"] == "t"
    pm.add_adapter("second", lora.lora_config(r=1, targets=["down"]))
    pm.set_adapter("second")
    for n, p in pm.named_parameters():
        if "lora_B" in n and ".second." in n:
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        out_b = pm(X)
    lora.save_adapter(pm, tmp_path / "second", "second")
    fresh = tiny()
    fresh.load_state_dict(base_state)
    both = lora.load_adapters(fresh, {"first": tmp_path / "first", "second": tmp_path / "second"})
    with torch.no_grad():
        torch.testing.assert_close(both(X), out_a, rtol=1e-5, atol=1e-5)
        both.set_adapter("second")
        torch.testing.assert_close(both(X), out_b, rtol=1e-5, atol=1e-5)
        with both.disable_adapter():
            torch.testing.assert_close(both(X), ref, rtol=1e-5, atol=1e-5)
    merged = lora.merged_model(both)
    assert isinstance(merged, type(base))
    torch.testing.assert_close(merged(X), out_b, rtol=1e-5, atol=1e-5)


def test_finetune_trains_only_trainable():
    from modformer.data import build_dataset

    data = build_dataset(DataConfig(name="modular", options={"p": 13, "train_fraction": 0.5}))
    model = mf.build_model(ModelConfig(vocab_size=data.vocab_size, n_layer=1, d_model=16, n_head=2, max_seq_len=3))
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    before = model.blocks[0].attn.qkv.weight.clone()
    losses = finetune(model, data, TrainConfig(batch_size=16, lr=1e-2), 3)
    assert len(losses) == 3 and torch.equal(model.blocks[0].attn.qkv.weight, before)


def test_cli_prune_and_lora(tiny_run, tmp_path, capsys):
    run, _, _ = tiny_run
    for method, amount in (("heads", 0.5), ("magnitude", 0.7)):
        out = tmp_path / method
        assert main(["prune", str(run), "--method", method, "--amount", str(amount), "--finetune-steps", "2",
                     "--out", str(out), "--json"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        model = mf.load(out)
        if method == "magnitude":
            assert result["sparsity"] == pytest.approx(0.7, abs=1e-3)
            assert model.num_params() == result["before"]["params"]
        else:
            assert model.num_params() == result["after"]["params"] < result["before"]["params"]
        assert json.loads((out / "prune.json").read_text())["method"] == method
    assert main(["lora", str(run), "--task", 'data.options.op="-"', "--rank", "2", "--steps", "2",
                 "--out", str(tmp_path / "sub"), "--merge", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < meta["trainable_fraction"] < 0.2 and (tmp_path / "sub" / "adapter_model.safetensors").is_file()
    assert mf.load(tmp_path / "sub" / "merged").num_params() == mf.load(out).num_params()
    assert main(["prune", str(run), "--method", "heads", "--amount", "1.5"]) == 2


def test_hard_concrete_samples_in_unit_interval_and_reach_both_ends():
    from modformer.compress.l0 import HardConcreteGates

    gates = HardConcreteGates([4, 3], init_log_alpha=0.0)
    with torch.no_grad():
        gates.log_alpha[0].copy_(torch.tensor([-8.0, -1.0, 1.0, 8.0]))
    g = torch.Generator().manual_seed(0)
    zs = [gates.sample(g) for _ in range(500)]
    flat = torch.cat([torch.cat(z) for z in zs])
    assert flat.min() >= 0.0 and flat.max() <= 1.0
    assert (flat == 0).any() and (flat == 1).any() and ((flat > 0) & (flat < 1)).any()   # exact 0/1 mass
    det = gates.deterministic()
    assert det[0][0] == 0.0 and det[0][3] == 1.0 and all(((d >= 0) & (d <= 1)).all() for d in det)
    z = gates.sample(g)[0]                                   # reparametrised: gradients reach log_alpha
    z.sum().backward()
    assert gates.log_alpha[0].grad is not None


def test_expected_l0_hand_computed():
    from modformer.compress.l0 import HardConcreteGates

    gates = HardConcreteGates([2, 1], init_log_alpha=0.0)
    # P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)); log_alpha = 0, beta = 2/3, gamma = -0.1,
    # zeta = 1.1: sigmoid((2/3) log 11) = sigmoid(1.598597) = 0.831822 per gate, 3 gates
    assert float(gates.expected_l0().detach()) == pytest.approx(3 * 0.831822, abs=1e-5)
    with torch.no_grad():
        gates.log_alpha[1].fill_(-1.598597)                  # exactly at the shift: P = 0.5
    assert float(gates.expected_l0().detach()) == pytest.approx(2 * 0.831822 + 0.5, abs=1e-5)


@pytest.mark.parametrize("kw", [{}, {"attention": "mqa"}])
def test_closed_gates_equal_physically_pruned_model(kw, tmp_path):
    from modformer.compress.l0 import HardConcreteGates, prune_closed_heads

    model = tiny(**kw)
    gates = HardConcreteGates([4, 4])
    with torch.no_grad():
        gates.log_alpha[0].copy_(torch.tensor([9.0, -9.0, 0.3, 9.0]))     # head 1 closed, head 2 partly open
        gates.log_alpha[1].copy_(torch.tensor([-9.0, -9.0, -9.0, -9.0]))  # all closed: one is kept (zeroed)
    assert gates.closed() == {0: [1], 1: [0, 1, 2, 3]}
    with torch.no_grad(), masked(model, heads=gates.deterministic()):
        ref = model(X)
    small = prune_closed_heads(model, gates)
    assert [b.attn.n_head for b in small.blocks] == [3, 1]
    torch.testing.assert_close(small(X), ref, rtol=1e-5, atol=1e-5)
    mf.save(small, tmp_path / "m")
    torch.testing.assert_close(mf.load(tmp_path / "m")(X), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("joint", [False, True])
def test_gate_training_penalty_closes_gates(joint):
    from modformer.compress.l0 import train_head_gates

    model = tiny()
    before = copy.deepcopy(model.state_dict())
    batches = [(X, torch.roll(X, -1, 1))]
    gates, log = train_head_gates(model, batches, steps=150, lam=1.0, lr=0.1, joint=joint)
    assert log[-1]["expected_l0"] < log[0]["expected_l0"] and log[-1]["closed"] > 0
    changed = any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert changed == joint                                          # frozen unless joint
    assert all(p.requires_grad for p in model.parameters())
    small, info = prune_structured(model, "heads", 0.5, batches, "l0", {"steps": 20})
    assert sum(b.attn.n_head for b in small.blocks) == 4 and len(info["scores"]) == 2


def test_cli_prune_l0(tiny_run, tmp_path, capsys):
    run, _, _ = tiny_run
    out = tmp_path / "l0"
    assert main(["prune", str(run), "--method", "heads", "--importance", "l0", "--l0-closed", "--l0-lambda", "2",
                 "--l0-steps", "60", "--l0-lr", "0.2", "--score-batches", "1", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mf.load(out).num_params() == result["after"]["params"] < result["before"]["params"]
    assert main(["prune", str(run), "--method", "heads", "--importance", "l0", "--amount", "0.25",
                 "--l0-steps", "10", "--out", str(tmp_path / "l0b")]) == 0
    assert main(["prune", str(run), "--method", "magnitude", "--l0-closed"]) == 2


def test_lora_dotted_targets_and_embedding():
    from modformer.compress import lora

    pm = lora.add_lora(tiny(), r=1, targets=("blocks.0.attn.qkv", "tok_emb"))
    # qkv of layer 0 only: 1 x (32 + 96); embedding: 1 x (17 + 32)
    assert lora.trainable_fraction(pm)[0] == 32 + 96 + 17 + 32
    with pytest.raises(ValueError, match="match no"):
        lora.add_lora(tiny(), r=1, targets=("blocks.5.attn.qkv",))
