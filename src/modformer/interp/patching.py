"""Causal interventions through the hook points: activation, path and attribution patching.

Activation patching (Meng et al. 2022; Wang et al. 2022): run the model on a *corrupted* input, replace one
activation by its value on the *clean* input and read a metric of the logits. A component whose clean value
restores the clean metric carries the behaviour. Sites (``SITES``): per head ``z`` (the head's mixed values:
its whole output), ``q`` / ``k`` / ``v`` (per K/V head for gqa/mqa), ``pattern``; per layer ``resid_pre``,
``resid_mid``, ``attn_out``, ``mlp_out``, ``resid_post``. Results hold the *patched metric*:

    head sites   (L, H) all positions at once, or (L, T, H) one position at a time (pattern: destination)
    layer sites  (L,) or (L, T)

with NaN for heads a layer does not have (structured pruning leaves per-layer head counts). The same layout
as TransformerLens's ``patching.get_act_patch_*`` (tested against it), except that its pattern-by-position
result is (L, H, T).

Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023) asks whether head S acts on a later head R
*through R's query, key or value input* only: R's input is the corrupted residual plus S's clean-minus-
corrupted output, every other reader sees the corrupted stream (pre-norm blocks; exact, the layer's own
projection computes R's q/k/v from the patched input).

Attribution patching (Nanda 2023; Syed et al. 2023) is the first-order approximation
``m(corrupted) + (a_clean - a_corrupted) . dm/da`` from one forward and one backward pass; it is exact when the
metric is affine in the activation and agrees with activation patching to first order otherwise (tested).

``clean`` may be token ids or a cache ``{hook name: activation}`` (e.g. from ``model.run_with_cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Metric = Callable[[Tensor], Tensor]
HEAD_SITES = {"z": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
              "pattern": "attn.hook_pattern"}
LAYER_SITES = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
SITES = (*HEAD_SITES, *LAYER_SITES)


# ---- metrics -----------------------------------------------------------------------------------------

def logit_diff(answer: Tensor, wrong: Tensor, position: int = -1) -> Metric:
    """Mean over the batch of logit[answer] - logit[wrong] at ``position``; ``answer``/``wrong`` ``(B,)``."""
    def metric(logits: Tensor) -> Tensor:
        last = logits[:, position].float()
        a, w = answer[:, None].to(last.device), wrong[:, None].to(last.device)
        return (last.gather(-1, a) - last.gather(-1, w)).mean()
    return metric


def token_loss(targets: Tensor) -> Metric:
    """Mean next-token cross-entropy against ``targets`` ``(B, T)`` (-100 ignored)."""
    def metric(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().to(logits.device), ignore_index=-100)
    return metric


def target_logit(targets: Tensor) -> Metric:
    """Mean logit of the target token over the positions whose target is not -100 (a logit-difference-like
    metric for sequence tasks: linear in the logits)."""
    def metric(logits: Tensor) -> Tensor:
        t = targets.to(logits.device)
        keep = t != -100
        vals = logits.float().gather(-1, t.clamp_min(0)[..., None])[..., 0]
        return vals[keep].mean()
    return metric


def normalized(metric: Metric, clean_value: float, corrupted_value: float) -> Metric:
    """``(m - corrupted) / (clean - corrupted)``: 0 at the corrupted run, 1 when the clean behaviour is restored."""
    span = clean_value - corrupted_value
    if span == 0:
        raise ValueError("clean and corrupted runs give the same metric value: nothing to recover")
    return lambda logits: (metric(logits) - corrupted_value) / span


# ---- helpers -----------------------------------------------------------------------------------------

def _hook_name(site: str, layer: int) -> str:
    if site in HEAD_SITES:
        return f"blocks.{layer}.{HEAD_SITES[site]}"
    if site in LAYER_SITES:
        return f"blocks.{layer}.{LAYER_SITES[site]}"
    raise ValueError(f"unknown patching site {site!r}; allowed: {', '.join(SITES)}")


def _layers(model: nn.Module, site: str) -> list[int]:
    """Layers that have the site (``mlp_out`` / ``resid_mid``: blocks with an FFN)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks; patching expects a modformer decoder")
    if site in ("mlp_out", "resid_mid"):
        return [i for i, b in enumerate(blocks) if getattr(b, "mlp", None) is not None]
    return list(range(len(blocks)))


