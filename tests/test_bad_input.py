"""Bad input fuzz suite (issue 22): every bad value ends in one ``error:`` line, exit status 2, no traceback,
and leaves the run folder byte-for-byte as it was.

Cases run through ``modformer.cli.main`` in-process (fast; argparse's exit is returned as the status), a few
through a real ``python -m modformer.cli`` process. One tiny grokking run (modular addition, 1 layer) is
trained once per module and serves as the run folder, teacher and sweep base of every case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import os
import string
import subprocess
import sys
import typing
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import modformer as mf
from modformer.cli import main
from modformer.config import DataConfig, ModelConfig, TrainConfig, load_config
from modformer.validation import Range

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TALLY = {"tried": 0, "clean": 0}
HYP = settings(max_examples=12, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

TINY = {"name": "tiny",
        "model": {"n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32, "max_seq_len": 3, "norm": "none",
                  "attn_backend": "eager"},
        "data": {"name": "modular", "options": {"p": 7, "op": "+", "train_fraction": 0.5, "seed": 0}},
        "train": {"steps": 2, "batch_size": 8, "lr": 0.01, "eval_every": 1, "log_every": 1, "eval_batches": 1,
                  "threads": 1, "progress": False, "tensorboard": False}}


class Env(typing.NamedTuple):
    root: Path          # everything the cases may touch lives here (and must not change)
    cfg: Path           # the tiny run config (out_dir = root/runs)
    run: Path           # its trained run folder
    distill: Path       # a distill config with the tiny run as teacher
    sweep: Path         # a sweep file over the tiny config


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad_input")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "out_dir": str(root / "runs")}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(cfg)]) == 0
    distill = root / "distill.yaml"
    distill.write_text(yaml.safe_dump({"name": "d", "out_dir": str(root / "runs"), "teacher": str(root / "runs/tiny"),
                                       "student": {}, "trainable": ["blocks.*.attn"], "steps": 1, "batch_size": 4,
                                       "eval_every": 1, "eval_batches": 1, "progress": False}))
    sweep = root / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": str(cfg), "out_dir": str(root / "sweeps"),
                                     "space": {"train.lr": [0.01, 0.02]}}))
    yield Env(root, cfg, root / "runs" / "tiny", distill, sweep)
    print(f"\nbad inputs tried: {TALLY['tried']}, clean errors: {TALLY['clean']}")


@pytest.fixture(autouse=True)
def _inside_root(env, monkeypatch):
    """Work inside the module's folder: an input that slipped through writes its runs/ where snapshots see it."""
    monkeypatch.chdir(env.root)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: sha256 of its bytes for files, 'dir' for folders."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def run_main(argv: list[str]) -> tuple[int | str, str]:
    """``main(argv)`` in-process: (exit status or the escaped exception, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc: int | str = main(argv)
        except BaseException as e:                  # a crash is a failure of the case, shown with its type
            rc = f"{type(e).__name__}: {e}"
    return rc, err.getvalue()


def assert_clean_error(env: Env, argv: list[str], expect: str | None = None) -> str:
    """Exit 2, exactly one ``error:`` line (containing ``expect``), no traceback, nothing under root changed."""
    TALLY["tried"] += 1
    before = snapshot(env.root)
    rc, err = run_main(argv)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, f"{argv}: exit {rc!r}, stderr {err!r}"
    assert len(lines) == 1 and "Traceback" not in err, err
    if expect is not None:
        assert expect in lines[0], lines[0]
    assert snapshot(env.root) == before, f"{argv} changed files under {env.root}"
    TALLY["clean"] += 1
    return lines[0]


# ---- config values: the list and neighbours ----------------------------------------------------------
TRAIN_OVERRIDES = [
    ("model.d_head=0", "model.d_head"), ("model.d_head=-8", "model.d_head"), ("model.d_ff=-5", "model.d_ff"),
    ("model.d_ff=0", "model.d_ff"), ("model.n_head=0", "model.n_head"), ("model.n_layer=-1", "model.n_layer"),
    ("model.n_kv_heads=0", "model.n_kv_heads"), ("model.norm_eps=-1", "model.norm_eps"),
    ("model.norm_eps=0", "model.norm_eps"), ("model.rope_base=0", "model.rope_base"),
    ("model.rope_base=-10000", "model.rope_base"), ("model.dropout=1", "model.dropout"),
    ("model.attn_dropout=-0.1", "model.attn_dropout"), ("model.init_std=-1", "model.init_std"),
    ("model.embed_noise=-1", "model.embed_noise"), ("model.vocab_size=-1", "model.vocab_size"),
    ("model.max_seq_len=0", "model.max_seq_len"), ("model.ffn_multiple_of=0", "model.ffn_multiple_of"),
    ("model.init=xavier", "model.init"), ("model.d_model=2.5", "model.d_model"),
    ("train.eval_every=0", "train.eval_every"), ("train.log_every=0", "train.log_every"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.device=tpu", "train.device"),
    ("train.device=cuda:x", "train.device"), ("train.device=CPU", "train.device"),
    ("train.label_smoothing=2", "train.label_smoothing"), ("train.label_smoothing=1", "train.label_smoothing"),
    ("train.eval_batches=-1", "train.eval_batches"), ("train.batch_size=-1", "train.batch_size"),
    ("train.steps=0", "train.steps"), ("train.lr=nan", "train.lr"), ("train.lr=-1", "train.lr"),
    ("train.lr=inf", "train.lr"), ("train.min_lr=1", "train.min_lr"), ("train.eps=0", "train.eps"),
    ("train.betas=[1.5,0.9]", "train.betas"), ("train.betas=[0.9,-0.1]", "train.betas"),
    ("train.weight_decay=-1", "train.weight_decay"), ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.grad_clip=-1", "train.grad_clip"), ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"), ("train.threads=0", "train.threads"),
    ("train.seed=-1", "train.seed"), ("train.dtype=float8", "train.dtype"),
    ("train.early_stop_mode=up", "train.early_stop_mode"), ("train.early_stop_target=nan", "train.early_stop_target"),
    ("train.eval_batch_size=0", "train.eval_batch_size"), ("train.eval_stride=-1", "train.eval_stride"),
    ("train.ema_decay=1", "train.ema_decay"), ("train.ema_start=-1", "train.ema_start"),
    ("train.sample_tokens=-1", "train.sample_tokens"), ("train.distributed=mpi", "train.distributed"),
    ("train.grad_reduce_dtype=float16", "train.grad_reduce_dtype"), ("train.optimizer=adamww", "train.optimizer"),
    ("train.schedule=step", "train.schedule"), ("train.profile_steps=[0,1]", "train.profile_steps"),
    ("train.compile_mode=fast", "train.compile_mode"), ("train.device=cuda", "train.device"),
    ("train.device=mps", "train.device"), ("data.seq_len=0", "data.seq_len"), ("data.options.p=0", "data.options.p"),
    ("data.options.train_fraction=2", "data.options.train_fraction"), ("data.options.op=x", "data.options.op"),
    ("data.name=modulo", "modular"), ("name=../x", "name"), ("name=", "name"), ("name=a/b", "name"),
    ("name=..", "name"), ("name=.", "name"), ("train.lr=[1,", "invalid YAML"), ("train.lr={a: 1", "invalid YAML"),
    ("train.lr=fast", "train.lr"), ("model.n_layers=3", "n_layer"), ("train.steps=1.5", "train.steps"),
    ("model.bias=maybe", "model.bias"), ("train.betas=0.9", "train.betas"), ("model=3", "model"),
    ("model.layer_overrides=7", "model.layer_overrides"), ("model.layer_overrides=[1]", "model.layer_overrides[0]"),
    ("data.options.train_fraction=''", "data.options.train_fraction"), ("data.options.p=seven", "data.options.p"),
    ('name="a\\nb"', "name"), ('name="a\\tb"', "name"),
]


@pytest.mark.parametrize("override,expect", TRAIN_OVERRIDES, ids=[o for o, _ in TRAIN_OVERRIDES])
def test_bad_train_override(env, override, expect):
    assert_clean_error(env, ["train", str(env.cfg), "name=fresh", override], expect)


@pytest.mark.parametrize("override", ["model.d_head=0", "train.eval_every=0", "data.seq_len=0", "name=../x",
                                      "train.device=tpu", "model.dropout=2"])
def test_bad_override_on_resume_leaves_the_run_alone(env, override):
    assert_clean_error(env, ["train", str(env.cfg), "--resume", override])


def test_out_dir_that_is_a_file(env):
    assert_clean_error(env, ["train", str(env.cfg), f"out_dir={env.cfg}"], "is a file")
    assert_clean_error(env, ["train", str(env.cfg), f"out_dir={env.cfg}/deeper"], "is a file")


# ---- YAML files ---------------------------------------------------------------------------------------------
GOOD_YAML = yaml.safe_dump({**TINY, "name": "yaml_case"}, sort_keys=False)
BAD_YAML = {
    "unclosed_flow": ("model: {n_layer: 1\n", ":2:"),
    "bad_indent": ("model:\n  n_layer: 1\n d_model: 16\n", ":3:"),
    "tab": ("model:\n\tn_layer: 1\n", ":2:"),
    "unclosed_quote": ("name: 'x\n", "invalid YAML"),
    "duplicate_top": ("name: a\nname: b\n", "duplicate key 'name' (first on line 1)"),
    "duplicate_nested": ("train:\n  lr: 0.1\n  steps: 2\n  lr: 0.2\n", "duplicate key 'lr'"),
    "duplicate_flow": ("data: {options: {p: 7, p: 11}}\n", "duplicate key 'p'"),
    "python_tag": ("name: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    "top_list": ("- 1\n- 2\n", "mapping"),
    "top_scalar": ("hello\n", "mapping"),
    "section_list": ("model: [1, 2]\n", "model must be a mapping"),
    "int_key": ("1: 2\n", "unknown config key"),
    "null_section": ("model: null\n", "model"),
}


@pytest.mark.parametrize("name", list(BAD_YAML))
def test_bad_yaml_file(env, name):
    text, expect = BAD_YAML[name]
    path = env.root / "yamls" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    line = assert_clean_error(env, ["train", str(path)], expect)
    if "YAML" in expect or "duplicate" in expect or expect.startswith(":"):
        assert str(path) in line                # file and line: where to look


def test_config_file_missing_binary_or_a_folder(env):
    binary = env.root / "yamls" / "binary.yaml"
    binary.parent.mkdir(exist_ok=True)
    binary.write_bytes(b"\xff\xfe\x00name: x\n")
    assert_clean_error(env, ["train", str(binary)], "binary.yaml")
    assert_clean_error(env, ["train", str(env.root / "missing.yaml")], "not found")
    assert_clean_error(env, ["train", str(env.root)], "not found")


@HYP
@given(data=st.data())
def test_corrupted_yaml_fuzz(env, data):
    """A character of YAML syntax inserted anywhere in a good config: either still valid YAML (skipped) or one
    clean error naming the file and line."""
    pos = data.draw(st.integers(0, len(GOOD_YAML)))
    junk = data.draw(st.sampled_from(["{", "[", "]", "}", ":", "\t", "'", '"', "- ", "&", "*", "!", "%", "@", "`"]))
    text = GOOD_YAML[:pos] + junk + GOOD_YAML[pos:]
    try:
        yaml.safe_load(text)
        assume(False)
    except yaml.YAMLError:
        pass
    path = env.root / "yamls" / "fuzz.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    assert_clean_error(env, ["train", str(path)], "invalid YAML")


LEAF_KEYS = ["name", "out_dir", "data.options.p", "data.options.train_fraction", "data.options.op"] + [
    f"{section}.{f.name}" for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig))
    for f in dataclasses.fields(cls)]


@settings(HYP, max_examples=300)
@given(key=st.sampled_from(LEAF_KEYS), text=st.text(alphabet=string.printable, max_size=10))
def test_any_override_text_loads_or_fails_with_one_config_error(env, key, text):
    """Whatever text a key gets, the config loads and builds (data + model, as the trainer does first) or raises
    one single-line ConfigError; never a TypeError or KeyError from deep inside."""
    from modformer.data import build_dataset

    try:
        cfg = load_config(env.cfg, [f"{key}={text}"])
        data = build_dataset(cfg.data)
        cfg.model.vocab_size = cfg.model.vocab_size or data.vocab_size
        mf.build_model(cfg.model)
    except mf.ConfigError as e:
        assert "\n" not in str(e)


# ---- every ranged config field, values drawn outside its range -------------------------------------------------
def outside(rng: Range, integer: bool) -> st.SearchStrategy:
    """Numbers outside ``rng`` (below, above, nan, inf)."""
    lo, hi, lo_in, hi_in = rng.bounds()
    parts = [st.sampled_from([math.nan, math.inf, -math.inf])]
    if math.isfinite(lo):
        parts.append(st.integers(max_value=math.ceil(lo) - 1 if lo_in else math.floor(lo)) if integer else
                     st.floats(max_value=lo, exclude_max=lo_in, allow_nan=False, allow_infinity=False))
    if math.isfinite(hi):
        parts.append(st.integers(min_value=math.floor(hi) + 1 if hi_in else math.ceil(hi)) if integer else
                     st.floats(min_value=hi, exclude_min=hi_in, allow_nan=False, allow_infinity=False))
    return st.one_of(parts)


RANGED = [(section, cls, name, rule[0] if isinstance(rule, list) else rule)
          for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig))
          for name, rule in cls.RULES.items() if isinstance(rule, (str, list))]


@pytest.mark.parametrize("section,cls,name,rule", RANGED, ids=[f"{s}.{n}" for s, _, n, _ in RANGED])
def test_every_ranged_field_refuses_values_outside_its_range(env, section, cls, name, rule):
    integer = "int" in str(typing.get_type_hints(cls)[name])
    tuple_field = "tuple" in str(typing.get_type_hints(cls)[name])

    @settings(HYP, max_examples=8)
    @given(value=outside(Range(rule), integer))
    def check(value):
        text = f"[{value!r}, {value!r}]" if tuple_field else repr(value)
        text = text.replace("nan", ".nan").replace("inf", ".inf")   # YAML spellings
        assert_clean_error(env, ["train", str(env.cfg), "name=fresh", f"{section}.{name}={text}"],
                           f"{section}.{name}")

    check()


# ---- options of every subcommand ------------------------------------------------------------------------------
def option_cases(env: Env) -> list[tuple[list[str], str]]:
    r, p = str(env.run), ["--prompt", "1 2 ="]
    prune = ["prune", r, "--method", "heads"]
    return [
        (["eval", r, "--max-batches", "-1"], "--max-batches"), (["eval", r, "--max-batches", "x"], "--max-batches"),
        (["eval", r, "--stride", "0"], "--stride"), (["eval", r, "--device", "bogus"], "--device"),
        (["eval", r, "--device", "cuda"], "CUDA is not available"), (["eval", r, "--device", "cuda:7"], "--device"),
        (["eval", r, "--device", "mps"], "MPS"), (["eval", r, "--split", "nope"], "split"),
        (["eval", str(env.root / "nothere")], "does not exist"), (["eval", str(env.cfg)], "not a run folder"),
        (["generate", r, *p, "--top-k", "0"], "--top-k"), (["generate", r, *p, "--top-k", "-3"], "--top-k"),
        (["generate", r, *p, "--top-p", "1.5"], "--top-p"), (["generate", r, *p, "--top-p", "0"], "--top-p"),
        (["generate", r, *p, "--top-p", "-0.5"], "--top-p"), (["generate", r, *p, "--top-p", "nan"], "--top-p"),
        (["generate", r, *p, "--temperature", "-1"], "--temperature"),
        (["generate", r, *p, "--temperature", "nan"], "--temperature"),
        (["generate", r, *p, "--temperature", "inf"], "--temperature"),
        (["generate", r, *p, "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", r, *p, "--seed", "-1"], "--seed"), (["generate", r, *p, "--device", "bogus"], "--device"),
        (["generate", r, *p, "--device", "cuda"], "CUDA is not available"),
        (["generate", r, "--prompt", ""], "no tokens"), (["generate", r, "--prompt", "zebra"], "zebra"),
        (["generate", r], "--prompt"), (["generate", r, "--prompts", str(env.root / "nothere.txt")], "nothere.txt"),
        (["generate", r, "--prompts", str(env.root)], "directory"),
        (["circuits", r, "--device", "bogus"], "--device"), (["circuits", r, "--device", "cuda"], "CUDA"),
        ([*prune, "--amount", "1.5"], "--amount"), ([*prune, "--amount", "-0.1"], "--amount"),
        ([*prune, "--amount", "0.5", "--score-batches", "0"], "--score-batches"),
        ([*prune, "--amount", "0.5", "--score-batch-size", "0"], "--score-batch-size"),
        ([*prune, "--amount", "0.5", "--finetune-steps", "-1"], "--finetune-steps"),
        ([*prune, "--amount", "0.5", "--lr", "nan"], "--lr"), ([*prune, "--amount", "0.5", "--l0-lr", "0"], "--l0-lr"),
        ([*prune, "--amount", "0.5", "--l0-steps", "0"], "--l0-steps"),
        ([*prune, "--amount", "0.5", "--l0-lambda", "-1"], "--l0-lambda"), ([*prune], "--amount"),
        (["prune", r, "--method", "magnitude", "--l0-closed"], "--l0-closed"),
        (["lora", r, "--rank", "0"], "--rank"), (["lora", r, "--alpha", "0"], "--alpha"),
        (["lora", r, "--dropout", "1"], "--dropout"), (["lora", r, "--steps", "-1"], "--steps"),
        (["lora", r, "--lr", "-1"], "--lr"), (["lora", r, "--name", "../x"], "--name"),
        (["lora", r, "--name", "a/b"], "--name"), (["lora", r, "--name", ""], "--name"),
        (["lora", r, "--targets", ",", "--steps", "0"], "--targets"),
        (["sweep", str(env.sweep), "--workers", "0"], "--workers"), (["sweep", str(env.sweep), "workers=0"], "workers"),
        (["sweep", str(env.sweep), "num_samples=0", "method=random"], "num_samples"),
        (["sweep", str(env.sweep), "mode=up"], "mode"), (["sweep", str(env.sweep), "halving.eta=1"], "eta"),
        (["sweep", str(env.sweep), "overrides.train.eval_every=0"], "train.eval_every"),
        (["sweep", str(env.sweep), "num_samples=[1,"], "invalid YAML"),
        (["sweep", str(env.root / "nothere.yaml")], "not found"),
        (["scaling", str(env.root / "nothere.csv")], "not found"), (["scaling", r, "--bootstrap", "-1"], "--bootstrap"),
        (["scaling", r, "--budget=-1e21"], "--budget"),
        (["scaling", r, "--budget", "-1e21"], "-1e21"), (["scaling", r, "--budget", "nan"], "--budget"),
        *[(["distill", str(env.distill), over], expect) for over, expect in (
            ("steps=0", "steps"), ("temperature=0", "temperature"), ("lr=-1", "lr"), ("batch_size=0", "batch_size"),
            ("eval_every=0", "eval_every"), ("name=../x", "name"), ("device=tpu", "device"), ("kl_weight=-1", "kl"),
            ("betas=[1,0.9]", "betas"), ("steps=[1,", "YAML"), ("student.d_head=0", "d_head"))],
        *[(["compose", method, str(CONFIGS / f"compose_{method}.yaml"), f"out_dir={env.root}/c", *more], expect)
          for method, more, expect in (
              ("gates", ["--device", "bogus"], "--device"), ("gates", ["device=tpu"], "device"),
              ("gates", ["seed=[1,"], "invalid YAML"), ("cbtm", ["--stage", "bake"], "--stage"),
              ("gates", ["base.train.eval_every=0"], "base: train.eval_every"),
              ("gates", ["base.model.d_head=0"], "base: model.d_head"),
              ("calm", ["anchor.train.lr=nan"], "anchor: train.lr"))],
        (["list", "nosuchkind"], "nosuchkind"), (["nosuchcommand"], "invalid choice"),
        (["train", str(env.cfg), "--bogus-flag"], "unrecognized"),
    ]


def test_bad_options_of_every_subcommand(env):
    """One case after another (one fixture); a failure names its argv."""
    for argv, expect in option_cases(env):
        assert_clean_error(env, argv, expect)


@HYP
@given(k=st.integers(max_value=0), p=st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True)),
       t=st.floats(max_value=0, exclude_max=True), n=st.integers(max_value=-1))
def test_generate_option_fuzz(env, k, p, t, n):
    base = ["generate", str(env.run), "--prompt", "1 2 ="]
    assert_clean_error(env, [*base, "--top-k", str(k)], "--top-k")
    assert_clean_error(env, [*base, "--top-p", repr(p)], "--top-p")
    assert_clean_error(env, [*base, "--temperature", repr(t)], "--temperature")
    assert_clean_error(env, [*base, "--max-new-tokens", str(n)], "--max-new-tokens")


# ---- damaged run folders (a copy: the original stays as it was) --------------------------------------------------
@pytest.mark.parametrize("damage", [
    "empty_weights", "truncated_weights", "config_json_list", "config_yaml_bad",
    "garbage_state"])
def test_damaged_run_folder(env, damage):
    import shutil

    copy = env.root / "damaged" / damage
    if not copy.exists():
        shutil.copytree(env.run, copy)
        ckpt = sorted((copy / "checkpoints").glob("step_*"))[-1]
        weights = ckpt / "model.safetensors"
        if damage == "empty_weights":
            weights.write_bytes(b"")
        elif damage == "truncated_weights":
            weights.write_bytes(weights.read_bytes()[:100])
        elif damage == "config_json_list":
            (ckpt / "config.json").write_text("[1, 2]")
        elif damage == "garbage_state":
            for f in ckpt.iterdir():
                if f.name.startswith("trainer_state"):
                    f.write_bytes(os.urandom(64))
        else:
            (copy / "config.yaml").write_text("model: {d_model: 16\n")
    commands = [["eval", str(copy)], ["generate", str(copy), "--prompt", "1 2 ="]]
    if damage in ("garbage_state", "config_yaml_bad"):
        run_cfg = env.root / "damaged" / f"{damage}.yaml"
        run_cfg.write_text(yaml.safe_dump({**TINY, "name": damage, "out_dir": str(copy.parent)}))
        commands = [["train", str(run_cfg), "--resume"]] + (commands if damage == "config_yaml_bad" else [])
    for argv in commands:
        assert_clean_error(env, argv)


# ---- data download offline ----------------------------------------------------------------------------------
def test_download_failure_is_one_line(env, monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    monkeypatch.setenv("MODFORMER_CACHE", str(tmp_path / "cache"))
    line = assert_clean_error(env, ["train", str(env.cfg), "name=dl", "data.name=shakespeare_char",
                                    f"data.root={tmp_path / 'nodata'}", "data.options={download: true}"],
                              "could not download")
    assert "name resolution" in line and "data.root" in line


# ---- real processes: the console behaviour, not just main()'s return value -----------------------------------
@pytest.mark.parametrize("args", [["train", "{cfg}", "model.d_head=0"],
                                  ["generate", "{run}", "--prompt", "1 2 =", "--top-k", "0"]])
def test_subprocess_exit_status_and_one_error_line(env, args):
    TALLY["tried"] += 1
    argv = [a.format(cfg=env.cfg, run=env.run) for a in args]
    before = snapshot(env.root)
    proc = subprocess.run([sys.executable, "-m", "modformer.cli", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(env.root) == before
    TALLY["clean"] += 1


# ---- the Python API -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return mf.build_model(ModelConfig(vocab_size=11, n_layer=1, d_model=16, n_head=2, max_seq_len=32)).eval()


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": -0.1}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2.0}, "max_new_tokens"), ({"eos_token_id": 11}, "eos_token_id")])
def test_generate_arguments(model, kwargs, match):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **args)


@pytest.mark.parametrize("prompt,match", [
    (torch.zeros(1, 0, dtype=torch.long), "empty"), (torch.zeros(0, 3, dtype=torch.long), "empty"),
    (torch.full((1, 3), 11), r"\[0, 11\); got min 11, max 11"), (torch.tensor([[1, -1]]), "got min -1"),
    (torch.zeros(3, dtype=torch.long), r"shape \(B, T\)"), (torch.zeros(1, 3), "integer tensor")])
def test_generate_bad_prompts(model, prompt, match):
    with pytest.raises(ValueError, match=match):
        model.generate(prompt, 2)


def test_generate_checks_the_prompt_before_the_forward(model, monkeypatch):
    """The id check is generate's own (so it holds on every device), not the CPU-only forward check."""
    from modformer.models import common

    monkeypatch.setattr(common, "check_token_input", lambda *a, **k: None)
    with pytest.raises(ValueError, match="prompt token ids"):
        model.generate(torch.full((1, 2), 99), 1)


