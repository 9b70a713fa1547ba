"""Configuration dataclasses, YAML round trip, dotted CLI overrides and validation.

A run is ``RunConfig(model=ModelConfig, data=DataConfig, train=TrainConfig)``. Every field
is plain data so configs serialise to YAML/JSON and back unchanged. Unknown keys raise a
one-line ``ConfigError`` that suggests the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from modformer.registry import ConfigError, suggest
from modformer.validation import DEVICE, check_fields, check_plain_name

__all__ = ["ConfigError", "ModelConfig", "DataConfig", "TrainConfig", "RunConfig",
           "from_dict", "load_config", "apply_overrides", "save_yaml"]


@dataclass
class ModelConfig:
    """Architecture of a model: sizes plus registry names of each component."""

    vocab_size: int = 0                # 0 = take it from the dataset (the trainer fills it in)
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    n_kv_heads: int | None = None      # None = n_head (MHA); 1 = MQA; between = GQA
    d_head: int | None = None          # None = d_model // n_head
    d_ff: int | None = None            # None = 4*d_model (MLP) or LLaMA-rounded 8/3*d_model (GLU)
    ffn_multiple_of: int = 64          # GLU hidden size is rounded up to a multiple of this
    max_seq_len: int = 1024            # size of the learned position table; cache size limit
    model: str = "gpt"
    attention: str = "mha"
    attn_backend: str = "sdpa"         # sdpa | eager | flex | decode
    position: str = "learned"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0         # share of each head's dims that RoPE rotates (GPT-NeoX rotary_pct)
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # HF's keys: {} | {rope_type: linear, factor} |
                     # {rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    norm: str = "layernorm"
    norm_placement: str = "pre"        # pre | post | sandwich
    norm_eps: float = 1e-5
    ffn: str = "gelu"
    bias: bool = True
    qk_norm: bool = False
    qkv_bias: bool | None = None       # bias of the QKV projection only; None = follow `bias` (Qwen2: true)
    parallel_residual: bool = False    # x + attn(ln1(x)) + ffn(ln2(x)) (GPT-J / GPT-NeoX), pre-norm only
    causal: bool = True
    dropout: float = 0.0               # residual/embedding dropout
    attn_dropout: float = 0.0
    attn_only: bool = False
    tie_embeddings: bool = True
    final_norm: bool = True
    rezero: bool = False               # learned residual gate initialised at 0 (Bachlechner et al.)
    grad_checkpointing: bool = False
    init: str = "gpt2"                 # gpt2 (N(0, init_std), scaled residual projections) | torch (defaults)
    init_std: float = 0.02
    embed_init_std: float | None = None  # token-embedding std; None = init_std
    scale_embeddings: bool = False     # multiply token embeddings by sqrt(d_model) (Vaswani et al. 2017, 3.4),
                                       # so they are not drowned by unit-amplitude sinusoidal positions
    embed_noise: float = 0.0           # NEFTune alpha: training-time uniform noise on token embeddings
    attention_options: dict[str, Any] = field(default_factory=dict)
    ffn_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    # Per-layer overrides (empty, or one dict per layer) of LAYER_FIELDS, e.g. a pruned model's
    # {"n_head": 3, "d_head": 32, "d_ff": 96}; Block builds layer i from for_layer(i).
    layer_overrides: list[dict[str, Any]] = field(default_factory=list)
    # Speedrun components (modded-nanogpt; ARCHITECTURE.md "Speedrun components"). All off by default.
    zero_init_proj: bool = False       # residual output projections (attn.out, mlp.down) start at exactly zero
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2), e.g. 30.0; None = off
    value_embeds: int = 0              # K token-embedding tables mixed into V of the first K and last K layers
    unet_skips: bool = False           # block i's output joins the input of block L-1-i (learned scalar)
    window_pattern: list[int] = field(default_factory=list)   # per-layer sliding windows, cycled; 0 = full

    LAYER_FIELDS = ("n_head", "n_kv_heads", "d_head", "d_ff", "attn_only", "attention", "ffn",
                    "attention_options", "ffn_options")
    # Value rules (validation.check_fields): a range in math notation or the allowed names; None passes.
    RULES: ClassVar[dict[str, Any]] = {
        "vocab_size": ">= 0", "n_layer": ">= 1", "d_model": ">= 1", "n_head": ">= 1", "n_kv_heads": ">= 1",
        "d_head": ">= 1", "d_ff": ">= 1", "ffn_multiple_of": ">= 1", "max_seq_len": ">= 1", "rope_base": "> 0",
        "norm_eps": "> 0", "dropout": "[0, 1)", "attn_dropout": "[0, 1)", "init_std": "> 0",
        "embed_init_std": "> 0", "embed_noise": ">= 0", "init": ("gpt2", "torch"),
        "norm_placement": ("pre", "post", "sandwich"), "logit_softcap": ["> 0", "null = off"],
        "value_embeds": ">= 0"}
    GPT_ONLY = ("logit_softcap", "value_embeds", "unet_skips", "window_pattern")   # other models reject them

    def for_layer(self, i: int) -> ModelConfig:
        """The config layer ``i`` is built from: this one with ``layer_overrides[i]`` applied.

        A layer that changes ``n_head`` keeps the model's head width unless it sets ``d_head``.
        """
        over = dict(self.layer_overrides[i]) if self.layer_overrides else {}
        window = self.window_for(i)
        if window:                          # model.window_pattern: this layer's attention becomes sliding_window
            kind = over.get("attention", self.attention)
            opts = dict(over.get("attention_options", self.attention_options))
            if kind == "mqa":
                opts["n_kv_heads"] = 1
            over.update(attention="sliding_window", attention_options={**opts, "window": window})
        if not over:
            return self
        if "n_head" in over and "d_head" not in over and self.d_head is None:
            over = {**over, "d_head": self.head_dim}
        return dataclasses.replace(self, layer_overrides=[], window_pattern=[], **over)

    def window_for(self, i: int) -> int:
        """Layer ``i``'s sliding window from ``window_pattern`` (cycled over the layers); 0 = full attention."""
        return int(self.window_pattern[i % len(self.window_pattern)]) if self.window_pattern else 0

    def value_embed_table(self, i: int) -> int | None:
        """Which value-embedding table layer ``i`` mixes into its values (modded-nanogpt's layout: table t
        serves layer t and layer ``n_layer - K + t``), or None."""
        k = self.value_embeds
        if k <= 0 or not 0 <= i < self.n_layer:
            return None
        if i < k:
            return i
        if i >= self.n_layer - k:
            return i - (self.n_layer - k)
        return None

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_head

    def validate(self, vocab_from_data: bool = False) -> ModelConfig:
        """Raise a one-line ConfigError naming the first bad field.

        ``vocab_from_data`` accepts ``vocab_size=0`` (run configs: the trainer fills it in).
        """
        from modformer import registry

        check_fields(self, "model")
        if self.vocab_size == 0 and not vocab_from_data:
            raise ConfigError("model.vocab_size must be >= 1, got 0 (0 means 'from the dataset', which only the "
                              "trainer fills in)")
        if self.d_head is None and self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head}), "
                "or set model.d_head")
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise ConfigError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        for fld, kind in (("model", "model"), ("attention", "attention"), ("position", "position"),
                          ("norm", "norm"), ("ffn", "ffn"), ("attn_backend", "attn_backend")):
            registry.get(kind, getattr(self, fld), field=f"model.{fld}")
        if self.parallel_residual and (self.norm_placement != "pre" or self.attn_only):
            raise ConfigError("model.parallel_residual needs model.norm_placement: pre and an FFN "
                              "(attn_only: false)")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ConfigError(f"model.rope_fraction must be in (0, 1], got {self.rope_fraction}")
        self._validate_speedrun()
        if self.layer_overrides:
            if len(self.layer_overrides) != self.n_layer:
                raise ConfigError(f"model.layer_overrides needs one entry per layer ({self.n_layer}), "
                                  f"got {len(self.layer_overrides)}")
            for i, over in enumerate(self.layer_overrides):
                bad = set(over) - set(self.LAYER_FIELDS)
                if bad:
                    raise ConfigError(f"model.layer_overrides[{i}]: {sorted(bad)} cannot vary per layer; "
                                      f"allowed: {', '.join(self.LAYER_FIELDS)}")
                sub = self.for_layer(i)
                check_fields(sub, f"model.layer_overrides[{i}]")
                if sub.n_head <= 0 or sub.kv_heads <= 0 or sub.n_head % sub.kv_heads:
                    raise ConfigError(f"model.layer_overrides[{i}]: n_head ({sub.n_head}) must be a positive "
                                      f"multiple of n_kv_heads ({sub.n_kv_heads})")
        return self

    def _validate_speedrun(self) -> None:
        """The speedrun fields: GPT only, value tables fit the depth, windows on mha / gqa / mqa layers only."""
        if self.model != "gpt":
            for name in self.GPT_ONLY:
                if getattr(self, name):
                    raise ConfigError(f"model.{name} is supported by model: gpt only, not {self.model!r}")
        if 2 * self.value_embeds > self.n_layer:
            raise ConfigError(f"model.value_embeds ({self.value_embeds}) tables serve the first and last K layers: "
                              f"2 * K must be <= model.n_layer ({self.n_layer})")
        for w in self.window_pattern:
            if isinstance(w, bool) or not isinstance(w, int) or w < 0:
                raise ConfigError(f"model.window_pattern entries must be integers >= 0 (0 = full attention), "
                                  f"got {w!r}")
        for i in range(self.n_layer):
            if self.window_for(i):
                over = self.layer_overrides[i] if self.layer_overrides else {}
                kind = over.get("attention", self.attention)
                if kind not in ("mha", "gqa", "mqa"):
                    raise ConfigError(f"model.window_pattern needs model.attention mha, gqa or mqa on its windowed "
                                      f"layers; layer {i} has {kind!r}")


