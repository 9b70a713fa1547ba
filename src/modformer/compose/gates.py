"""PHATGOOSE (Muqeeth et al. 2024): per-module sigmoid gates trained with frozen experts, top-k token routing.

Experts are deltas on a shared frozen base, one per target ``nn.Linear``: LoRA adapters trained with HF
PEFT (``lora_deltas``) or full fine-tunes of the target weights (``full_deltas``). ``attach_experts``
replaces each target Linear of a copy of the base by an ``ExpertLinear`` holding every expert's delta
(frozen buffers) and one trainable gate vector per expert. Its ``mode``:

- ``base``: the base alone; ``expert``: base + expert j (the oracle when j is the input's task);
- ``gated``: base + sigmoid(x . g_j) * delta_j(x): how gate j is trained, with expert j frozen, on
  expert j's own data (``train_gates(..., joint=False)``: each gate knows nothing of the others);
- ``route``: PHATGOOSE inference: standardise the activation and each gate (zero mean, unit variance),
  scores s_j = x_hat . g_hat_j / sqrt(d), softmax over the top-k scores (k=2 default):
  base(x) + sum_j w_j delta_j(x). ``routing`` picks how many experts a token gets: ``top_k`` (the paper's
  fixed k), ``top_p`` (the fewest experts whose softmax probability reaches ``top_p``) or ``threshold`` (every
  expert of probability >= ``threshold``): the last two vary the number per token (``compose/routing.py``).
  ``granularity="prefix"`` scores each token by the causal running
  mean of the standardised activations instead (a variant: early layers see the task tag, not only
  the current token; padding named by the model call's ``attention_mask`` is left out of the mean).
  ``train_gates(..., joint=True)`` trains all gates together in this mode, on
  the union of the experts' data (the gates then "know the others exist").
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modformer.compose.routing import ROUTINGS, check_threshold, check_top_p, route_softmax, standardize

Delta = dict[str, Tensor]      # {"down": (r, in), "up": (out, r)[, "bias": (out,)]}


class ExpertLinear(nn.Module):
    """A frozen base Linear plus E frozen low-rank expert deltas and E trainable gate vectors."""

    def __init__(self, base: nn.Linear, deltas: Sequence[Delta], top_k: int = 2, granularity: str = "token",
                 temperature: float = 1.0, gate_init_std: float = 0.01, routing: str = "top_k",
                 top_p: float | None = None, threshold: float | None = None) -> None:
        super().__init__()
        if granularity not in ("token", "prefix"):
            raise ValueError(f"granularity must be 'token' or 'prefix', got {granularity!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        rank = max(d["down"].shape[0] for d in deltas)

        def pad(t: Tensor, dim: int) -> Tensor:       # experts of different ranks share one stacked tensor
            shape = list(t.shape)
            shape[dim] = rank - shape[dim]
            return torch.cat([t, t.new_zeros(shape)], dim)

        self.register_buffer("down", torch.stack([pad(d["down"].detach().float(), 0) for d in deltas]))  # (E, r, in)
        self.register_buffer("up", torch.stack([pad(d["up"].detach().float(), 1) for d in deltas]))      # (E, out, r)
        bias = [d.get("bias") for d in deltas]
        self.register_buffer("bias", torch.stack([b.detach().float() if b is not None else
                                                  torch.zeros(base.out_features) for b in bias]))     # (E, out)
        self.gates = nn.ParameterList(nn.Parameter(torch.randn(base.in_features) * gate_init_std)
                                      for _ in deltas)
        self.n_experts, self.top_k, self.granularity, self.temperature = len(deltas), top_k, granularity, temperature
        self.routing, self.top_p, self.threshold = routing, top_p, threshold
        self.check_routing()
        self.mode, self.expert = "route", 0
        self.record = False
        self.last_top: Tensor | None = None     # (..., k) chosen experts of the last routed call (when record)
        self.last_weights: Tensor | None = None  # (..., E) routing weights of the last routed call (when record)
        self.token_valid: Tensor | None = None  # (B, T) attention_mask of the model's current call (prefix mode)

    def check_routing(self) -> None:
        """ValueError (one line, naming the setting) unless ``routing`` and its parameter are valid."""
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.routing == "top_p":
            if self.top_p is None:
                raise ValueError("routing 'top_p' needs top_p (a number in (0, 1])")
            check_top_p(self.top_p, "top_p")
        if self.routing == "threshold":
            if self.threshold is None:
                raise ValueError("routing 'threshold' needs threshold (a number in [0, 1])")
            check_threshold(self.threshold, "threshold")

    def weights(self, s: Tensor) -> Tensor:
        """Routing weights (..., E) of scores s by the module's ``routing``."""
        return route_softmax(s / self.temperature, self.routing, self.top_k, self.top_p, self.threshold)

    def delta(self, x: Tensor, j: int) -> Tensor:
        """delta_j(x) (..., out)."""
        return (x @ self.down[j].T) @ self.up[j].T + self.bias[j]

    def scores(self, x: Tensor) -> Tensor:
        """Routing scores (..., E) of activations x (..., T, in)."""
        xs = standardize(x.float())
        if self.granularity == "prefix":
            valid = self.token_valid
            if valid is not None and x.dim() == 3 and valid.shape == x.shape[:2]:   # padding stays out of the mean
                v = valid.to(xs.dtype)[..., None]
                xs = (xs * v).cumsum(-2) / v.cumsum(-2).clamp_min(1)
            else:
                steps = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=xs.dtype)[:, None]
                xs = xs.cumsum(-2) / steps
        g = standardize(torch.stack(list(self.gates)))                           # (E, in)
        return xs @ g.T / math.sqrt(x.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.mode == "base":
            return out
        if self.mode == "expert":
            return out + self.delta(x, self.expert).to(out.dtype)
        if self.mode == "gated":
            gate = torch.sigmoid(x.float() @ self.gates[self.expert])[..., None]
            return out + (gate * self.delta(x, self.expert)).to(out.dtype)
        s = self.scores(x)                                                        # (..., E)
        w = self.weights(s)                                                       # (..., E)
        if self.record:
            k = min(self.top_k, self.n_experts) if self.routing == "top_k" else self.n_experts
            self.last_top = s.topk(k, -1).indices.detach()
            self.last_weights = w.detach()
        h = torch.einsum("...i,eri->...er", x.float(), self.down)                 # (..., E, r)
        o = torch.einsum("...er,eor->...eo", h, self.up) + self.bias              # (..., E, out)
        return out + (w[..., None] * o).sum(-2).to(out.dtype)


def expert_linears(model: nn.Module) -> dict[str, ExpertLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinear)}


