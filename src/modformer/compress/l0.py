"""Learned L0 head gates with the hard-concrete distribution (Louizos et al. 2018; Voita et al. 2019).

Each attention head h gets a stochastic gate z_h in [0, 1] that multiplies its output
(``blocks.i.attn.hook_z``, through ``importance.masked``). The gate is a stretched and clipped
binary-concrete variable with a learned location ``log_alpha``:

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = min(1, max(0, s (zeta - gamma) + gamma))          (gamma < 0 < 1 < zeta)

so z is exactly 0 or 1 with non-zero probability and differentiable in ``log_alpha`` in between.
The expected L0 norm (number of open gates) has a closed form,

    E[||z||_0] = sum_h P(z_h != 0) = sum_h sigmoid(log_alpha_h - beta log(-gamma / zeta)),

and training minimises ``task loss + lambda * E[L0]`` (Voita et al. train the gates with the model
frozen; ``joint=True`` also trains the model). At test time the gate is deterministic:
``z = clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``. Heads whose deterministic gate is 0
are *closed*; ``prune_closed_heads`` removes them physically with ``structured.remove_heads`` and
(``fold=True``) scales the out-projection columns of the open heads by their gate value, so the
smaller model gives exactly the outputs of the gated one. ``log_alpha`` doubles as an importance
score (``head_importance(..., "l0")``), so ``modformer prune --method heads --importance l0`` ranks
heads by it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from modformer.compress.importance import batch_loss, head_counts, masked

GAMMA, ZETA, BETA = -0.1, 1.1, 2.0 / 3.0     # Louizos et al.'s stretch interval and temperature


class HardConcreteGates(nn.Module):
    """One hard-concrete gate per head of each layer (``sizes[i]`` heads in layer i)."""

    def __init__(self, sizes: list[int], init_log_alpha: float = 2.0, beta: float = BETA, gamma: float = GAMMA,
                 zeta: float = ZETA) -> None:
        super().__init__()
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError(f"need gamma < 0 < 1 < zeta and beta > 0, got {gamma}, {zeta}, {beta}")
        self.log_alpha = nn.ParameterList([nn.Parameter(torch.full((n,), float(init_log_alpha))) for n in sizes])
        self.beta, self.gamma, self.zeta = beta, gamma, zeta

    def sample(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """One reparametrised sample of every gate (differentiable in ``log_alpha``), each in [0, 1]."""
        out = []
        for la in self.log_alpha:
            u = torch.rand(la.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(la)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
            out.append((s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0))
        return out

    def deterministic(self) -> list[Tensor]:
        """Test-time gates: clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)."""
        return [(torch.sigmoid(la) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0) for la in self.log_alpha]

    def prob_open(self) -> list[Tensor]:
        """P(z != 0) per gate: sigmoid(log_alpha - beta log(-gamma / zeta))."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return [torch.sigmoid(la - shift) for la in self.log_alpha]

    def expected_l0(self) -> Tensor:
        """The expected number of open gates (the differentiable L0 penalty)."""
        return torch.stack([p.sum() for p in self.prob_open()]).sum()

    def closed(self) -> dict[int, list[int]]:
        """Heads whose deterministic gate is exactly 0, as ``{layer: [head, ...]}``."""
        return {i: torch.nonzero(z == 0).flatten().tolist() for i, z in enumerate(self.deterministic())}


def train_head_gates(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], steps: int = 300,
                     lam: float = 0.05, lr: float = 0.05, joint: bool = False, model_lr: float = 1e-4,
                     init_log_alpha: float = 2.0, seed: int = 0) -> tuple[HardConcreteGates, list[dict]]:
    """Train one gate per head on ``batches`` (cycled) with loss = CE + ``lam`` * E[L0].

    The model is frozen (Voita et al.) unless ``joint``, which also trains its parameters in place at
    ``model_lr``. Dropout is off (the model runs in eval mode). Returns the gates and a log of
    (step, loss, expected L0, closed heads) every 50 steps and at the end.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("no batches to train the gates on")
    gates = HardConcreteGates(head_counts(model), init_log_alpha).to(next(model.parameters()).device)
    g = torch.Generator().manual_seed(seed)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    params: list[dict] = [{"params": list(gates.parameters()), "lr": lr}]
    if joint:
        params.append({"params": [p for p, f in flags if f], "lr": model_lr})
    else:
        for p, _ in flags:
            p.requires_grad_(False)
    opt = torch.optim.Adam(params)
    was_training = model.training
    model.eval()
    log: list[dict] = []
    try:
        for step in range(1, steps + 1):
            x, y = batches[(step - 1) % len(batches)]
            with masked(model, heads=gates.sample(g)):
                task = batch_loss(model, x, y)
            penalty = gates.expected_l0()
            loss = task + lam * penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps:
                log.append({"step": step, "task_loss": float(task.detach()), "expected_l0": float(penalty.detach()),
                            "closed": sum(len(v) for v in gates.closed().values())})
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
    return gates, log


def gate_scores(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], **options: object) -> list[Tensor]:
    """Head importance = trained ``log_alpha`` (higher = more open); ``options`` go to ``train_head_gates``."""
    gates, _ = train_head_gates(model, batches, **options)
    return [la.detach().clone() for la in gates.log_alpha]


@torch.no_grad()
def prune_closed_heads(model: nn.Module, gates: HardConcreteGates, fold: bool = True) -> nn.Module:
    """A physically smaller copy of ``model`` without the heads whose deterministic gate is 0.

    With ``fold`` the open heads' out-projection columns are multiplied by their gate values first,
    so the result equals the gated model (``masked(model, heads=gates.deterministic())``) exactly.
    Every layer keeps at least one head (its most open one) as ``remove_heads`` requires.
    """
    from modformer.compress.structured import remove_heads

    zs = gates.deterministic()
    remove: dict[int, list[int]] = {}
    for i, z in enumerate(zs):
        closed = torch.nonzero(z == 0).flatten().tolist()
        if len(closed) == len(z):
            closed.remove(int(gates.log_alpha[i].argmax()))
        remove[i] = closed
    source = model
    if fold:
        import copy

        source = copy.deepcopy(model)
        for block, z in zip(source.blocks, zs):
            dh = block.attn.head_dim
            block.attn.out.weight.mul_(z.repeat_interleave(dh).to(block.attn.out.weight))
    return remove_heads(source, remove)