def _clean_cache(model: nn.Module, clean: Tensor | dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    if isinstance(clean, dict):
        missing = [n for n in names if n not in clean]
        if missing:
            raise ValueError(f"the clean cache has no {missing[0]!r}; cache it with model.run_with_cache")
        return clean
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=names)
    missing = [n for n in names if n not in cache]
    if missing:
        raise ValueError(f"the model exposes no {missing[0]!r} (this attention variant has no such hook point)")
    return cache


def _check_inputs(corrupted: Tensor, clean: Tensor | dict) -> None:
    if isinstance(clean, Tensor) and clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} inputs differ in shape")


def _setter(site: str, head: int | None, pos: int | None, clean_act: Tensor) -> Callable:
    """A hook replacing the selected slice of the activation by the clean one."""
    def hook(x: Tensor, _hook: object) -> Tensor:
        x = x.clone()
        if site in HEAD_SITES:
            if pos is None:
                x[:, head] = clean_act[:, head].to(x.dtype)
            else:
                x[:, head, pos] = clean_act[:, head, pos].to(x.dtype)
        elif pos is None:
            x[:] = clean_act.to(x.dtype)
        else:
            x[:, pos] = clean_act[:, pos].to(x.dtype)
        return x
    return hook


def _empty_result(model: nn.Module, site: str, T: int, by_position: bool, counts: dict[int, int]) -> Tensor:
    """NaN-filled result: ``(L, [T,] H)`` for head sites (H = the most heads of any layer), ``(L, [T])`` else."""
    L = len(model.blocks)
    shape: tuple[int, ...] = (L, T) if by_position else (L,)
    if site in HEAD_SITES:
        shape = (*shape, max(counts.values(), default=1))
    return torch.full(shape, float("nan"))


# ---- activation patching -------------------------------------------------------------------------------

@torch.no_grad()
def activation_patching(model: nn.Module, corrupted: Tensor, clean: Tensor | dict[str, Tensor], metric: Metric,
                        site: str = "z", by_position: bool = False) -> Tensor:
    """The metric of the corrupted run with one clean activation patched in, for every head / layer
    (and position): shapes in the module docstring; NaN where a layer lacks the site or head."""
    _check_inputs(corrupted, clean)
    was_training = model.training
    model.eval()
    layers = _layers(model, site)
    names = [_hook_name(site, i) for i in layers]
    T = corrupted.shape[1]
    if not layers:                                   # e.g. mlp_out in an attention-only model
        return _empty_result(model, site, T, by_position, {})
    cache = _clean_cache(model, clean, names)
    counts = {i: cache[_hook_name(site, i)].shape[1] for i in layers} if site in HEAD_SITES else {}
    out = _empty_result(model, site, T, by_position, counts)
    try:
        for i in layers:
            name = _hook_name(site, i)
            clean_act = cache[name]
            heads = range(counts[i]) if site in HEAD_SITES else [None]
            positions = range(T) if by_position else [None]
            for h in heads:
                for p in positions:
                    value = float(metric(model.run_with_hooks(corrupted, [(name, _setter(site, h, p, clean_act))])))
                    index = (i,) + ((p,) if p is not None else ()) + ((h,) if h is not None else ())
                    out[index] = value
    finally:
        model.train(was_training)
    return out


# ---- attribution patching ------------------------------------------------------------------------------

