"""``modformer compose cbtm | gates | calm CONFIG.yaml [key=value ...]``.

Each method reads its YAML (``configs/compose_*.yaml``) over its defaults, applies dotted overrides
(e.g. ``experts.steps=100 device=cpu``), runs, prints a table and writes ``OUT_DIR/NAME/METHOD.json``.
``cbtm --stage plan`` only writes the per-expert run configs and ``jobs.txt`` (to launch elsewhere).
"""

from __future__ import annotations

import argparse
import importlib
import textwrap
from typing import Any

from modformer.cli_args import device

METHODS = {"cbtm": "modformer.compose.cbtm", "gates": "modformer.compose.gates_run",
           "calm": "modformer.compose.calm"}
CBTM_STAGES = ("cluster", "plan", "train", "eval")


def check_spec(spec: dict[str, Any]) -> None:
    """Check the device and the model / train sections of the spec's RunConfig mappings before anything runs, so
    a bad value is one line now rather than a failure hours into the experiment."""
    from modformer.compose.spec import OPEN_KEYS
    from modformer.config import ConfigError, ModelConfig, TrainConfig, from_dict
    from modformer.validation import DEVICE, check_value

    check_value(spec.get("device"), DEVICE, "device")
    for key in OPEN_KEYS:
        run = spec.get(key)
        if isinstance(run, dict):
            try:
                from_dict(ModelConfig, run.get("model") or {}, prefix="model.").validate(vocab_from_data=True)
                from_dict(TrainConfig, run.get("train") or {}, prefix="train.").validate()
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from None


def cmd_compose(args: argparse.Namespace) -> int:
    from modformer.bench.common import print_table
    from modformer.compose.spec import load_spec

    module = importlib.import_module(METHODS[args.method])
    spec = load_spec(args.config, module.DEFAULTS, args.overrides)
    if args.device:
        spec["device"] = args.device
    check_spec(spec)
    from modformer.console import note

    note("compose", f"{args.method} {spec['name']} -> {spec['out_dir']}/{spec['name']}/")
    if args.method == "cbtm":
        stages = CBTM_STAGES if args.stage == "all" else tuple(args.stage.split(","))
        bad = [s for s in stages if s not in CBTM_STAGES]
        if bad:
            raise ValueError(f"--stage: unknown {bad}; allowed: all or a comma list of {', '.join(CBTM_STAGES)}")
        result = module.run(spec, stages)
    else:
        result = module.run(spec)
    rows = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in result.get("rows", [])]
    print_table(rows)
    if "headline" in result:
        from modformer.console import print_summary

        print_summary(f"compose {args.method} {spec['name']}: headline", values=result["headline"])
    print(f"wrote {spec['out_dir']}/{spec['name']}/{args.method}.json")
    return 0


DESCRIPTIONS = {   # method -> (one-line help, what it does, examples)
    "cbtm": ("c-BTM: cluster a corpus, train one expert per cluster, mix them by distance",
             "Stages (--stage): cluster the training documents, plan one run config per expert (+ jobs.txt), "
             "train the experts (experts.workers at a time), eval the distance-weighted mixture against a dense "
             "model trained on the same tokens. Writes OUT_DIR/NAME/cbtm.json.",
             "modformer compose cbtm configs/compose_cbtm.yaml experts.workers=4\n"
             "modformer compose cbtm configs/compose_cbtm.yaml --stage plan    # configs + jobs.txt only\n"
             "modformer compose cbtm configs/compose_cbtm.yaml --stage train,eval"),
    "gates": ("PHATGOOSE: per-task LoRA experts routed by learned gates",
              "Trains a base on the task format, one LoRA expert per task, then gate variants (independent | "
              "joint, token | prefix) against the oracle, the base and a multitask LoRA. Writes "
              "OUT_DIR/NAME/gates.json.",
              "modformer compose gates configs/compose_gates.yaml\n"
              "modformer compose gates configs/compose_gates.yaml --device cpu experts.steps=100"),
    "calm": ("CALM: bridge a frozen anchor and a frozen augmenting model with cross-attention",
             "Key-value arithmetic (Bansal et al. 2024, 4.1): anchor and augmenting runs, trained bridges, "
             "against full fine-tuning and LoRA of the anchor on the same data. Writes OUT_DIR/NAME/calm.json.",
             "modformer compose calm configs/compose_calm.yaml\n"
             "modformer compose calm configs/compose_calm.yaml calm.every=1"),
}


def add_parsers(sub: Any) -> None:
    """Register ``compose`` and its sub-commands ``cbtm``, ``gates`` and ``calm`` on the CLI's subparsers."""
    p = sub.add_parser("compose", help="composition of experts: cbtm | gates | calm CONFIG.yaml [key=value ...]",
                       description="Composition of experts; each method has its own --help "
                                   "(modformer compose cbtm --help).")
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, (line, text, examples) in DESCRIPTIONS.items():
        m = methods.add_parser(name, help=line, description=f"{line}.\n\n" + textwrap.fill(text, 100),
                               epilog="examples:\n" + "\n".join("  " + e for e in examples.splitlines()))
        m.add_argument("config", help=f"YAML file (configs/compose_{name}.yaml)")
        m.add_argument("overrides", nargs="*", help="dotted overrides of the file, e.g. out_dir=runs/x "
                                                     + ("experts.steps=100" if name != "calm" else "calm.every=1"))
        m.add_argument("--device", type=device, default=None, help="cpu | cuda | auto (default: the config's, auto)")
        if name == "cbtm":
            m.add_argument("--stage", default="all", help="all, or a comma list of cluster,plan,train,eval")
        m.set_defaults(fn=cmd_compose, stage="all")
