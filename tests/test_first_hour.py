"""A new user's first hour (issue 26): a CLI that explains itself, progress off a terminal, the task prompt
format, what the run report says, and an `import modformer` that loads no optional heavy package."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import modformer as mf
from modformer.cli import build_parser, main
from modformer.config import RunConfig, apply_overrides, load_config
from modformer.data.tasks import ModularArithmetic
from modformer.registry import ConfigError
from modformer.train.logging import ProgressDisplay, read_metrics
from modformer.train.report import applied_settings, curve_figure

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "tensorboard", "transformers", "peft")


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    """(command path, parser) for the parser and every sub-parser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, [*path, name])


def test_every_option_has_help_and_every_command_an_example():
    missing, no_example = [], []
    commands = list(_walk(build_parser(), ["modformer"]))
    assert {"train", "eval", "generate", "prune", "lora", "distill", "export", "compose"} <= \
        {p[1] for p, _ in commands if len(p) > 1}
    for path, parser in commands:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
        if len(path) >= 2 and " ".join(path) + " " not in (parser.epilog or ""):
            no_example.append(" ".join(path[1:]))      # every command and sub-command (compose cbtm) has one
    assert not missing, f"options without help text: {missing}"
    assert not no_example, f"sub-commands without an example: {no_example}"
    assert {("modformer", "compose", m) for m in ("cbtm", "gates", "calm")} <= {tuple(p) for p, _ in commands}


def test_compose_methods_have_their_own_help(capsys):
    """`compose cbtm --help` is cbtm's page (its --stage, its examples), not the generic compose page."""
    assert main(["compose", "cbtm", "--help"]) == 0
    cbtm = capsys.readouterr().out
    assert cbtm.startswith("usage: modformer compose cbtm") and "--stage" in cbtm and "jobs.txt" in cbtm
    assert main(["compose", "calm", "--help"]) == 0
    calm = capsys.readouterr().out
    assert calm.startswith("usage: modformer compose calm") and "--stage" not in calm
    assert main(["compose", "--help"]) == 0
    page = capsys.readouterr().out
    assert all(m in page for m in ("cbtm", "gates", "calm"))


def test_help_shows_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 0.8)" in out and "examples:" in out and "--max-new-tokens" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_version(capsys):
    assert main(["--version"]) == 0
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"modformer {declared}" == f"modformer {mf.__version__}"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_import_modformer_loads_no_optional_package():
    """`import modformer` (and building a model) loads none of the optional packages; the CLI's parser, used by
    `modformer --help`, does not even load torch."""
    loaded = _modules_after("import modformer as mf\nmf.build_model(mf.ModelConfig(vocab_size=10, n_layer=1, "
                            "d_model=8, n_head=2))\nmf.registry.available()")
    assert "torch" in loaded and not loaded & set(OPTIONAL), loaded & set(OPTIONAL)
    parser_only = _modules_after("from modformer.cli import build_parser\nbuild_parser(full=False)")
    assert not parser_only & {"torch", *OPTIONAL}, parser_only & {"torch", *OPTIONAL}


def test_typo_hints_name_the_full_key(tmp_path):
    for override, hint in (("train.lrr=1", "train.lr"), ("lr=1", "train.lr"), ("model.nlayer=2", "model.n_layer"),
                           ("trian.lr=1", "train")):
        with pytest.raises(ConfigError, match=rf"did you mean '{hint}'\?"):
            apply_overrides(RunConfig(), [override])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  eval_evry: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.eval_evry' \(did you mean 'train.eval_every'"):
        load_config(path)


def test_modular_prompt_format_round_trip():
    data = ModularArithmetic(p=13, op="+")
    ids = data.encode("3 + 5 =")
    assert ids == data.encode("3+5=") == data.encode("3 5 =") == [3, 5, 13]
    assert data.decode(ids) == "3 + 5 =" and data.decode([*ids, 8]) == "3 + 5 = 8"
    assert data.decode([7]) == "7"                                # single tokens (interp labels) unchanged
    assert data.answer_length() == 1
    with pytest.raises(ValueError, match="computes a \\+ b"):
        data.encode("3 - 5 =")
    named = ModularArithmetic(p=7, op="x2+y2")
    assert named.decode(named.encode("3 5 =")) == "3 5 ="