def attribution_patching(model: nn.Module, corrupted: Tensor, clean: Tensor | dict[str, Tensor], metric: Metric,
                         site: str = "z", by_position: bool = False) -> Tensor:
    """First-order estimate of ``activation_patching`` (same shape and meaning) from one forward and one
    backward pass on the corrupted input: ``m(corrupted) + sum (a_clean - a_corrupted) * dm/da`` over the
    patched slice. Gradients are total derivatives (through every later component)."""
    _check_inputs(corrupted, clean)
    was_training = model.training
    model.eval()
    layers = _layers(model, site)
    names = [_hook_name(site, i) for i in layers]
    if not layers:
        return _empty_result(model, site, corrupted.shape[1], by_position, {})
    cache = _clean_cache(model, clean, names)
    acts: dict[str, Tensor] = {}
    probes: dict[str, Tensor] = {}

    def probe(x: Tensor, hook: object) -> Tensor:
        # x + 0 through a zero leaf: its gradient is dm/dx with every downstream path intact
        zero = torch.zeros_like(x, requires_grad=True)
        probes[hook.name], acts[hook.name] = zero, x.detach()
        return x + zero

    try:
        with torch.enable_grad():
            value = metric(model.run_with_hooks(corrupted, [(lambda n: n in set(names), probe)]))
            grads = torch.autograd.grad(value, [probes[n] for n in names], allow_unused=True)
        value = value.detach()
    finally:
        model.train(was_training)
    T = corrupted.shape[1]
    counts = {i: cache[_hook_name(site, i)].shape[1] for i in layers} if site in HEAD_SITES else {}
    out = _empty_result(model, site, T, by_position, counts)
    for i, name, g in zip(layers, names, grads):
        delta = (cache[name].to(acts[name].dtype) - acts[name])
        prod = delta * g if g is not None else torch.zeros_like(delta)
        prod = prod.double()
        if site in HEAD_SITES:                       # (B, H, T, ...) -> (T, H) or (H,)
            per = prod.flatten(3).sum(-1).sum(0)     # (H, T)
            est = per.T if by_position else per.sum(-1)
            if by_position:
                out[i, :, : counts[i]] = (float(value) + est).float().cpu()
            else:
                out[i, : counts[i]] = (float(value) + est).float().cpu()
        else:                                        # (B, T, D)
            per = prod.sum((0, 2))                   # (T,)
            out[i] = (float(value) + (per if by_position else per.sum())).float().cpu()
    return out


# ---- path patching ---------------------------------------------------------------------------------------

def _check_path_model(model: nn.Module, receiver_layer: int, component: str) -> None:
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "norm_placement", "pre") != "pre" or getattr(cfg, "model_options", {}).get("denseformer"):
        raise ValueError("path patching needs pre-norm blocks without DenseFormer averaging (per-head outputs "
                         "must add into the residual stream)")
    if component not in ("q", "k", "v"):
        raise ValueError(f"path patching component must be q, k or v, got {component!r}")
    attn = model.blocks[receiver_layer].attn
    if component in ("k", "v") and getattr(attn, "n_kv_heads", None) != getattr(attn, "n_head", None):
        raise ValueError("k/v path patching needs one K/V head per query head (mha); gqa/mqa share them")


