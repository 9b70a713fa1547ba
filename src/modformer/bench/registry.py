"""Every benchmark and study behind ``modformer bench NAME``: one entry each, its module imported only when run.

A benchmark times or measures the library against a peer (HF, raw SDPA, a nanoGPT-like recipe); a study trains
models to answer a research question (BENCHMARKS.md's areas, narrative in docs/studies/). Each entry's module has
``main(argv) -> int`` and writes its result with ``modformer.bench.common.write_result`` into ``--out`` (default
runs/bench; ``--out benchmarks/results`` replaces the committed answer).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from modformer.registry import ConfigError, suggest


@dataclass(frozen=True)
class Entry:
    name: str      # the CLI name
    module: str    # the module holding main(argv): under modformer.bench, or a full ``modformer.`` path
    summary: str   # one line for `modformer bench list`

    @property
    def module_path(self) -> str:
        return self.module if self.module.startswith("modformer.") else f"modformer.bench.{self.module}"


def _entries(*rows: tuple[str, str, str]) -> dict[str, Entry]:
    return {name: Entry(name, module, summary) for name, module, summary in rows}


ENTRIES = _entries(
    # benchmarks: the library against its peers
    ("throughput", "throughput", "training tokens/s and MFU of GPT-2 124M / 350M vs HF GPT2LMHeadModel"),
    ("attention", "attention", "attention forward(+backward) of our dispatcher vs raw SDPA and flex"),
    ("generation", "generation", "decoding tokens/s: no cache, growing / static cache, compiled graph vs HF generate"),
    ("generation-batched", "generation_batched", "64 left-padded prompts of mixed lengths, greedy: tokens/s and "
                                                 "identical rows vs HF generate (static cache)"),
    ("memory", "memory", "peak memory of a training step per attention backend and sequence length"),
    ("time-to-loss", "time_to_loss", "wall seconds of fresh `modformer train` processes to a target val loss"),
    ("speedrun", "studies.speedrun", "tokens to Tiny Shakespeare val 1.47: speedrun recipe vs Muon baseline, "
                                     "ablations, lr grid, seeds"),
    ("startup", "startup", "seconds before the first optimizer step, by phase (imports, Trainer() parts, compile)"),
    ("sparse-decode", "sparse_decode", "decoding at long context: learned sparse mask skipping KV blocks vs dense, "
                                       "per-token latency"),
    ("fidelity", "fidelity", "sparse student vs dense teacher: KL, top-1, ppl retention, attention MSE, timing"),
    ("wikitext2", "studies.wikitext2", "WikiText-2 word-level test perplexity of the recipe, via train + eval"),
    ("ddp-scaling", "studies.ddp_scaling", "torchrun DDP / FSDP2 on 1..N GPUs: tokens/s and loss-curve identity"),
    # studies: research questions (docs/studies/)
    ("grokking", "studies.grokking", "modular addition: steps and seconds to 99% val accuracy, recipe vs baseline"),
    ("algo-scaling", "studies.algo_scaling", "scaling laws on modular addition and sorting: loss vs parameters, "
                                             "steps to generalise vs data, fits with bootstrap intervals"),
    ("grokking-fourier", "studies.grokking_fourier", "grokking mechanism: key frequencies, restricted/excluded loss"),
    ("modularity", "studies.modularity", "modularity proxies per attention variant on modular addition: heads "
                                         "needed under ablation, Fourier sparsity, OV rank"),
    ("circuits", "studies.circuits", "copying heads (1 layer) and induction heads (2 layers) on WikiText-2 BPE"),
    ("circuits-figures", "studies.circuits_figures", "the circuits pages' per-head figures from a circuits result"),
    ("circuits-pruning", "modformer.interp.studies", "what head pruning leaves of an induction circuit (CPU, tiny)"),
    ("circuits-lora", "studies.circuits_lora", "LoRA adapters' weight deltas as circuits: where they sit, ablated"),
    ("circuits-sparse", "studies.circuits_sparse", "sparse-attention students vs their teacher's induction circuit"),
    ("variants", "studies.variants", "attention / FFN variants on modular addition at equal parameters"),
    ("variants-lm", "studies.variants_lm", "attention / FFN variants on WikiText-2 at a fixed token budget"),
    ("multichannel", "studies.multichannel", "multi-channel attention (s = 2, 4) vs parameter-matched MHA across "
                                             "context length and model size: the gain"),
    ("variants-summary", "studies.variants_summary", "the variants' one table and plot from the two results above"),
    ("hourglass", "studies.hourglass", "hourglass vs GPT at equal parameters, T=2048: time and FLOPs to a loss"),
    ("stability", "studies.stability", "2017 vs modern transformer: speed, and trainable depth from a sweep"),
    ("recipe-stability", "studies.recipe_stability", "2017 vs modern recipe over >= 20 seeds x depths: non-finite "
                                                     "share, gradient-norm variance, steps to a loss"),
    ("positions", "studies.positions", "position encodings trained at T, evaluated at T, 2T, 4T (extrapolation)"),
    ("grad-checkpointing", "studies.grad_checkpointing", "peak memory and step time with / without gradient "
                                                         "checkpointing (GPT-2-124M, 24 layers)"),
    ("archsearch", "studies.archsearch", "summary of an architecture-search sweep (cheapest trial to the target)"),
    ("prune", "studies.prune", "pruning the grokked model: one-shot curves, iterative magnitude, structured"),
    ("prune-l0", "studies.prune_l0", "L0 / hard-concrete head gates on the grokked model"),
    ("prune-sparse", "studies.prune_sparse", "gradual magnitude pruning to high sparsity + recovery, grokked model"),
    ("prune-wikitext2", "studies.prune_wikitext2", "pruning a small WikiText-2 model: perplexity vs fraction removed"),
    ("lora", "studies.lora", "LoRA (HF PEFT) vs full fine-tuning: modular subtraction from the addition model"),
    ("sparse-fidelity", "studies.sparse_fidelity", "teacher -> distil each sparse attention -> the fidelity suite"),
    ("compose", "studies.compose", "composition of experts: c-BTM, PHATGOOSE gates, CALM (METHOD argument)"),
    ("cbtm-parallel", "studies.cbtm_parallel", "c-BTM experts trained one per GPU at once vs one after another"),
    ("routing-budget", "studies.routing_budget", "top-p / threshold routing (varying number of experts) vs fixed "
                                                 "top-k at equal compute: c-BTM and PHATGOOSE"),
    ("reliability", "studies.reliability", "train SIGKILLed at random moments, then resumed: data lost, bit-exactness"),
)


def lines() -> list[str]:
    """``NAME  summary``, one line per entry (``modformer bench list``)."""
    width = max(len(n) for n in ENTRIES)
    return [f"{e.name.ljust(width)}  {e.summary}" for e in ENTRIES.values()]


def entry(name: str) -> Entry:
    """The entry called ``name``; ConfigError (with a suggestion) for an unknown one."""
    if name not in ENTRIES:
        raise ConfigError(f"unknown benchmark {name!r}{suggest(name, [*ENTRIES, 'list'])}; "
                          "`modformer bench list` shows them all")
    return ENTRIES[name]


def run(name: str, argv: list[str]) -> int:
    """Run benchmark ``name`` with its own options ``argv`` (``list`` prints the entries)."""
    if name == "list":
        print("\n".join(lines()))
        return 0
    module = importlib.import_module(entry(name).module_path)
    return module.main(argv) or 0