def lora_deltas(peft_model: Any, adapter: str | None = None) -> dict[str, Delta]:
    """{module path in the base model: delta} of a PEFT LoRA adapter (scaling folded into ``up``)."""
    adapter = adapter or peft_model.active_adapter
    out = {}
    for name, mod in peft_model.named_modules():
        a = getattr(mod, "lora_A", None)
        if a is None or adapter not in a:
            continue
        path = name.removeprefix("base_model.model.")
        out[path] = {"down": a[adapter].weight.detach().clone(),
                     "up": mod.lora_B[adapter].weight.detach().clone() * mod.scaling[adapter]}
    if not out:
        raise ValueError(f"no LoRA adapter {adapter!r} in the model")
    return out


def full_deltas(base: nn.Module, expert: nn.Module, targets: Sequence[str]) -> dict[str, Delta]:
    """{path: delta} of a fully fine-tuned expert: W_e - W_base (as down, with up = I) and b_e - b_base."""
    out = {}
    ex = dict(expert.named_modules())
    for name, mod in base.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            e = ex[name]
            d: Delta = {"down": (e.weight - mod.weight).detach().clone(), "up": torch.eye(mod.out_features)}
            if mod.bias is not None:
                d["bias"] = (e.bias - mod.bias).detach().clone()
            out[name] = d
    return out


def attach_experts(base: nn.Module, experts: Sequence[dict[str, Delta]], top_k: int = 2,
                   granularity: str = "token", temperature: float = 1.0, seed: int = 0, routing: str = "top_k",
                   top_p: float | None = None, threshold: float | None = None) -> nn.Module:
    """A copy of ``base`` whose target Linears (those every expert changes) are ``ExpertLinear``s.

    Everything but the gates is frozen. ``routing`` / ``top_p`` / ``threshold``: see ``ExpertLinear``.
    """
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    paths = set(experts[0])
    for e in experts[1:]:
        paths &= set(e)
    if not paths:
        raise ValueError("the experts share no target module")
    torch.manual_seed(seed)
    for path in sorted(paths):
        lin = model.get_submodule(path)
        model.set_submodule(path, ExpertLinear(lin, [e[path] for e in experts], top_k, granularity, temperature,
                                               routing=routing, top_p=top_p, threshold=threshold))
    model.register_forward_pre_hook(_share_attention_mask, with_kwargs=True)
    return model