@dataclass
class DataConfig:
    """What to train on: a registered task (algorithmic) or corpus (text) and its options."""

    name: str = "modular"              # registry name under "task" or "corpus"
    seq_len: int = 256                 # context length for corpora (tasks set their own)
    root: str | None = None            # data folder; None = ../shared/data or $MODFORMER_DATA
    options: dict[str, Any] = field(default_factory=dict)
    pack: bool = False                 # corpora with an EOS separator: attention never crosses documents
    pad_documents: bool = False        # one document per row, right-padded (attention_mask; no loss on padding)

    RULES: ClassVar[dict[str, Any]] = {"seq_len": ">= 1"}   # value rules (validation.check_fields)

    def validate(self) -> DataConfig:
        """Raise a one-line ConfigError naming the first bad field (options are checked by the dataset)."""
        check_fields(self, "data")
        return self


@dataclass
class TrainConfig:
    """Optimisation, evaluation, checkpointing and hardware settings of one run."""

    steps: int = 1000
    batch_size: int = 64               # sequences per optimizer step, all processes and micro-steps
                                       # together (so results don't depend on the GPU count); 0 = full batch
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False     # apply weight decay to embeddings too
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # e.g. grokfast settings
    schedule: str = "cosine"           # constant | cosine | linear | wsd (warmup, constant, linear cool-down)
    warmup_steps: int = 0
    cooldown: float = 0.2              # wsd: share of train.steps in the final linear decay to min_lr
    grad_clip: float = 1.0             # 0 disables
    label_smoothing: float = 0.0       # training loss only; evaluation reports the plain NLL
    ema_decay: float = 0.0             # EMA of the weights for eval/samples/saved model; 0 = off, e.g. 0.999
    ema_start: int = 0                 # EMA copies the weights up to this step, averages after it
    eval_every: int = 100
    eval_batches: int = 20             # 0 = full split
    eval_batch_size: int | None = None
    eval_stride: int = 0               # corpora: 0 = non-overlapping windows; S < seq_len = sliding windows
    log_every: int = 10
    checkpoint_every: int = 0          # 0 = only at the end
    early_stop_metric: str | None = None   # e.g. "val/acc"
    early_stop_target: float | None = None
    early_stop_mode: str = "max"       # max: stop when metric >= target; min: <=
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    precision: str = "auto"            # auto (as dtype) | bf16 (= dtype bfloat16) | fp8 (bf16 autocast + FP8
                                       # matmuls in the linear layers, train/fp8.py; CUDA capability >= 8.9:
                                       # tensorwise scales, e5m2 gradients) | fp8_rowwise (row scales, e4m3)
    loss_chunk_size: int = 0           # rows per chunk of the training cross-entropy (train/loss.py);
                                       # 0 = automatic (about 64M logits a chunk)
    compile: bool = False
    compile_mode: str = "default"      # torch.compile mode: default | reduce-overhead (CUDA graphs: for small,
                                       # launch-bound models) | max-autotune | max-autotune-no-cudagraphs |
                                       # cudagraphs (CUDA graphs of eager kernels, no Inductor codegen)
    compile_loss: str = "auto"         # auto | on | off, with compile: the loss compiled apart from the model
                                       # (train/loss.py lm_loss; fused cross-entropy). auto: on for vocabularies
                                       # of >= 1024 entries (train/loss.py COMPILED_LOSS_MIN_VOCAB says why)
    compile_scope: str = "model"       # model (one graph) | blocks (regional: each transformer block compiled,
                                       # identical blocks share one compiled graph: a shorter cold compile;
                                       # compile_mode default or max-autotune-no-cudagraphs only)
    cuda_graph: bool = False           # CUDA: the whole training step (forward, backward, clipping, optimizer)
                                       # captured once as a CUDA graph and replayed (train/step_graph.py): for
                                       # small, launch-bound models; optimizer adamw or muon with muon_grouped
    distributed: str = "ddp"           # ddp | fsdp (used when launched by torchrun)
    grad_reduce_dtype: str = "float32"  # float32 | bfloat16: dtype of the data-parallel gradient average
    seed: int = 0
    threads: int | None = None         # torch.set_num_threads on CPU
    deterministic: bool = False        # bit-reproducible runs: deterministic kernels, 1 CPU thread (MKL may
                                       # change its thread count under load, and with it the sums' order)
    progress: bool = True
    tensorboard: bool = True
    sample_tokens: int = 200           # generated sample length in LM reports
    keep_checkpoints: int = 2          # newest checkpoints kept on disk
    profile_steps: tuple[int, int] | None = None   # [first, last] steps traced by torch.profiler -> RUN/profile/
    profile_memory: bool = False       # also record allocations -> RUN/profile/rank{R}_memory.txt (peak, ops by
                                       # memory); without profile_steps it traces steps 1-3
    init_from: str | None = None       # run folder / saved model / HF GPT-2 folder: initial weights (fine-tuning)
    prune: dict[str, Any] = field(default_factory=dict)   # gradual magnitude pruning while training (train/pruning.py):
                                       # {final: 0.9, start: 100, end: 400, every: 10, scope: global}; {} = off

    # Value rules (validation.check_fields): a range or the allowed names, [rule, note] where a value means more.
    RULES: ClassVar[dict[str, Any]] = {
        "steps": ">= 1", "batch_size": [">= 0", "0 = the whole training split, for tasks"], "grad_accum": ">= 1",
        "lr": [">= 0", "0 = no update, weights kept"], "min_lr": ">= 0", "betas": "[0, 1)", "eps": "> 0",
        "weight_decay": ">= 0",
        "warmup_steps": ">= 0", "cooldown": ["[0, 1]", "wsd only"],
        "grad_clip": [">= 0", "0 disables clipping"], "label_smoothing": "[0, 1)",
        "ema_decay": ["[0, 1)", "0 disables, typical 0.999"], "ema_start": ">= 0", "eval_every": ">= 1",
        "eval_batches": [">= 0", "0 = the full split"], "eval_batch_size": ">= 1", "eval_stride": ">= 0",
        "log_every": ">= 1", "checkpoint_every": [">= 0", "0 = only at the end"], "early_stop_mode": ("max", "min"),
        "device": DEVICE, "dtype": ("auto", "float32", "bfloat16", "float16"),
        "precision": ("auto", "bf16", "fp8", "fp8_rowwise"), "loss_chunk_size": [">= 0", "0 = automatic"],
        "compile_loss": ("auto", "on", "off"),
        "distributed": ("ddp", "fsdp"),
        "grad_reduce_dtype": ("float32", "bfloat16"), "seed": ">= 0", "threads": ">= 1", "sample_tokens": ">= 0",
        "keep_checkpoints": ">= 1"}

    def validate(self) -> TrainConfig:
        """Raise a one-line ConfigError naming the first bad field (ranges here; the trainer checks the rest)."""
        from modformer import registry
        from modformer.train import optim, schedule  # noqa: F401 (they register the optimizers and schedules)

        check_fields(self, "train")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must be <= train.lr ({self.lr})")
        if self.precision != "auto" and self.dtype not in ("auto", "bfloat16"):
            raise ConfigError(f"train.precision={self.precision} computes in bfloat16 but train.dtype={self.dtype}; "
                              "leave train.dtype auto (or bfloat16)")
        if self.early_stop_target is not None and not math.isfinite(self.early_stop_target):
            raise ConfigError(f"train.early_stop_target must be a finite number, got {self.early_stop_target}")
        registry.get("optimizer", self.optimizer, field="train.optimizer")
        registry.get("schedule", self.schedule, field="train.schedule")
        from modformer.train.pruning import parse_prune

        parse_prune(self.prune, self.steps)
        return self