def test_forward_out_of_range_ids_on_cpu(model):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 11\)"):
        model(torch.tensor([[0, 11]]))
    with pytest.raises(ValueError, match="got min -1"):
        model(torch.tensor([[-1, 0]]))


def test_valid_sampling_settings_still_sample(model):
    """Boundaries inside the ranges are accepted: top_p=1, top_k=1 (greedy), temperature 0, no new tokens."""
    x = torch.zeros(1, 2, dtype=torch.long)
    greedy = model.generate(x, 4, temperature=0.0)
    assert torch.equal(model.generate(x, 4, top_k=1, top_p=1.0), greedy)
    assert torch.equal(model.generate(x, 0), x)


@pytest.mark.parametrize("field,value", [("rope_base", 0.0), ("rope_base", -1.0), ("rope_base", math.nan),
                                         ("norm_eps", -1.0), ("d_ff", 0), ("d_head", -8), ("dropout", 1.0)])
def test_model_config_ranges_in_the_python_api(field, value):
    cfg = ModelConfig(vocab_size=11, n_layer=1, d_model=16, n_head=2, position="rope", **{field: value})
    with pytest.raises(mf.ConfigError, match=f"model.{field} must be"):
        mf.build_model(cfg)


def test_rope_checks_its_base_without_validate():
    from modformer.layers.position import RotaryPosition

    with pytest.raises(mf.ConfigError, match="model.rope_base must be > 0"):
        RotaryPosition(ModelConfig(d_model=16, n_head=2, rope_base=0.0))


def test_ranges_accept_their_boundaries():
    """The inclusive ends are allowed, so the rules refuse only what is wrong (0 = full batch, 0 = no clipping)."""
    TrainConfig(batch_size=0, grad_clip=0.0, eval_batches=0, label_smoothing=0.0, lr=0.0, min_lr=0.0).validate()
    ModelConfig(vocab_size=5, dropout=0.0, embed_noise=0.0).validate()
    assert Range("[0, 1)").contains(0) and not Range("[0, 1)").contains(1)
    assert Range("(0, 1]").contains(1) and not Range("(0, 1]").contains(0)
    assert not Range(">= 0").contains(True) and not Range(">= 0").contains(math.nan)
    with pytest.raises(ValueError, match="bad range"):
        Range("0..1")