def test_progress_plain_lines_first_and_last(capsys):
    """Off a terminal, updates become plain lines with the info, at most one per interval (first and last kept)."""
    progress = ProgressDisplay(total=30, start=0, enabled=True, plain_every_s=1e9)
    for step in (10, 20, 30):
        progress.update(step, f"loss {step / 10:.4f}")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split("  ")[0] for ln in lines] == ["train step 10/30", "train step 30/30"]
    assert "loss 1.0000" in lines[0] and "ETA" in lines[0]


@pytest.fixture(scope="module")
def modular_run(tmp_path_factory):
    """A tiny modular-addition run trained through the CLI with progress on, output captured (no terminal)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = ROOT / "configs" / "grokking.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "modformer.cli", "train", str(cfg), f"out_dir={out}", "name=tiny",
         "data.options.p=7", "model.d_model=16", "model.n_head=2", "model.d_ff=32", "train.steps=6",
         "train.log_every=2", "train.eval_every=3", "train.early_stop_metric=null", "train.threads=1",
         "train.tensorboard=false"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "tiny", proc


def test_non_terminal_run_prints_banner_and_train_loss(modular_run):
    run, proc = modular_run
    err = proc.stderr
    for fact in ("modformer train tiny", "parameters", "device", f"run folder  {run}", "data", "modular: train"):
        assert fact in err, fact
    train_lines = [ln for ln in err.splitlines() if ln.startswith("train step ")]
    logged = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert train_lines and f"loss {logged[0]['loss']:.4f}" in train_lines[0]
    assert "best at step" in proc.stdout and f"report: {run / 'report.md'}" in proc.stdout


def test_generate_uses_the_task_prompt_and_answer_length(modular_run, capsys):
    run, _ = modular_run
    assert main(["generate", str(run), "--prompt", "3 + 5 =", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    words = out.out.split()
    assert words[:4] == ["3", "+", "5", "="] and len(words) == 5 and 0 <= int(words[4]) < 7
    assert "window slides" not in out.err                 # one answer token fits the 3-token context
    assert main(["generate", str(run), "--prompt", "3 + 5 =", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert len(out.out.split()) == 7 and "exceed the model's context (3): the window slides" in out.err


def test_report_names_best_and_final_and_records_the_environment(modular_run):
    run, _ = modular_run
    report = (run / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert "| validation | final (step 6) | best | best at step |" in report
    assert f"| loss | {summary['final_val_loss']:.6g} | {summary['val_loss']:.6g} | {summary['val_loss_step']} |" \
        in report
    import torch

    for fact in (f"| modformer | `{mf.__version__}` |", f"| torch | `{torch.__version__}` |", "| git commit |",
                 "| command | `", "train.steps=6", "| device | `cpu"):
        assert fact in report, fact
    settings = report.split("## Settings", 1)[1]
    assert "rope_base" not in settings and "d_model: 16" in settings and "p: 7" in settings


def test_applied_settings_keep_core_and_changed_only():
    cfg = apply_overrides(RunConfig(), ["model.d_model=64", "train.lr=1e-3"]).to_dict()
    kept = applied_settings(cfg)
    assert kept["model"]["d_model"] == 64 and kept["model"]["n_layer"] == 2          # changed; core at default
    assert kept["train"]["lr"] == 1e-3 and "eval_every" not in kept["train"] and "rope_base" not in kept["model"]


def test_plots_are_titled_with_integer_step_ticks():
    rows = [{"step": s, "split": "train", "loss": 2.0 / s} for s in (1, 2, 3)]
    fig = curve_figure(rows, "loss", "tiny: loss")
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ax.get_title() == "tiny: loss" and ticks and all(float(t).is_integer() for t in ticks)


def test_readme_starts_with_make_test_and_names_real_configs():
    """CI runs the README's first command; every recipe the README names exists; LICENSE is pyproject's MIT."""
    import re

    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.strip() and not line.startswith(("#", "```")))
    assert first.startswith("make test")
    configs = set(re.findall(r"configs/[\w/]+\.yaml", readme))
    assert configs and not [c for c in configs if not (ROOT / c).is_file()]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")


@pytest.mark.parametrize("stride", [0, 16, 50])
def test_eval_progress_counts_the_batches_evaluate_draws(stride, capsys):
    """`modformer eval` shows a bar / plain lines over its batches: the estimated total equals the number of
    batches iter_eval yields (non-overlapping and sliding windows), and the last line reaches it."""
    from types import SimpleNamespace

    from modformer.cli import _eval_progress
    from modformer.config import DataConfig, TrainConfig
    from modformer.data import build_dataset

    data = build_dataset(DataConfig(name="shakespeare_char", seq_len=64))
    trainer = SimpleNamespace(data=data, cfg=SimpleNamespace(train=TrainConfig(eval_batch_size=256,
                                                                                 eval_stride=stride)))
    actual = sum(1 for _ in data.iter_eval("val", 256, 0, stride=stride))
    progress = _eval_progress(trainer, SimpleNamespace(split="val", max_batches=0, json=False))
    assert progress.total == actual
    assert sum(1 for _ in data.iter_eval("val", 256, 0, stride=stride)) == actual    # the wrapper yields all
    progress.close()
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"eval batch {actual}/{actual}")


def _reference_finetune(model, data, cfg, steps, seed):
    """The loop compress.finetune had before it went through the Trainer (constant lr, mean NLL, clipping)."""
    import torch
    import torch.nn.functional as F

    from modformer.train.optim import build_optimizer

    opt, g, losses = build_optimizer(model, cfg), torch.Generator().manual_seed(seed), []
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(steps):
        x, y = data.get_batch("train", cfg.batch_size, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_finetune_is_the_trainer_loop_and_matches_the_former_loop(capsys):
    """finetune() (studies) runs the Trainer silently: the same batches, losses and weights as the former
    hand-written loop, only trainable parameters change, and nothing is printed. fp32 on CPU: the Trainer's
    sum/n and the reference's mean differ by rounding only (observed <= 1.2e-7 absolute on weights of size ~1)."""
    import copy

    import torch

    from modformer.compress.finetune import finetune
    from modformer.config import ModelConfig, TrainConfig

    data = ModularArithmetic(p=7)
    model = mf.build_model(ModelConfig(vocab_size=data.vocab_size, n_layer=1, d_model=16, n_head=2, max_seq_len=3))
    model.blocks[0].attn.qkv.requires_grad_(False)   # (also the key bias: its gradient is 0 up to rounding,
    ref_model = copy.deepcopy(model)                  # which Adam's normalisation would blow up to +-lr)
    cfg = TrainConfig(batch_size=8, lr=1e-2, schedule="cosine", warmup_steps=3)   # fine-tuning: constant lr
    frozen = model.blocks[0].attn.qkv.weight.clone()
    threads = torch.get_num_threads()
    losses = finetune(model, data, cfg, 6, seed=3)
    expected = _reference_finetune(ref_model, data, cfg, 6, seed=3)
    assert capsys.readouterr().err == "" and torch.get_num_threads() == threads
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.state_dict().items(), ref_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(model.blocks[0].attn.qkv.weight, frozen) and not model.training