def _share_attention_mask(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Give every ExpertLinear the call's ``attention_mask`` (or None): prefix routing then averages over the
    real tokens only, so a left-padded row routes as it would alone."""
    mask = kwargs.get("attention_mask")
    for m in expert_linears(model).values():
        m.token_valid = mask


def set_mode(model: nn.Module, mode: str, expert: int = 0, **settings: Any) -> None:
    """Set every ExpertLinear's mode (base | expert | gated | route), expert index and e.g. top_k, or
    ``routing="top_p", top_p=0.9`` (checked: a bad routing setting raises ValueError)."""
    if mode not in ("base", "expert", "gated", "route"):
        raise ValueError(f"unknown mode {mode!r}")
    for m in expert_linears(model).values():
        m.mode, m.expert = mode, expert
        for key, value in settings.items():
            setattr(m, key, value)
        if {"routing", "top_p", "threshold"} & set(settings):
            m.check_routing()


def gate_parameters(model: nn.Module, expert: int | None = None) -> list[nn.Parameter]:
    """Gate vectors of one expert (or all) across modules."""
    return [p for m in expert_linears(model).values()
            for j, p in enumerate(m.gates) if expert is None or j == expert]


def train_gates(model: nn.Module, datasets: Sequence[Any], train_cfg: Any, steps: int, lr: float,
                joint: bool = False, mixture: Any = None, seed: int = 0) -> list[float]:
    """PHATGOOSE gate training; everything but the gates stays frozen (bit-identical).

    Independent (default): for each expert j, ``steps`` steps of gate j alone in ``gated`` mode on
    ``datasets[j]``. Joint: ``len(datasets) * steps`` steps of all gates together in ``route`` mode on
    ``mixture`` (the union of the experts' data), routing over at least the top 2 while training: a
    softmax over one score is 1 and would give the gates no gradient (top-k routing while training, whatever
    the modules' ``routing``; it is restored afterwards). Returns the losses.
    """
    from modformer.compress.finetune import finetune

    cfg = dataclasses.replace(train_cfg, weight_decay=0.0, label_smoothing=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    losses: list[float] = []
    if joint:
        for p in gate_parameters(model):
            p.requires_grad_(True)
        top_k = {m: (m.top_k, m.routing) for m in expert_linears(model).values()}
        set_mode(model, "route")
        for m, (k, _) in top_k.items():
            m.top_k, m.routing = max(k, 2), "top_k"
        try:
            losses += finetune(model, mixture, cfg, steps * len(datasets), lr=lr, seed=seed)
        finally:                                   # the inference routing survives a failed training run
            for m, (k, routing) in top_k.items():
                m.top_k, m.routing = k, routing
    else:
        for j, data in enumerate(datasets):
            for p in gate_parameters(model):
                p.requires_grad_(False)
            for p in gate_parameters(model, j):
                p.requires_grad_(True)
            set_mode(model, "gated", j)
            losses += finetune(model, data, cfg, steps, lr=lr, seed=seed + j)
    for p in gate_parameters(model):
        p.requires_grad_(False)
    set_mode(model, "route")
    return losses


@torch.no_grad()
def routing_accuracy(model: nn.Module, x: Tensor, expert_of_row: Tensor) -> dict[str, float]:
    """Share of (token, module) routing decisions whose top-1 (and top-k: the experts used) holds the row's true
    expert, and ``experts_used``: the mean number of experts per (token, module) (top-p / threshold vary it).

    ``x`` (B, T) inputs of known origin, ``expert_of_row`` (B,) their expert index.
    """
    mods = expert_linears(model)
    for m in mods.values():
        m.record = True
    try:
        model.eval()
        model(x)
        top1, topk, used = [], [], []
        for m in mods.values():
            if m.last_top is None or m.last_weights is None:
                raise ValueError("routing_accuracy needs the model in route mode")
            want = expert_of_row.to(m.last_top.device)[:, None]
            top1.append((m.last_top[..., 0] == want).float().mean())
            if m.routing == "top_k":
                topk.append((m.last_top == want[..., None]).any(-1).float().mean())
            else:                                  # the experts with a nonzero weight
                w = m.last_weights.gather(-1, want[..., None].expand(*m.last_weights.shape[:-1], 1))
                topk.append((w[..., 0] != 0).float().mean())
            used.append((m.last_weights != 0).sum(-1).double().mean())
    finally:
        for m in mods.values():
            m.record, m.last_top, m.last_weights = False, None, None
    return {"routing_top1": float(torch.stack(top1).mean()), "routing_topk": float(torch.stack(topk).mean()),
            "experts_used": float(torch.stack(used).mean())}