@torch.no_grad()
def path_patching(model: nn.Module, corrupted: Tensor, clean: Tensor, metric: Metric,
                  receiver: tuple[int, int], component: str = "k",
                  senders: list[tuple[int, int]] | None = None) -> Tensor:
    """Metric after patching the clean output of each sender head into the ``component`` (q | k | v) input of
    the ``receiver`` head (layer, head) only. Returns ``(L, H)`` over senders (every head of an earlier layer
    by default), NaN elsewhere. Senders are measured one at a time."""
    _check_inputs(corrupted, clean)
    rl, rh = receiver
    _check_path_model(model, rl, component)
    was_training = model.training
    model.eval()
    L = len(model.blocks)
    counts = [b.attn.n_head for b in model.blocks]
    if senders is None:
        senders = [(sl, sh) for sl in range(rl) for sh in range(counts[sl])]
    bad = [s for s in senders if not (0 <= s[0] < rl and 0 <= s[1] < counts[s[0]])]
    if bad or not senders:
        raise ValueError(f"sender {bad[0] if bad else None} is not a head of a layer before the receiver's layer {rl}")
    if not 0 <= rh < counts[rl]:
        raise ValueError(f"receiver {receiver}: layer {rl} has {counts[rl]} heads")
    results = sorted({f"blocks.{sl}.attn.hook_result" for sl, _ in senders})
    pre, comp = f"blocks.{rl}.hook_resid_pre", f"blocks.{rl}.attn.hook_{component}"
    try:
        _, clean_cache = model.run_with_cache(clean, names_filter=results)
        _, corr_cache = model.run_with_cache(corrupted, names_filter=[*results, pre])
        out = torch.full((L, max(counts)), float("nan"))
        for sl, sh in senders:
            name = f"blocks.{sl}.attn.hook_result"
            delta = clean_cache[name][:, :, sh] - corr_cache[name][:, :, sh]          # (B, T, D)
            gate = getattr(model.blocks[sl], "gate_attn", None)
            if gate is not None:
                delta = delta * gate
            patched_input = corr_cache[pre] + delta
            # the receiver layer's own projection of the patched input (positions, norms, RoPE included)
            new = _run_with_input(model, corrupted, pre, patched_input, comp)[:, rh]

            def put(x: Tensor, _hook: object, new: Tensor = new) -> Tensor:
                x = x.clone()
                x[:, rh] = new.to(x.dtype)
                return x

            out[sl, sh] = float(metric(model.run_with_hooks(corrupted, [(comp, put)])))
    finally:
        model.train(was_training)
    return out


def _run_with_input(model: nn.Module, idx: Tensor, at: str, value: Tensor, read: str) -> Tensor:
    """Forward with activation ``at`` replaced by ``value``; returns the activation at ``read``."""
    got: dict[str, Tensor] = {}

    def save(x: Tensor, _hook: object) -> None:
        got["x"] = x.detach()

    with model.hooks([(at, lambda x, _h: value.to(x.dtype)), (read, save)]):
        model(idx)
    return got["x"]


# ---- plots -----------------------------------------------------------------------------------------------

def plot_patching(result: Tensor, path: str | Path, title: str = "activation patching",
                  xlabel: str | None = None, ylabel: str = "layer", center: float | None = None) -> Path:
    """Heatmap of a patching result: ``(L, H)`` heads, ``(L, T)`` positions, ``(L,)`` layers or ``(L, T, H)``
    (one panel per head). NaN cells (absent heads) are blank; ``center`` puts that value at the colormap's
    middle (e.g. the corrupted metric)."""
    from modformer.interp.viz import _plt, _save

    plt = _plt()
    r = result.detach().float().cpu()
    if r.dim() == 1:
        r = r[:, None]
    panels = [r] if r.dim() == 2 else [r[..., h] for h in range(r.shape[-1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 2.6 * len(panels), 2.4 + 0.3 * r.shape[0]),
                             squeeze=False)
    finite = r[torch.isfinite(r)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    if center is not None:
        half = max(abs(hi - center), abs(center - lo), 1e-12)
        lo, hi = center - half, center + half
    for k, (ax, panel) in enumerate(zip(axes[0], panels)):
        im = ax.imshow(panel.numpy(), cmap="RdBu_r" if center is not None else "viridis", vmin=lo, vmax=hi,
                       aspect="auto", interpolation="nearest")
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel or ("head" if r.dim() == 2 and len(panels) == 1 else "position"))
        if len(panels) > 1:
            ax.set_title(f"head {k}")
    fig.colorbar(im, ax=axes[0].tolist())
    fig.suptitle(title)
    return _save(fig, path)