@dataclass
class RunConfig:
    """A whole run: name, output folder and the three sections."""

    name: str = "run"
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> RunConfig:
        """Check every section's values and that ``name`` is one plain folder name (so it stays inside out_dir)."""
        check_plain_name(self.name, "name")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError(f"out_dir must be a folder path, got {self.out_dir!r}")
        self.model.validate(vocab_from_data=True)
        self.data.validate()
        self.train.validate()
        return self

    def check_run_dir(self) -> None:
        """ConfigError when ``out_dir/name`` cannot be a folder because it, or a folder above it, is a file."""
        for path in (self.run_dir, *self.run_dir.parents):
            if path.exists():
                if not path.is_dir():
                    raise ConfigError(f"cannot create the run folder {self.run_dir}: {path} is a file, not a "
                                      "folder; choose another out_dir= or name=")
                return

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert YAML/CLI values to the annotated type; error names the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):    # the first member that takes the value
            try:
                return coerce(value, inner, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, where) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):          # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            hint = suggest_key(str(key), prefix.rstrip("."), names)
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{hint}")
        kwargs[key] = coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML silently keeps the last one).

    Keys merged in with ``<<: *anchor`` may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:             # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def _yaml_error(e: yaml.YAMLError, where: str) -> ConfigError:
    """One line: ``where:LINE:COL: invalid YAML: problem``."""
    mark = getattr(e, "problem_mark", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    return ConfigError(f"{at}: invalid YAML: {problem}")


def parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML with ``StrictLoader`` (no code, no duplicate keys); errors name ``where``."""
    try:
        return yaml.load(text, Loader=StrictLoader)   # a SafeLoader: plain data only, never Python objects
    except yaml.YAMLError as e:
        raise _yaml_error(e, where) from None


def _parse_scalar(text: str, key: str = "value") -> Any:
    return parse_yaml(text, f"override {key}={text!r}") if text != "" else ""


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key of a nested config dict in dotted form (``train.lr``), sections included."""
    out = []
    for k, v in data.items():
        out.append(prefix + k)
        if isinstance(v, dict) and not k.endswith("options"):
            out += _dotted_keys(v, f"{prefix}{k}.")
    return out


def suggest_key(key: str, section: str, here: list[str], data: dict[str, Any] | None = None) -> str:
    """' (did you mean 'train.lr'?)': the closest key of ``section`` written in full, else (with ``data``, the
    whole config) the closest dotted key anywhere (``lr`` -> ``train.lr``); '' when nothing is close."""
    prefix = f"{section}." if section else ""
    last = key.rsplit(".", 1)[-1]
    hint = suggest(last, here)
    if hint:
        return hint.replace("mean '", f"mean '{prefix}", 1)
    if data is None:
        return ""
    everywhere = _dotted_keys(data)
    by_last = [k for k in everywhere if k.rsplit(".", 1)[-1] == last]
    return f" (did you mean {by_last[0]!r}?)" if len(by_last) == 1 else suggest(key, everywhere)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``section.key=value`` strings (YAML-parsed values) and return a new RunConfig."""
    data = asdict(cfg)                  # any config dataclass (RunConfig, the distill config, ...)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=3e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                here = list(node) if isinstance(node, dict) else []
                raise ConfigError(f"unknown config key {'.'.join(parts[:depth + 1])!r}"
                                  f"{suggest_key('.'.join(parts[:depth + 1]), '.'.join(parts[:depth]), here, data)}")
            node = node[part]
        last = parts[-1]
        is_options = len(parts) >= 2 and (parts[-2].endswith("options") or parts[-2] in ("student", "prune"))
        if not isinstance(node, dict) or (last not in node and not is_options):
            here = list(node) if isinstance(node, dict) else []
            hint = suggest_key(key.strip(), ".".join(parts[:-1]), here, data)
            raise ConfigError(f"unknown config key {key!r}{hint}")
        node[last] = _parse_scalar(text, key.strip())
    return from_dict(type(cfg), data)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file: {}); ConfigError when missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply overrides, validate every section (``RunConfig.validate``)."""
    cfg = from_dict(RunConfig, read_yaml_mapping(path))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg.validate()


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML atomically."""
    from modformer.utils import atomic_write_text

    data = asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))
