"""HF families (GPT-2, Llama incl. Llama-3 RoPE scaling, Mistral, Qwen2, GPT-NeoX): logits, round trips,
cache and greedy generation against transformers; load_pretrained with a tokenizer; clear errors.

Tolerance: every comparison is fp32 on logits of magnitude <= ~10 (weights jittered by 0.1). The two sides
differ only in summation order (fused vs separate QKV, SDPA vs eager softmax, RMSNorm and RoPE formulas
equal up to rounding), each op contributing about sqrt(K) * 2^-24 relative error for reductions of length
K <= 64, compounded over 2 layers: ~1e-6 absolute on the logits, so 1e-5 leaves a 10x margin while any
mis-mapped weight (an O(0.1) change) shows up as an O(0.1-1) difference.
"""

from __future__ import annotations

import os

import pytest
import torch

import modformer as mf

transformers = pytest.importorskip("transformers")

V, T = 97, 16
COMMON = dict(vocab_size=V, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA = dict(COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)   # head_dim 8: one frequency kept, one smoothed, two divided
VARIANTS = {
    "gpt2": ("GPT2", dict(COMMON, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "llama": ("Llama", LLAMA),
    "llama3_rope_tied_bias": ("Llama", dict(LLAMA, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True,
                                            attention_bias=True, mlp_bias=True)),
    "llama_mqa_head_dim16": ("Llama", dict(LLAMA, num_key_value_heads=1, head_dim=16)),   # head_dim != D / H
    "mistral_window5": ("Mistral", dict(LLAMA, sliding_window=5)),
    "qwen2": ("Qwen2", dict(LLAMA)),
    "qwen2_sliding_layer1": ("Qwen2", dict(LLAMA, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "neox_parallel_partial": ("GPTNeoX", dict(COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5)),
    "neox_serial_full_rotary": ("GPTNeoX", dict(COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64, rotary_pct=1.0,
                                                use_parallel_residual=False, hidden_act="gelu_new")),
}


def _jitter(module: torch.nn.Module, std: float) -> None:
    """Perturb every parameter (biases and norm gains too) so that any mis-mapping shows up."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def hf_model(variant: str, std: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    prefix, kwargs = VARIANTS[variant]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}LMHeadModel" if prefix == "GPT2" else f"{prefix}ForCausalLM")
    model = model_cls(config_cls(**kwargs, attn_implementation="eager"))
    _jitter(model, std)
    return model.eval()


def _ids(n: int = 2, t: int = T) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _max_diff(ours: torch.nn.Module, hf: torch.nn.Module, idx: torch.Tensor) -> float:
    return (ours(idx) - hf(idx).logits).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_hf_logits_match(variant: str) -> None:
    hf = hf_model(variant)
    ours = mf.hf.from_hf(hf)
    assert not ours.training and ours.cfg.tie_embeddings == hf.config.tie_word_embeddings
    with torch.no_grad():
        scale = hf(_ids()).logits.abs().max().item()
    assert 1.0 < scale < 30.0          # logits large enough for the tolerance to mean something
    assert _max_diff(ours, hf, _ids()) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_hf_round_trip(variant: str) -> None:
    hf = hf_model(variant)
    back = mf.hf.to_hf(mf.hf.from_hf(hf))
    assert type(back) is type(hf) and not back.training
    for (name, a), (_, b) in zip(hf.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for key in ("sliding_window", "layer_types", "rope_parameters", "use_parallel_residual", "tie_word_embeddings"):
        assert getattr(back.config, key, None) == getattr(hf.config, key, None), key
    assert _max_diff(mf.hf.from_hf(back), hf, _ids()) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_equals_no_cache(variant: str) -> None:
    """Prefill 5 tokens then one token at a time (past the sliding windows) == one full forward."""
    ours = mf.hf.from_hf(hf_model(variant))
    idx = _ids()
    with torch.no_grad():
        full = ours(idx)
        logits, cache = ours(idx[:, :5], return_cache=True)
        steps = [logits]
        for t in range(5, T):
            logits, cache = ours(idx[:, t:t + 1], cache=cache, return_cache=True)
            steps.append(logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_matches_hf(variant: str) -> None:
    hf = hf_model(variant, std=0.5)      # larger weights -> well-separated logits, no argmax near-ties
    ours = mf.hf.from_hf(hf)
    idx = _ids(2, 6)
    mine = ours.generate(idx, 10, temperature=0)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(mine, theirs)
    assert torch.equal(mine, ours.generate(idx, 10, temperature=0, use_cache=False))
    assert torch.equal(mine, ours.generate(idx, 10, temperature=0, static_cache=True))


# ---- folders, tokenizer, export, errors --------------------------------------------------------------
LINES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "we read the old book"]


def tiny_tokenizer() -> object:
    """A word-level tokenizer trained on four lines (no network), wrapped for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A tiny random Llama saved with save_pretrained, its tokenizer beside it."""
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    hf_model("llama", std=0.5).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_load_pretrained_and_tokenizer(llama_dir) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ours = mf.hf.load_pretrained(llama_dir)
    assert _max_diff(ours, hf, _ids()) <= 1e-5
    tok = mf.hf.load_tokenizer(llama_dir)
    assert tok("the cat sat")["input_ids"] == tiny_tokenizer()("the cat sat")["input_ids"]
    assert tok.decode(tok("the dog")["input_ids"]) == "the dog"


def _cli(*argv: str) -> int:
    from modformer.cli import main

    return main([str(a) for a in argv])


def test_export_round_trip(llama_dir, tmp_path, capsys) -> None:
    """HF folder -> modformer -> HF folder (tokenizer copied); then a modformer saved model -> HF."""
    out = tmp_path / "exported"
    assert _cli("export", llama_dir, "--hf", out) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(hf)
    for (name, a), (_, b) in zip(hf.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("a dog sang")["input_ids"] == tiny_tokenizer()("a dog sang")["input_ids"]
    assert _cli("export", llama_dir, "--hf", out) == 2          # exists: refused without --overwrite
    assert "exists" in capsys.readouterr().err
    saved = tmp_path / "saved"                                   # a modformer-native model: GPT-NeoX shaped
    ours = mf.hf.from_hf(hf_model("neox_parallel_partial"))
    mf.saving.save(ours, saved)
    assert _cli("export", saved, "--hf", tmp_path / "neox", "--overwrite") == 0
    neox = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "neox").eval()
    assert neox.config.model_type == "gpt_neox"
    assert _max_diff(ours, neox, _ids()) <= 1e-5


@pytest.mark.parametrize("prefix,kwargs,needle", [
    ("GPTJ", dict(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64, rotary_dim=4), "model_type 'gptj'"),
    ("Llama", dict(LLAMA, hidden_act="gelu"), "hidden_act"),
    ("Llama", dict(LLAMA, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0,
                                               original_max_position_embeddings=32)), "rope_type='yarn'"),
    ("Llama", dict(LLAMA, attention_bias=True), "attention_bias"),
    ("GPTNeoX", dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=48, attention_bias=False), "attention_bias"),
])
def test_unsupported_fails_in_one_line(prefix: str, kwargs: dict, needle: str, tmp_path, capsys) -> None:
    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    with pytest.raises(ValueError, match=needle):
        mf.hf.from_hf(model)
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()                                          # HF's own progress bar
    assert _cli("export", tmp_path / "m", "--hf", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_export_rejects_unexportable_config(tmp_path, capsys) -> None:
    cfg = mf.ModelConfig(vocab_size=V, n_layer=1, d_model=32, n_head=4, max_seq_len=64, position="alibi")
    mf.saving.save(mf.build_model(cfg), tmp_path / "saved")
    assert _cli("export", tmp_path / "saved", "--hf", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model.position='alibi'" in err and err.count("\n") == 1


def test_offline_uncached_hub_name_fails_at_once(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        mf.hf.load_pretrained("someorg/not-cached-model")
    assert _cli("generate", "someorg/not-cached-model", "--prompt", "the") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: someorg/not-cached-model") and err.count("\n") == 1
    # no offline flag and no network: the same single line, without HF's retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(mf.hf.common, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FileNotFoundError, match="unreachable"):
        mf.hf.load_pretrained("someorg/not-cached-model")


def test_offline_cached_hub_name_loads_from_the_cache(llama_dir, tmp_path) -> None:
    """HF_HUB_OFFLINE=1 with the model in the HF cache (hub layout: refs/main -> snapshots/<commit>/): the hub name
    loads from the cache, logits equal the folder's, in a fresh process (huggingface_hub reads the cache path and
    the offline flag at import)."""
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--someorg--tiny-llama" / "snapshots" / ("ab" * 20)
    shutil.copytree(llama_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("ab" * 20)
    code = ("import torch, modformer as mf\n"
            "ids = torch.arange(12).reshape(2, 6) % 50\n"
            f"a = mf.hf.load_pretrained('someorg/tiny-llama')(ids)\n"
            f"b = mf.hf.load_pretrained({str(llama_dir)!r})(ids)\n"
            "print(float((a - b).abs().max()))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) == 0.0


# ---- the toolbox on an HF folder ---------------------------------------------------------------------
def test_cli_generate_on_hf_folder(llama_dir, capsys) -> None:
    assert _cli("generate", llama_dir, "--prompt", "the cat sat", "--max-new-tokens", "6", "--temperature", "0") == 0
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    idx = torch.tensor([tok("the cat sat", add_special_tokens=False)["input_ids"]])
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert capsys.readouterr().out.strip() == tok.decode(ref[0].tolist())


def test_cli_eval_on_hf_folder(llama_dir, capsys) -> None:
    """`modformer eval HF_DIR`: WikiText-2 validation tokenized by the model's tokenizer; loss = HF's."""
    import json

    from modformer.models.hf.data import HFText

    assert _cli("eval", llama_dir, "--max-batches", "1", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = HFText(64, tokenizer=str(llama_dir))
    x, y = next(iter(data.iter_eval("val", 8, 1)))              # eval_batch_size 8 (hf_run_config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert abs(result["loss"] - ref.item()) <= 1e-4


def test_cli_circuits_on_hf_folder(llama_dir, tmp_path) -> None:
    out = tmp_path / "circuits"
    assert _cli("circuits", llama_dir, "--out", out, "--text", "the cat sat on the mat the cat sat") == 0
    assert (out / "summary.json").is_file() or any(out.iterdir())


# ---- left padding (attention_mask) -------------------------------------------------------------------
def _left_padded(pads: tuple[int, ...] = (0, 5, 2), t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    idx = _ids(len(pads), t)
    mask = torch.ones_like(idx)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        idx[row, :n] = 0                                        # pad token: any id, it is never attended to
    return idx, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_logits_match_hf(variant: str) -> None:
    """Positions count from each row's first real token on both sides (HF: position_ids from the mask)."""
    hf = hf_model(variant)
    ours = mf.hf.from_hf(hf)
    idx, mask = _left_padded()
    with torch.no_grad():
        mine = ours(idx, attention_mask=mask)
        theirs = hf(idx, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_greedy_generation_matches_hf(variant: str) -> None:
    hf = hf_model(variant, std=0.5)
    ours = mf.hf.from_hf(hf)
    idx, mask = _left_padded((0, 3, 1), 7)
    mine = ours.generate(idx, 10, temperature=0, attention_mask=mask, pad_token_id=0)
    theirs = hf.generate(idx, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(mine, theirs)
    static = ours.generate(idx, 10, temperature=0, attention_mask=mask, pad_token_id=0, static_cache=True)
    assert torch.equal(static, theirs)


def test_cli_lora_on_hf_folder_then_export(llama_dir, tmp_path) -> None:
    """HF folder -> `modformer lora --merge` (2 steps) -> `modformer export` -> an HF Llama equal to the merge."""
    out = tmp_path / "adapter"
    assert _cli("lora", llama_dir, "--steps", "2", "--lr", "0.05", "--merge", "--out", out,
                "--task", "train.eval_batches=1", "train.batch_size=4") == 0
    assert (out / "adapter_model.safetensors").is_file()
    merged = mf.load(out / "merged").eval()
    base = mf.hf.load_pretrained(llama_dir)
    assert not torch.equal(merged.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)   # it trained
    assert _cli("export", out / "merged", "--hf", tmp_path / "merged_hf") == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf").eval()
    assert hf.config.model_type == "llama"
    assert _max_diff(merged, hf, _ids()) <= 1e-5


def test_cli_distill_sparse_student_of_hf_teacher(llama_dir, tmp_path) -> None:
    """`modformer distill` with an HF folder as teacher: a sliding-window student, two KL steps on hf_text."""
    import json

    text = tmp_path / "text.txt"
    text.write_text("\n".join(LINES * 40))
    spec = tmp_path / "distill.yaml"
    spec.write_text(json.dumps({
        "name": "student", "out_dir": str(tmp_path / "runs"), "teacher": str(llama_dir),
        "student": {"attention": "sliding_window", "attention_options": {"window": 4}},
        "data": {"name": "hf_text", "seq_len": 32,
                 "options": {"tokenizer": str(llama_dir), "source": {"train": str(text), "val": str(text)}}},
        "steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "progress": False}))
    assert _cli("distill", spec) == 0
    student = mf.load(tmp_path / "runs" / "student")
    assert student.cfg.attention == "sliding_window" and student.cfg.position == "rope"
    teacher = mf.hf.load_pretrained(llama_dir)
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)   # trained
    assert torch.equal(student.blocks[0].mlp.up.weight, teacher.blocks[0].mlp.up.weight)          # frozen
    rows = [json.loads(line) for line in (tmp_path / "runs" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any("kl" in r for r in rows)
    # `bench fidelity` with the HF folder as teacher scores the student against it
    assert _cli("bench", "fidelity", "--teacher", llama_dir, "--student", tmp_path / "runs" / "student",
                "--batch-size", "2", "--eval-batches", "1", "--device", "cpu", "--out", tmp_path / "bench") == 0
    result = json.loads(next((tmp_path / "bench").glob("*.json")).read_text())
    row = result["rows"][0]
    assert row["attention"] == "sliding_window" and 0 < row["kl"] < 10 and row["teacher_ppl"] > 1


@pytest.mark.parametrize("fields,needle", [
    (dict(parallel_residual=True, norm_placement="post"), "model.parallel_residual"),
    (dict(position="rope", rope_fraction=0.0), "model.rope_fraction"),
    (dict(position="rope", rope_fraction=0.1), "rotated dims"),                  # 0.1 * 8 -> 0 dims
    (dict(position="rope", rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
    (dict(position="rope", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
])
def test_new_model_fields_fail_in_one_line(fields: dict, needle: str) -> None:
    cfg = mf.ModelConfig(vocab_size=V, n_layer=1, d_model=32, n_head=4, max_seq_len=64, **fields)
    with pytest.raises(mf.ConfigError, match=needle):
        mf.build_model(cfg.validate())


def test_rope_frequencies_against_references() -> None:
    """Default frequencies = the float64 formula to fp32 rounding; llama3 / linear = HF's own rope functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from modformer.layers.position import rope_inv_freq

    exact = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    assert ((rope_inv_freq(8, 10000.0, {}).double() - exact).abs() / exact).max().item() <= 2 ** -23
    for scaling in (LLAMA3_ROPE, dict(rope_type="linear", rope_theta=10000.0, factor=4.0)):
        config = transformers.LlamaConfig(**{**LLAMA, "rope_parameters": scaling})
        theirs, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
        assert torch.allclose(rope_inv_freq(8, 10000.0, scaling), theirs.float(), rtol=1e-6, atol=0), scaling


def test_partial_rotary_passes_the_other_dims_through() -> None:
    cfg = mf.ModelConfig(vocab_size=V, n_layer=1, d_model=32, n_head=4, position="rope", rope_fraction=0.5)
    rope = mf.build_model(cfg).position
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    q2, k2 = rope.rotate(q, k, torch.arange(3, 9))
    assert torch.equal(q2[..., 4:], q[..., 4:]) and torch.equal(k2[..., 4:], k[..., 4:])
    assert not torch.allclose(q2[..., :4], q[..., :4])


def test_cli_prune_heads_on_hf_folder(llama_dir, tmp_path, capsys) -> None:
    """`modformer prune HF_DIR --method heads`: 'before' is the HF model's own loss; heads are removed."""
    import json

    from modformer.models.hf.data import HFText

    out = tmp_path / "pruned"
    assert _cli("prune", llama_dir, "--method", "heads", "--amount", "0.25", "--score-batches", "1",
                "--score-batch-size", "8", "--out", out) == 0
    result = json.loads((out / "prune.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for x, y in HFText(64, tokenizer=str(llama_dir)).iter_eval("val", 8, 20):
            loss_sum += torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                                          reduction="sum").item()
            n += int((y != -100).sum())
    assert abs(result["before"]["loss"] - loss_sum / n) <= 1e-4
    pruned = mf.load(out)
    assert result["after"]["params"] < result["before"]["params"]
    assert sum(pruned.cfg.for_layer(i).n_head for i in range(2)) == 6        # 2 of 8 heads removed


def test_hub_errors_become_one_line(monkeypatch) -> None:
    """A reachable hub that refuses (unknown repo, gated) gives HF's first line, not its paragraph."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("someorg/missing is not a local folder and is not a valid model identifier\nIf this is a "
                      "private repository, make sure to pass a token\n")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(mf.hf.common, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    with pytest.raises(FileNotFoundError) as err:
        mf.hf.load_pretrained("someorg/missing")
    assert str(err.value) == ("someorg/missing: someorg/missing is not a local folder and is not a valid "
                              "model identifier")
