"""The ``modformer`` command line: train, eval, generate, circuits, prune, lora, distill, compose, list.

Every failure a user can cause (bad config key, missing file, diverged run) ends with one
``error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from modformer.cli_args import device, float_in, int_in
from modformer.registry import ConfigError
from modformer.validation import check_device_available


def _device(name: str | None, default: str = "cpu") -> str:
    """A ``--device`` value to load on: ``default`` when not given; ``auto`` = cuda when present, else cpu."""
    import torch

    name = name or default
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def cmd_train(args: argparse.Namespace) -> int:
    from modformer.config import load_config
    from modformer.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    cfg.check_run_dir()
    check_device_available(cfg.train.device, "train.device")
    summary = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit()
    if "report" in summary:
        from modformer.console import print_summary
        from modformer.train.logging import duration

        names = [k[len("final_val_"):] for k in summary if k.startswith("final_val_")]
        took = f"{summary['steps']} steps in {duration(summary['wall_s'])}"
        print_summary(f"{cfg.name}: {took} ({summary['stop_reason']})",
                      columns={"final": {n: summary[f"final_val_{n}"] for n in names},
                               "best": {n: summary[f"val_{n}"] for n in names if f"val_{n}" in summary},
                               "best at step": {n: summary[f"val_{n}_step"] for n in names
                                                if f"val_{n}_step" in summary}})
        print(f"report: {summary['report']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from modformer.runs import run_config, run_model
    from modformer.train.trainer import Trainer

    cfg = run_config(args.run_dir)
    if args.stride is not None:
        cfg.train.eval_stride = args.stride
    device = _device(args.device, "auto")
    model = run_model(args.run_dir, device)
    trainer = Trainer.__new__(Trainer)        # evaluation only: reuse the loop's evaluate()
    from modformer.data import build_dataset
    from modformer.train.distributed import World
    from modformer.train.trainer import resolve_dtype

    trainer.cfg, trainer.world, trainer.device = cfg, World(), torch.device(device)
    trainer.dtype = resolve_dtype(cfg.train.dtype, trainer.device)
    trainer.model = trainer.raw_model = model
    trainer.data, trainer.step = build_dataset(cfg.data), -1
    trainer.run_dir = Path(args.run_dir)
    if not args.json:
        from modformer.console import note

        size = f"{trainer.data.split_size(args.split):,} {'examples' if trainer.data.kind == 'task' else 'tokens'}"
        part = f", first {args.max_batches} batches" if args.max_batches else ""
        note("eval", f"{args.run_dir}: {args.split} split, {size}{part} on {device}")
    progress = _eval_progress(trainer, args)
    try:
        result = {"split": args.split, **trainer.evaluate(args.split, args.max_batches)}
    finally:
        progress.close()
    if args.json:
        print(json.dumps(result))
    else:
        from modformer.console import print_summary

        print_summary(f"eval {args.run_dir} ({args.split} split)", values=result)
    return 0


def _eval_progress(trainer: Any, args: argparse.Namespace) -> Any:
    """A progress bar (plain lines off a terminal) over the evaluation batches: their number is estimated from
    the split size, batch size and stride, and each batch the dataset hands out moves it."""
    import math

    from modformer.train.logging import ProgressDisplay

    data, t = trainer.data, trainer.cfg.train
    bs = t.eval_batch_size or (t.batch_size if t.batch_size > 0 else 0)
    n = data.eval_rows(args.split, t.eval_stride)
    total = math.ceil(n / bs) if bs > 0 else 1
    if args.max_batches:
        total = min(total, args.max_batches)
    progress = ProgressDisplay(max(total, 1), 0, not args.json, label="eval", unit="batch")
    inner = data.iter_eval

    def counted(*a: Any, **k: Any) -> Any:
        for i, batch in enumerate(inner(*a, **k), 1):
            yield batch
            progress.update(min(i, progress.total), "")
    data.iter_eval = counted
    return progress


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from modformer.models.generation import left_pad
    from modformer.runs import run_dataset, run_model

    model = run_model(args.run_dir, _device(args.device))
    data = run_dataset(args.run_dir)
    prompts = list(args.prompt or [])
    if args.prompts:              # one prompt per line; empty lines skipped
        prompts += [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("give --prompt TEXT (repeatable) or --prompts FILE (one prompt per line)")
    for name, value, unset in (("--decode-backend", args.decode_backend, None),
                               ("--decode-linear", args.decode_linear, None),
                               ("--prefill-buckets", args.prefill_buckets, 1)):
        if value != unset and not args.compile:
            raise ConfigError(f"{name} {value} is an option of compiled decoding: add --compile")
    if args.decode_linear is not None:
        from modformer.models.generation import check_compile

        check_compile(True, 1, decode_linear=args.decode_linear)     # an unknown name: one line, before any work
    if args.decode_backend is not None:
        from modformer.layers.attention.kernels import use_backend

        with use_backend(args.decode_backend):      # an unknown name fails here, before any note or work
            pass
    ids = [data.encode(p) for p in prompts]
    if args.max_new_tokens is None:       # a task's answer length (e.g. 1 for modular arithmetic), else 200
        args.max_new_tokens = getattr(data, "answer_length", lambda: 200)()
    for p, i in zip(prompts, ids):
        if not i:
            raise ConfigError(f"--prompt {p!r} encodes to no tokens")
    max_len = model.position.max_len
    idx, mask = left_pad(ids, max_len=max_len, device=model.tok_emb.weight.device)   # one left-padded batch
    g = torch.Generator(device=idx.device).manual_seed(args.seed)
    fits = max_len is None or idx.shape[1] + args.max_new_tokens <= max_len
    from modformer.console import note

    if max_len is not None and idx.shape[1] + args.max_new_tokens - 1 > max_len:   # the last token is never fed
        note("generate", f"prompt + {args.max_new_tokens} new tokens exceed the model's context ({max_len}): "
                         "the window slides, the oldest tokens drop out (no cache)")
    elif args.compile:
        note("generate", "--compile: compiling the decoding step first (a one-off warm-up)")
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=g, use_cache=fits,    # slide the window past the table
                         compile=args.compile and fits, attention_mask=mask,
                         decode_backend=args.decode_backend if args.compile and fits else None,
                         decode_linear=args.decode_linear if args.compile and fits else None,
                         prefill_buckets=args.prefill_buckets if args.compile and fits else 1)
    new = out[:, idx.shape[1]:].tolist()
    texts = [data.decode((i[-max_len:] if max_len else i) + n) for i, n in zip(ids, new)]
    print(texts[0] if len(texts) == 1 else "\n".join(f"### {i}\n{t}" for i, t in enumerate(texts)))
    return 0


def cmd_circuits(args: argparse.Namespace) -> int:
    from modformer.console import note
    from modformer.interp.report import analyze
    from modformer.runs import load_any, run_dataset, run_dir_of, run_model
    from modformer.saving import CONFIG_NAME

    if run_dir_of(args.run_dir) is None and (Path(args.run_dir) / CONFIG_NAME).is_file():
        model, data = load_any(args.run_dir, _device(args.device)), None     # a saved model on its own (mf.save)
        note("circuits", "a saved model without its run folder: no dataset, the sample is random tokens repeated")
    else:
        model = run_model(args.run_dir, _device(args.device))
        data = run_dataset(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "circuits"
    extra = []
    if args.adapter:                # a LoRA adapter: per-head QK/OV deltas, then the circuits of the merged model
        from modformer.interp.deltas import merge_adapter_for_analysis

        model, deltas = merge_adapter_for_analysis(model, args.adapter, out)
        extra.append(str(deltas))
    note("circuits", f"{args.run_dir}: weights, head detectors, attention page -> {out}")
    summary = analyze(model, out, data, html=args.html, text=args.text, title=f"circuits: {Path(args.run_dir).name}")
    files = summary["files"] + extra
    print(f"circuits {args.run_dir}: {len(files)} files")
    print("\n".join(f"  {f}" for f in files))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import time

    from modformer.bench import common
    from modformer.bench.registry import entry, run

    if args.name == "list" or {"-h", "--help"} & set(args.args):
        try:
            return run(args.name, args.args)
        except SystemExit as e:                  # the benchmark's own argparse (--help: 0)
            return 0 if e.code is None else int(e.code)
    what = entry(args.name)                      # an unknown name fails here, before the banner
    out = next((a.split("=", 1)[1] for a in args.args if a.startswith("--out=")), None) or next(
        (b for a, b in zip(args.args, args.args[1:]) if a == "--out"), common.DEFAULT_OUT)
    from modformer.train.logging import ProgressDisplay

    ProgressDisplay(1, 0, True, label="bench").banner(f"modformer bench {args.name}", {
        "measures": what.summary, "options": " ".join(args.args) or "(defaults)", "results": f"{out}/"})
    t0, before = time.perf_counter(), len(common.WRITTEN)
    rc = run(args.name, args.args)
    from modformer.console import print_summary
    from modformer.train.logging import duration

    written = common.WRITTEN[before:]
    for path in written:
        try:
            headline = json.loads(path.read_text(encoding="utf-8")).get("headline") or {}
        except (OSError, ValueError):
            headline = {}
        print_summary(f"bench {args.name}: {path}", values=headline if isinstance(headline, dict) else
                      {"headline": headline})
    print(f"bench {args.name}: {'done' if rc == 0 else f'exit status {rc}'} in {duration(time.perf_counter() - t0)}"
          f"{'' if written else '; no result file written'}")
    return rc


def cmd_sweep(args: argparse.Namespace) -> int:
    from modformer.sweep import Sweep, load_sweep

    spec = load_sweep(args.sweep, args.overrides)
    rows = Sweep(spec, workers=args.workers, resume=args.resume).run()
    from modformer.bench.common import print_table
    from modformer.sweep.results import leaderboard

    table = leaderboard(rows, spec.metric, spec.mode)
    if table:
        print(f"{spec.name}: {len(rows)} trials, best {min(10, len(rows))} by {spec.metric} ({spec.mode}); "
              f"all rows in {spec.folder / 'results.csv'}")
        print_table(table)
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from modformer.sweep.results import read_table
    from modformer.sweep.scaling import analyze

    out = Path(args.out) if args.out else Path(args.results).parent / "scaling"
    result = analyze(read_table(args.results), out, loss_key=args.loss, n_key=args.n, d_key=args.d,
                     c_key=args.c, budgets=args.budget, bootstrap=args.bootstrap)
    print(json.dumps({k: v for k, v in result.items() if k != "plots"}, indent=1, default=float))
    print(f"wrote {out / 'scaling.json'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from modformer import registry

    table = registry.available(args.kind) if args.kind else registry.available()
    if isinstance(table, list):
        table = {args.kind: table}
    for kind, names in table.items():
        print(f"{kind:14s} {', '.join(names)}")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (when it has one worth showing) and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if (action.default is None or action.default is False or action.default == [] or
                action.default == argparse.SUPPRESS or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose sub-parsers (and theirs) all use ``HelpFormatter``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


EXAMPLES = {   # subcommand -> the epilog of its --help
    "train": "modformer train configs/grokking.yaml                 # ~30 s on a 2-core CPU -> runs/grokking/\n"
             "modformer train configs/grokking.yaml name=g2 train.lr=3e-3 model.n_layer=1\n"
             "modformer train configs/grokking.yaml --resume        # continue from the newest checkpoint",
    "eval": "modformer eval runs/grokking\n"
            "modformer eval runs/wikitext2 --split test --stride 128",
    "generate": 'modformer generate runs/grokking --prompt "3 + 5 ="            # task runs: prints 3 + 5 = 8\n'
                'modformer generate runs/shakespeare_char --prompt "ROMEO:" --max-new-tokens 200',
    "circuits": "modformer circuits runs/induction_2l                   # -> runs/induction_2l/circuits/",
    "bench": "modformer bench list\n"
             "modformer bench throughput --preset tiny                # writes under runs/bench/",
    "sweep": "modformer sweep configs/sweeps/scaling_shakespeare.yaml --workers 2\n"
             "modformer sweep configs/sweeps/scaling_shakespeare.yaml --resume",
    "scaling": "modformer scaling runs/sweeps/scaling_shakespeare/results.jsonl --budget 1e16 1e17",
    "prune": "modformer prune runs/grokking --method neurons --amount 0.5 --finetune-steps 200\n"
             "modformer prune runs/grokking --method heads --importance l0 --l0-closed --l0-lambda 2",
    "lora": "modformer lora runs/grokking --task 'data.options.op=\"-\"' --rank 1 --targets qkv,out,up,down",
    "distill": "modformer distill configs/sparse_window.yaml teacher=runs/sparse_fidelity/teacher_hf",
    "compose": "modformer compose cbtm configs/compose_cbtm.yaml experts.workers=4\n"
               "modformer compose cbtm configs/compose_cbtm.yaml --stage plan\n"
               "modformer compose calm configs/compose_calm.yaml calm.every=1",
    "export": "modformer export runs/shakespeare_char --hf out/shakespeare_hf",
    "list": "modformer list\nmodformer list attention",
}

# Sub-commands whose parser lives in a module that imports torch: built only when that command is run
# (or for the full parser), so `modformer --help` and the other commands' --help stay fast.
HEAVY = {  # module -> (function adding its sub-parsers, {command: one-line help})
    "modformer.compress.commands": ("add_parsers", {
        "prune": "prune a run's newest checkpoint (magnitude | heads | neurons | layers)",
        "lora": "train a LoRA adapter (HF PEFT) on a task from a run's newest checkpoint"}),
    "modformer.compress.distill": ("add_parser", {
        "distill": "distil a teacher into a student with another attention: modformer distill CONFIG.yaml"}),
    "modformer.models.hf.commands": ("add_parser", {
        "export": "write a model as an HF folder: modformer export MODEL --hf OUT"}),
}


def build_parser(command: str | None = None, full: bool = True) -> argparse.ArgumentParser:
    """The whole command line. ``full=False`` builds the torch-importing parsers (``HEAVY``) only for
    ``command``; the others get a one-line entry (enough for ``modformer --help``)."""
    from modformer import __version__

    p = Parser(prog="modformer", description=__doc__.splitlines()[0],
               epilog="examples:\n  modformer train configs/grokking.yaml\n  modformer COMMAND --help")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train from a YAML config: modformer train CONFIG.yaml [key=value ...]")
    t.add_argument("config", help="YAML recipe, e.g. configs/grokking.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.n_layer=4")
    t.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's newest checkpoint on a split")
    e.add_argument("run_dir", help="run folder (runs/NAME)")
    e.add_argument("--split", default="val", help="val | train (| test for corpora that have one)")
    e.add_argument("--max-batches", type=int_in(">= 0"), default=0, help="0 = the full split")
    e.add_argument("--stride", type=int_in(">= 1"), default=None,
                   help="corpora: sliding-window evaluation, each token scored with >= seq_len - STRIDE context")
    e.add_argument("--device", type=device, default=None, help="auto | cpu | cuda | cuda:N | mps (default auto)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON line (for scripts), not a table")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a run's newest checkpoint")
    g.add_argument("run_dir", help="run folder (runs/NAME)")
    g.add_argument("--prompt", action="append", help="repeatable: the prompts decode together as one batch; "
                   'task runs use the task\'s format, e.g. "3 + 5 =" for modular addition')
    g.add_argument("--prompts", default=None, help="file of prompts, one per line (added to --prompt)")
    g.add_argument("--max-new-tokens", type=int_in(">= 0"), default=None,
                   help="tokens to add (default: the answer's length for task runs, else 200)")
    g.add_argument("--temperature", type=float_in(">= 0"), default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int_in(">= 1"), default=None, help="sample among the K likeliest tokens only")
    g.add_argument("--top-p", type=float_in("(0, 1]"), default=None,
                   help="sample among the likeliest tokens holding probability P (nucleus)")
    g.add_argument("--seed", type=int_in(">= 0"), default=0, help="sampling seed")
    g.add_argument("--compile", action="store_true",
                   help="compiled decoding with a static cache (one CUDA graph per token on GPU)")
    g.add_argument("--decode-backend", default=None, metavar="NAME",
                   help="with --compile: attention backend of the decode steps (default: the model's); decode = "
                        "multiply-and-sum over the cache (64 fp32 rows, H100: 1.97x HF generate), flex = split-KV "
                        "flex decoding (batch 1, H100: 1.17x decode), eager, sdpa")
    g.add_argument("--decode-linear", default=None, metavar="NAME",
                   help="with --compile: the decode steps' linears as cuBLAS GEMMs (default) or, for 1-4 prompts, "
                        "Inductor matrix-vector reductions (matvec)")
    g.add_argument("--prefill-buckets", type=int_in(">= 1"), default=1, metavar="N",
                   help="with --compile and several prompts: prefill in N groups of similar length (less padding)")
    g.add_argument("--device", type=device, default=None, help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("circuits", help="interpretability report (HTML, plots, head table) of a run's checkpoint")
    c.add_argument("run_dir", help="run folder (runs/NAME)")
    c.add_argument("--html", default=None, help="attention page path (default OUT/circuits.html)")
    c.add_argument("--out", default=None, help="output folder (default RUN_DIR/circuits)")
    c.add_argument("--text", default=None, help="text shown in the attention page (default: a validation example)")
    c.add_argument("--device", type=device, default=None, help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    c.add_argument("--adapter", default=None, help="LoRA adapter folder (`modformer lora` output): writes "
                                                   "OUT/adapter_deltas.json and analyses the merged model")
    c.set_defaults(fn=cmd_circuits)

    b = sub.add_parser("bench", help="run a benchmark or study: modformer bench NAME [options]; "
                                     "`modformer bench list` shows them")
    b.add_argument("name", help="a benchmark (see `modformer bench list`), or list")
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (see NAME --help)")
    b.set_defaults(fn=cmd_bench)

    sw = sub.add_parser("sweep", help="run a sweep: modformer sweep SWEEP.yaml [--workers N] [--resume] [key=value]")
    sw.add_argument("sweep", help="sweep file, e.g. configs/sweeps/scaling_shakespeare.yaml")
    sw.add_argument("overrides", nargs="*", help="the sweep file's own keys, e.g. num_samples=4 halving.min_steps=50")
    sw.add_argument("--workers", type=int_in(">= 1"), default=None,
                    help="trials at once on CPU (default: the file's workers)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep, skipping finished trials")
    sw.set_defaults(fn=cmd_sweep)

    sc = sub.add_parser("scaling", help="fit scaling laws to sweep results: modformer scaling RESULTS.{jsonl,csv}")
    sc.add_argument("results", help="a sweep's results.jsonl or results.csv")
    sc.add_argument("--budget", type=float_in("> 0"), nargs="*", default=None,
                    help="FLOP budgets for compute-optimal sizes")
    sc.add_argument("--out", default=None, help="output folder (default: RESULTS' folder/scaling)")
    sc.add_argument("--loss", default="final_val_loss", help="loss column")
    sc.add_argument("--n", default="params", help="model-size column")
    sc.add_argument("--d", default="tokens", help="training-tokens column")
    sc.add_argument("--c", default="flops", help="training-compute column")
    sc.add_argument("--bootstrap", type=int_in(">= 0"), default=200, help="bootstrap resamples for the intervals")
    sc.set_defaults(fn=cmd_scaling)

    import importlib

    for module, (fn, lines) in HEAVY.items():          # prune, lora, distill, export --hf
        if full or command in lines:
            getattr(importlib.import_module(module), fn)(sub)
        else:
            for name, line in lines.items():
                sub.add_parser(name, help=line)
    from modformer.compose.commands import add_parsers as add_compose_parsers

    add_compose_parsers(sub)                   # compose cbtm | gates | calm
    ls = sub.add_parser("list", help="registered components")
    ls.add_argument("kind", nargs="?", help="one kind (attention, position, norm, ffn, model, task, corpus, ...)")
    ls.set_defaults(fn=cmd_list)
    for name, parser in sub.choices.items():
        if name in EXAMPLES:
            parser.epilog = "examples:\n" + "\n".join("  " + line for line in EXAMPLES[name].splitlines())
    return p


EXTRAS = {"transformers": "hf", "peft": "peft", "tensorboard": "tensorboard", "transformer_lens": "interp"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """``needs transformers, which is not installed: pip install 'modformer[hf]'`` for an optional package (None for
    any other missing module: a real bug, shown as such)."""
    root = (e.name or "").split(".")[0]
    if root not in EXTRAS:
        return None
    return f"needs {root}, which is not installed: pip install 'modformer[{EXTRAS[root]}]'"


def _command(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (its first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command(argv), full=False)
    try:                            # argparse prints usage + one error line and exits 2 (--help: 0)
        args, extra = parser.parse_known_args(argv)
        takes_overrides = ("train", "sweep", "distill", "compose")
        bad = [a for a in extra if "=" not in a or a.startswith("-") or args.command not in takes_overrides]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
    except SystemExit as e:         # returned, so in-process callers get the status as from any other error
        return 0 if e.code is None else int(e.code)
    if extra:
        args.overrides = list(args.overrides) + extra   # key=value given after --flags
    from modformer.train.checkpoint import CheckpointError
    from modformer.train.trainer import TrainingError

    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError, TrainingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:            # the OS refused (permissions, a file where a folder should be): its own words
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:   # an optional package this command needs (pyproject's extras)
        line = missing_extra(e)
        if line is None:
            raise
        print(f"error: {args.command}: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from modformer.runs import interrupted_message  # names the newest verified checkpoint, or says none

        print(interrupted_message(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
