"""Bad input gives one-line errors naming the field; hook points expose and patch activations."""

import pytest
import torch

import modformer as mf
from modformer.config import RunConfig, apply_overrides, load_config


def cfg(**kw) -> mf.ModelConfig:
    base = dict(vocab_size=20, n_layer=2, d_model=32, n_head=4, max_seq_len=16)
    base.update(kw)
    return mf.ModelConfig(**base)


@pytest.mark.parametrize("field,value,allowed", [
    ("attention", "mhaa", "mha"), ("position", "rotary", "rope"), ("norm", "batchnorm", "rmsnorm"),
    ("ffn", "swish", "swiglu"), ("attn_backend", "flash", "sdpa"), ("model", "bert", "gpt")])
def test_unknown_component_names(field, value, allowed):
    with pytest.raises(mf.ConfigError) as e:
        mf.build_model(cfg(**{field: value}))
    msg = str(e.value)
    assert f"model.{field}" in msg and repr(value) in msg and allowed in msg and "\n" not in msg


def test_shape_errors():
    with pytest.raises(mf.ConfigError, match=r"d_model \(30\) must be divisible by model.n_head \(4\)"):
        mf.build_model(cfg(d_model=30))
    with pytest.raises(mf.ConfigError, match=r"n_head \(4\) must be divisible by model.n_kv_heads \(3\)"):
        mf.build_model(cfg(n_kv_heads=3))
    with pytest.raises(mf.ConfigError, match="gqa"):
        mf.build_model(cfg(attention="gqa"))
    with pytest.raises(mf.ConfigError, match="norm_placement"):
        mf.build_model(cfg(norm_placement="middle"))
    with pytest.raises(mf.ConfigError, match="ffn_options"):
        mf.build_model(cfg(ffn_options={"experts": 4}))


def test_input_errors():
    model = mf.build_model(cfg())
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(B, T\); got torch.float32"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"shape \(B, T\); got torch.int64 of shape \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 20\)"):
        model(torch.full((1, 3), 20))
    # off CPU (a meta tensor stands in for a GPU one): an inference call that starts a sequence reads the ids'
    # range; training steps and cached decode steps do not (no host sync there)
    from modformer.models.common import wants_value_check

    dev = torch.empty(1, 3, dtype=torch.long, device="meta")
    assert wants_value_check(dev, training=False, offset=0)
    assert not wants_value_check(dev, training=True, offset=0)
    assert not wants_value_check(dev, training=False, offset=5)
    assert wants_value_check(torch.zeros(1, 3, dtype=torch.long), training=True, offset=5)     # CPU: always
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 10)
    rope = mf.build_model(cfg(position="rope"))     # no table: any length works
    assert rope(torch.zeros(1, 40, dtype=torch.long)).shape == (1, 40, 20)


def test_config_keys_overrides_and_yaml(tmp_path):
    with pytest.raises(mf.ConfigError, match=r"unknown config key 'model.n_layers' \(did you mean 'model.n_layer'\?\)"):
        apply_overrides(RunConfig(), ["model.n_layers=3"])
    with pytest.raises(mf.ConfigError, match="train.lr must be a number"):
        apply_overrides(RunConfig(), ["train.lr=fast"])
    run = apply_overrides(RunConfig(), ["model.n_layer=3", "train.lr=3e-4", "model.ffn_options.foo=1",
                                        "train.betas=[0.9, 0.95]"])
    assert run.model.n_layer == 3 and run.train.lr == 3e-4 and run.train.betas == (0.9, 0.95)
    path = tmp_path / "c.yaml"
    from modformer.config import save_yaml
    save_yaml(run, path)
    again = load_config(path)
    assert again == run
    path.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(mf.ConfigError, match="did you mean 'model.d_model'"):
        load_config(path)
    with pytest.raises(mf.ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_hook_points_named_and_cached():
    model = mf.build_model(cfg()).eval()
    idx = torch.randint(0, 20, (2, 8))
    names = set(model.hook_points())
    for want in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_q",
                 "blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.1.mlp.hook_post",
                 "blocks.1.hook_resid_post", "hook_resid_final"]:
        assert want in names
    logits, cache = model.run_with_cache(idx)
    torch.testing.assert_close(logits, model(idx))
    pat = cache["blocks.0.attn.hook_pattern"]
    assert pat.shape == (2, 4, 8, 8)
    torch.testing.assert_close(pat.sum(-1), torch.ones(2, 4, 8))
    # residual stream bookkeeping: resid_post = resid_mid + mlp_out = resid_pre + attn_out + mlp_out
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"],
                               cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"]
                               + cache["blocks.0.hook_mlp_out"], atol=1e-6, rtol=1e-5)
    # per-head results sum to the attention output (minus the output bias)
    result = cache["blocks.1.attn.hook_result"].sum(2) + model.blocks[1].attn.out.bias
    torch.testing.assert_close(result, cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=1e-5)
    _, only = model.run_with_cache(idx, names_filter=lambda n: n.endswith("hook_q"))
    assert set(only) == {"blocks.0.attn.hook_q", "blocks.1.attn.hook_q"}


def test_hooks_can_patch_activations():
    model = mf.build_model(cfg(attn_only=True, n_layer=1)).eval()
    idx = torch.randint(0, 20, (1, 6))

    def uniform(pattern, hook):
        return pattern.tril() / pattern.tril().sum(-1, keepdim=True).clamp_min(1) * 0 + \
            torch.ones_like(pattern).tril() / torch.arange(1, 7).view(1, 1, 6, 1)

    with torch.no_grad():
        base = model(idx)
        patched = model.run_with_hooks(idx, [("blocks.0.attn.hook_pattern", uniform)])
        _, cache = model.run_with_cache(idx)
        v = cache["blocks.0.attn.hook_v"]
    assert not torch.allclose(base, patched)
    # with a uniform causal pattern, z is the running mean of v
    with model.hooks([("blocks.0.attn.hook_pattern", uniform)]):
        _, c2 = model.run_with_cache(idx, names_filter="blocks.0.attn.hook_z")
    running_mean = v.cumsum(2) / torch.arange(1, 7).view(1, 1, 6, 1)
    torch.testing.assert_close(c2["blocks.0.attn.hook_z"], running_mean, atol=1e-5, rtol=1e-5)
    assert not model.blocks[0].attn.hook_pattern.active     # hooks removed afterwards
