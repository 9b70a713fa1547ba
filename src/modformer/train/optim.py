"""Optimizers (registry kind ``optimizer``) with decay / no-decay parameter groups; ``muon`` pairs
torch's Muon (hidden matrices) with AdamW (the rest).

Weight decay applies to matrices (``dim >= 2``) except embeddings unless
``train.decay_embeddings``; biases, norm weights and residual gates are never decayed.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from modformer.config import TrainConfig
from modformer.registry import ConfigError, register


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """Two groups: decayed matrices and everything else (tied weights appear once)."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embed_ids
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_ok(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cuda"


def _adamw_extra(model: nn.Module, cfg: TrainConfig) -> dict[str, bool]:
    """Fused AdamW on CUDA; ``capturable`` (its step count and learning rate read on the device) for
    ``train.cuda_graph``, whose captured step replays the optimizer."""
    extra = {"fused": True} if _fused_ok(model) and "fused" in inspect.signature(torch.optim.AdamW).parameters \
        else {}
    return {**extra, "capturable": True} if cfg.cuda_graph else extra


@register("optimizer", "adamw")
def adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **_adamw_extra(model, cfg))


@register("optimizer", "adam")
def adam(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam with L2-coupled decay (the original grokking paper compares it with AdamW)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


@register("optimizer", "sgd")
def sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.betas[0], nesterov=cfg.betas[0] > 0)


class MuonAdamW:
    """Muon (momentum orthogonalised by Newton-Schulz) for hidden weight matrices, AdamW for the rest.

    Muon is meant for the 2-D weights of hidden layers only; embeddings, the output layer (tied or not),
    biases and norm gains go to AdamW, as in the Muon recipe. Both share the schedule's learning rate:
    Muon's ``adjust_lr_fn="match_rms_adamw"`` scales its update to AdamW's RMS (Moonshot's rule).
    Presents the ``torch.optim.Optimizer`` surface the trainer uses (param_groups, step, zero_grad,
    state_dict / load_state_dict)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden 2-D weight matrices, everything else): embeddings and the output layer are not hidden."""
    outer = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        outer.add(id(head.weight))
    hidden, rest, seen = [], [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (hidden if p.dim() == 2 and id(p) not in outer else rest).append(p)
    return hidden, rest


@register("optimizer", "muon")
def muon(model: nn.Module, cfg: TrainConfig) -> MuonAdamW:
    """Muon for hidden matrices + AdamW for the rest (``train.betas``); Muon's momentum is
    ``train.optimizer_options.muon_momentum`` (default 0.95, Nesterov). ``optimizer_options.muon_grouped: true``
    uses ``GroupedMuon`` (``train/muon.py``): torch's Muon with the Newton–Schulz iteration batched over same-shape
    matrices, 218 instead of 698 aten ops per Muon step on the speedrun config. Off by default; the speedrun config
    sets it (faster to val 1.47 on an H100 in 5 of 5 runs, docs/studies/lm_recipes.md); on the 2-core CPU, where the
    step is compute-bound, it is not faster."""
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"train.optimizer=muon needs torch.optim.Muon (PyTorch >= 2.9), not {torch.__version__}")
    hidden, rest = muon_split(model)
    keep = {id(p) for p in rest}
    groups = [{**g, "params": [p for p in g["params"] if id(p) in keep]}
              for g in param_groups(model, cfg.weight_decay, cfg.decay_embeddings)]
    momentum = float(cfg.optimizer_options.get("muon_momentum", 0.95))
    grouped = cfg.optimizer_options.get("muon_grouped", False)
    if not isinstance(grouped, bool):
        raise ConfigError(f"train.optimizer_options.muon_grouped must be true or false, got {grouped!r}")
    from modformer.train.muon import GroupedMuon  # subclasses torch.optim.Muon: import only where it exists

    muon_cls = GroupedMuon if grouped else torch.optim.Muon
    return MuonAdamW(muon_cls(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=momentum,
                              adjust_lr_fn="match_rms_adamw"),
                     torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                                       eps=cfg.eps, **_adamw_extra(model, cfg)))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    from modformer import registry

    try:
        return registry.get("optimizer", cfg.optimizer, field="train.optimizer")(model, cfg)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"train: invalid optimizer settings: {e}") from e
