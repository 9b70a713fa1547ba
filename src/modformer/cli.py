"""The ``modformer`` command line: train, eval, generate, circuits, prune, lora, distill, compose, list.

Every failure a user can cause (bad config key, missing file, diverged run) ends with one
``error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
        keys = [k for k in summary if k.startswith("final_val_")]
        print(" ".join(f"{k[len('final_val_'):]}={summary[k]:.4g}" for k in keys))
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
    result = {"split": args.split, **trainer.evaluate(args.split, args.max_batches)}
    print(json.dumps(result))
    return 0


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
    ids = [data.encode(p) for p in prompts]
    for p, i in zip(prompts, ids):
        if not i:
            raise ConfigError(f"--prompt {p!r} encodes to no tokens")
    max_len = model.position.max_len
    idx, mask = left_pad(ids, max_len=max_len, device=model.tok_emb.weight.device)   # one left-padded batch
    g = torch.Generator(device=idx.device).manual_seed(args.seed)
    fits = max_len is None or idx.shape[1] + args.max_new_tokens <= max_len
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=g, use_cache=fits,    # slide the window past the table
                         compile=args.compile and fits, attention_mask=mask)
    new = out[:, idx.shape[1]:].tolist()
    texts = [data.decode((i[-max_len:] if max_len else i) + n) for i, n in zip(ids, new)]
    print(texts[0] if len(texts) == 1 else "\n".join(f"### {i}\n{t}" for i, t in enumerate(texts)))
    return 0


def cmd_circuits(args: argparse.Namespace) -> int:
    from modformer.interp.report import analyze
    from modformer.runs import run_dataset, run_model

    model = run_model(args.run_dir, _device(args.device))
    data = run_dataset(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "circuits"
    extra = []
    if args.adapter:                # a LoRA adapter: per-head QK/OV deltas, then the circuits of the merged model
        from modformer.interp.deltas import merge_adapter_for_analysis

        model, deltas = merge_adapter_for_analysis(model, args.adapter, out)
        extra.append(str(deltas))
    summary = analyze(model, out, data, html=args.html, text=args.text, title=f"circuits: {Path(args.run_dir).name}")
    print("\n".join(summary["files"] + extra))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from modformer.bench.registry import run

    return run(args.name, args.args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from modformer.sweep import Sweep, load_sweep

    spec = load_sweep(args.sweep, args.overrides)
    Sweep(spec, workers=args.workers, resume=args.resume).run()
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modformer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config: modformer train CONFIG.yaml [key=value ...]")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 model.n_layer=4")
    t.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's newest checkpoint on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", default="val")
    e.add_argument("--max-batches", type=int_in(">= 0"), default=0, help="0 = the full split")
    e.add_argument("--stride", type=int_in(">= 1"), default=None,
                   help="corpora: sliding-window evaluation, each token scored with >= seq_len - STRIDE context")
    e.add_argument("--device", type=device, default=None, help="auto | cpu | cuda | cuda:N | mps (default auto)")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a run's newest checkpoint")
    g.add_argument("run_dir")
    g.add_argument("--prompt", action="append", help="repeatable: the prompts decode together as one batch")
    g.add_argument("--prompts", default=None, help="file of prompts, one per line (added to --prompt)")
    g.add_argument("--max-new-tokens", type=int_in(">= 0"), default=200)
    g.add_argument("--temperature", type=float_in(">= 0"), default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int_in(">= 1"), default=None)
    g.add_argument("--top-p", type=float_in("(0, 1]"), default=None)
    g.add_argument("--seed", type=int_in(">= 0"), default=0)
    g.add_argument("--compile", action="store_true",
                   help="compiled decoding with a static cache (one CUDA graph per token on GPU)")
    g.add_argument("--device", type=device, default=None, help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("circuits", help="interpretability report (HTML, plots, head table) of a run's checkpoint")
    c.add_argument("run_dir")
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
    sw.add_argument("sweep")
    sw.add_argument("overrides", nargs="*", help="the sweep file's own keys, e.g. num_samples=4 halving.min_steps=50")
    sw.add_argument("--workers", type=int_in(">= 1"), default=None,
                    help="trials at once on CPU (default: the file's workers)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep, skipping finished trials")
    sw.set_defaults(fn=cmd_sweep)

    sc = sub.add_parser("scaling", help="fit scaling laws to sweep results: modformer scaling RESULTS.{jsonl,csv}")
    sc.add_argument("results")
    sc.add_argument("--budget", type=float_in("> 0"), nargs="*", default=None,
                    help="FLOP budgets for compute-optimal sizes")
    sc.add_argument("--out", default=None, help="output folder (default: RESULTS' folder/scaling)")
    sc.add_argument("--loss", default="final_val_loss", help="loss column")
    sc.add_argument("--n", default="params", help="model-size column")
    sc.add_argument("--d", default="tokens", help="training-tokens column")
    sc.add_argument("--c", default="flops", help="training-compute column")
    sc.add_argument("--bootstrap", type=int_in(">= 0"), default=200)
    sc.set_defaults(fn=cmd_scaling)

    from modformer.compress.commands import add_parsers as add_compress_parsers

    add_compress_parsers(sub)                  # prune, lora
    from modformer.compose.commands import add_parsers as add_compose_parsers

    add_compose_parsers(sub)                   # compose cbtm | gates | calm
    from modformer.compress.distill import add_parser as add_distill_parser

    add_distill_parser(sub)                    # distill
    from modformer.models.hf.commands import add_parser as add_export_parser

    add_export_parser(sub)                     # export --hf

    ls = sub.add_parser("list", help="registered components")
    ls.add_argument("kind", nargs="?")
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    except KeyboardInterrupt:
        from modformer.runs import interrupted_message   # names the newest verified checkpoint, or says none

        print(interrupted_message(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