def test_prune_and_lora_fine_tune_into_a_normal_run_folder(modular_run, tmp_path, capsys):
    """prune --finetune-steps / lora train through the Trainer: banner and loss lines, and OUT/finetune is a run
    folder (config.yaml, metrics.jsonl, safetensors checkpoint, plots, report) whose checkpoint is the model
    that was written (the pruned model; the LoRA model merged), loadable by every command."""
    import torch

    run, _ = modular_run
    for command, out in ((["prune", str(run), "--method", "neurons", "--amount", "0.5", "--finetune-steps", "4"],
                          tmp_path / "pruned"),
                         (["lora", str(run), "--task", 'data.options.op="-"', "--rank", "1", "--steps", "4",
                           "--merge"], tmp_path / "lora")):
        assert main([*command, "--out", str(out)]) == 0, command[0]
        captured = capsys.readouterr()
        ft = out / "finetune"
        assert "modformer train finetune" in captured.err and "trainable" * (command[0] == "lora") in captured.err
        assert any(ln.startswith("train step 4/4") and "loss" in ln for ln in captured.err.splitlines())
        for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.md", "checkpoints/latest"):
            assert (ft / name).is_file(), (command[0], name)
        assert list((ft / "checkpoints").glob("step_*/model.safetensors")) and list((ft / "plots").glob("*.png"))
        assert [r["step"] for r in read_metrics(ft / "metrics.jsonl") if r["split"] == "val"][-1] == 4
        final = out if command[0] == "prune" else out / "merged"
        for a, b in zip(mf.load(ft).state_dict().values(), mf.load(final).state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)    # merging a copy vs the original: rounding
        assert (out / ("prune.json" if command[0] == "prune" else "adapter_model.safetensors")).is_file()
        assert main(["eval", str(ft), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["split"] == "val"


def test_every_model_form_resolves_for_load_and_commands(modular_run, tmp_path, capsys):
    """One resolver: a run folder, RUN/checkpoints, checkpoints/latest, a checkpoint folder, a saved model, a pruned
    folder, a LoRA adapter folder (base + adapter merged), its merged folder and an HF folder all load through
    mf.load; the run-side forms also eval and generate; anything else is one error line, the same for every
    command."""
    import shutil

    import torch

    run, _ = modular_run
    work = tmp_path / "run"
    shutil.copytree(run, work, ignore=shutil.ignore_patterns(".lock"))
    step = sorted((work / "checkpoints").glob("step_*"))[-1]
    want = mf.load(step).state_dict()
    mf.save(mf.load(work), work / "saved")
    assert main(["prune", str(work), "--method", "neurons", "--amount", "0.5", "--json"]) == 0
    assert main(["lora", str(work), "--task", 'data.options.op="-"', "--rank", "1", "--steps", "2", "--merge",
                 "--json"]) == 0
    gpt2_like = mf.save(mf.build_model(mf.ModelConfig(vocab_size=8, n_layer=1, d_model=16, n_head=2, max_seq_len=3)),
                        tmp_path / "gpt2_like")                   # (the grokking recipe has no norms: not GPT-2)
    assert main(["export", str(gpt2_like), "--hf", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    adapter = work / "adapters" / "default"
    for form in (work, work / "checkpoints", work / "checkpoints" / "latest", step, work / "saved"):
        assert all(torch.equal(v, want[k]) for k, v in mf.load(form).state_dict().items()), form
    merged = mf.load(adapter / "merged").state_dict()
    for k, v in mf.load(adapter).state_dict().items():        # merged on load vs merged when saved: rounding only
        torch.testing.assert_close(v, merged[k], rtol=1e-6, atol=1e-6)
    assert mf.load(work / "pruned_neurons_0.5").num_params() < mf.load(work).num_params()
    hf = mf.load(tmp_path / "hf")
    x = torch.tensor([[1, 2, 7]])
    torch.testing.assert_close(hf(x), mf.load(gpt2_like)(x), rtol=1e-5, atol=1e-5)
    forms = [work, work / "checkpoints" / "latest", step, work / "saved", work / "pruned_neurons_0.5", adapter,
             adapter / "merged", adapter / "finetune"]
    for form in forms:
        prompt = "3 - 5 =" if adapter in (form, form.parent) else "3 + 5 ="   # the adapter's task: op "-"
        assert main(["eval", str(form), "--json", "--max-batches", "1"]) == 0, form
        assert main(["generate", str(form), "--prompt", prompt]) == 0, form
        assert capsys.readouterr().out.splitlines()[-1].startswith(prompt)
    errors = []
    for argv in (["eval", str(tmp_path)], ["generate", str(tmp_path), "--prompt", "1 2 ="],
                 ["circuits", str(tmp_path)], ["prune", str(tmp_path), "--method", "heads", "--amount", "0.5"]):
        assert main(argv) == 2, argv
        errors.append(capsys.readouterr().err.strip())
    with pytest.raises(FileNotFoundError) as e:
        mf.load(tmp_path)
    assert len(set(errors)) == 1 and errors[0] == f"error: {e.value}" and "\n" not in errors[0], errors


def test_bench_prints_a_banner_case_lines_and_a_closing_summary(tmp_path, capsys):
    """`modformer bench NAME`: the start-up facts, one line per measured case with ETA (no terminal), then the
    headline of each result file written as a table and the wall time."""
    out = tmp_path / "bench"
    assert main(["bench", "attention", "--seq", "32", "64", "--head-dim", "8", "--tokens", "64", "--width", "16",
                 "--iters", "1", "--rounds", "1", "--device", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("modformer bench attention\n") and f"results   {out}/" in captured.err
    cases = [ln for ln in captured.err.splitlines() if ln.startswith("bench attention case")]
    assert [ln.split()[3] for ln in cases] == ["0/2", "1/2", "2/2"] and "ETA" in cases[1]
    headline = json.loads((out / "attention.json").read_text())["headline"]
    summary = captured.out[captured.out.index(f"bench attention: {out / 'attention.json'}"):]
    assert all(k in summary for k in headline) and "bench attention: done in" in summary
    assert main(["bench", "attention", "--help"]) == 0 and "modformer bench" not in capsys.readouterr().err


def test_sweep_leaderboard_ranks_measured_trials_first():
    from modformer.sweep.results import leaderboard

    rows = [{"trial": "t0", "train.lr": 0.1, "status": "ok", "steps": 4, "final_val_loss": 2.0},
            {"trial": "t1", "train.lr": 0.2, "status": "failed", "steps": 4, "final_val_loss": 0.5},
            {"trial": "t2", "train.lr": 0.3, "status": "ok", "steps": 4, "final_val_loss": 1.0}]
    table = leaderboard(rows, "final_val_loss", "min")
    assert [r["trial"] for r in table] == ["t2", "t0", "t1"] and table[2]["final_val_loss"] is None
    assert [r["trial"] for r in leaderboard(rows, "final_val_loss", "max", top=1)] == ["t0"]
    assert list(table[0])[:3] == ["rank", "trial", "train.lr"]


def test_hard_dependencies_are_what_import_and_train_need():
    """pyproject: transformers and tensorboard are extras (hf, tensorboard), not hard dependencies; `make test`'s
    install line (.[dev,peft,interp]) still brings both (dev and peft pull them)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    hard = {d.split(">")[0].split("=")[0].split("<")[0] for d in project["dependencies"]}
    assert hard == {"torch", "numpy", "safetensors", "pyyaml", "tokenizers", "rich", "matplotlib"}
    extras = project["optional-dependencies"]
    assert any(d.startswith("transformers") for d in extras["hf"])
    assert any(d.startswith("tensorboard") for d in extras["tensorboard"])
    assert "modformer[hf,tensorboard]" in extras["dev"] and "modformer[hf]" in extras["peft"]
    assert "-e \".[dev,peft,interp]\"" in (ROOT / "Makefile").read_text()


def test_missing_optional_packages_are_one_line_or_a_note(modular_run, tmp_path, monkeypatch, capsys):
    """Without transformers / peft / tensorboard: train still runs (one note, metrics.jsonl only), and a command
    that needs a missing package fails in one line naming the extra to install."""
    import sys as _sys

    import modformer.train.logging as tlog

    for name in ("transformers", "peft", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(_sys.modules, name, None)          # import raises ModuleNotFoundError
    monkeypatch.setattr(tlog, "_TB_NOTE_SHOWN", False)
    cfg = ROOT / "configs" / "grokking.yaml"
    assert main(["train", str(cfg), f"out_dir={tmp_path}", "name=notb", "data.options.p=7", "model.d_model=16",
                 "model.n_head=2", "model.d_ff=32", "train.steps=2", "train.eval_every=2", "train.threads=1",
                 "train.tensorboard=true", "train.early_stop_metric=null"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: tensorboard is not installed") == 1 and "modformer[tensorboard]" in err
    assert (tmp_path / "notb" / "metrics.jsonl").is_file() and not (tmp_path / "notb" / "tb").exists()
    run, _ = modular_run
    for argv, extra in ((["export", str(run), "--hf", str(tmp_path / "hf")], "hf"),
                        (["lora", str(run), "--steps", "1"], "peft"),
                        (["eval", "someorg/somemodel"], "hf")):
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and f"pip install 'modformer[{extra}]'" in lines[0]


@pytest.mark.parametrize("name", ["attention", "memory", "throughput", "generation"])
def test_core_benchmarks_explain_every_option(name, monkeypatch):
    """`modformer bench NAME --help` of the library-vs-peer benchmarks has text for every option (the parser each
    module builds is captured at parse time)."""
    import importlib

    from modformer.bench.registry import entry

    seen = []

    def capture(self, args=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(entry(name).module_path).main([])
    missing = [a.option_strings for a in seen[0]._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, missing


def test_fine_tuning_drops_the_run_only_settings():
    """A run's schedule, warmup, EMA, early stop, compile, fp8, gradual pruning and init_from do not carry into
    fine-tuning; its optimizer settings do."""
    from modformer.compress.finetune import finetune_train_config
    from modformer.config import TrainConfig

    run = TrainConfig(steps=5000, lr=1e-3, schedule="cosine", warmup_steps=100, ema_decay=0.99, compile=True,
                      early_stop_metric="val/acc", early_stop_target=0.99, prune={"final": 0.5}, init_from="x",
                      weight_decay=0.3, eval_every=500, log_every=50, precision="fp8")
    ft = finetune_train_config(run, 20, lr=3e-4)
    assert (ft.steps, ft.lr, ft.schedule, ft.warmup_steps, ft.ema_decay, ft.compile, ft.prune, ft.init_from,
            ft.early_stop_metric, ft.eval_every, ft.log_every, ft.weight_decay, ft.precision) == \
        (20, 3e-4, "constant", 0, 0.0, False, {}, None, None, 20, 20, 0.3, "auto")
    ft.validate()
