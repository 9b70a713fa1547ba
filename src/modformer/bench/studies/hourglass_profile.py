"""Where an hourglass training step spends its time: forward + backward of each component, measured alone.

The components of a one-level hourglass (``models/hourglass.py``): token layers before shortening (encoder),
compression (``shorten``), the latent stack, upsampling (repeat + skip add), token layers after upsampling
(decoder), and the LM head + loss. Each runs forward and backward on the inputs it received in one real
forward pass (captured by hooks), eager, under the trainer's autocast, in training mode. On CUDA each is timed
twice: GPU kernel time from ``torch.profiler`` (``bench.common.kernel_time``: what the device did) and wall time
(``time_fn``: kernels plus launch overhead); the whole model's forward + backward is timed the same way, and
its excess over the components' sum is ``other`` (embedding, dropout, position tables, glue). On the CPU both
figures are wall time. ``layers`` times one token layer of each kind (local, global) of the encoder alone, on
its own input: where the local layers' cost goes against a global one's (not part of the components' sum).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modformer.bench.common import kernel_time, time_fn
from modformer.layers.shorten import upsample_add


def _fwd_bwd(f: Callable[..., Tensor], inputs: list[Tensor]) -> Callable[[], None]:
    """One forward + backward of ``f`` on fresh leaves of ``inputs`` with a fixed random output gradient."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.no_grad():
        shape, dtype = f(*leaves).shape, f(*leaves).dtype
    grad = torch.randn(shape, dtype=dtype, device=inputs[0].device)

    def step() -> None:
        out = f(*leaves)
        if out.dim() == 0:
            out.backward()
        else:
            out.backward(grad)
        for leaf in leaves:
            leaf.grad = None

    return step


def _measure(fn: Callable[[], None], device: torch.device, iters: int) -> dict[str, float]:
    """Milliseconds per call: kernel (CUDA profiler; CPU: wall) and wall."""
    wall = time_fn(fn, device, warmup=3, iters=iters) * 1e3
    kernel = kernel_time(fn, warmup=2, iters=iters) * 1e3 if device.type == "cuda" else wall
    return {"kernel_ms": kernel, "wall_ms": wall}


Parts = dict[str, tuple[Callable[..., Tensor], list[Tensor]]]


def parts(model: nn.Module, idx: Tensor, targets: Tensor,
          autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[Parts, Parts]:
    """(layers, components) of a one-level hourglass as ``name -> (f, inputs)``, ``inputs`` captured (detached)
    by hooks in one forward of ``idx`` in the model's current mode: ``f(*inputs)`` recomputes that part's output.
    Components, in order: token_layers_before, compression, latent_stack, upsampling, token_layers_after,
    head_and_loss; layers: the encoder's first ``local_layer`` and ``global_layer`` (those it has)."""
    if model.opts.levels != 1:
        raise ValueError("the component split takes a one-level hourglass")
    g, k = model.opts.group_len[0], model.opts.n_latents[0]
    caught: dict[str, Any] = {}

    def keep_input(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            caught[name] = ([a.detach() if isinstance(a, Tensor) else a for a in args], kwargs)
        return hook

    def keep_output(name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Tensor) -> None:
            caught[name] = out.detach()
        return hook

    enc = model.encoders[0]
    first_of = {kind: enc.blocks[enc.kinds.index(kind)] for kind in ("local", "global") if kind in enc.kinds}
    handles = [block.register_forward_pre_hook(keep_input(f"{kind}_layer"), with_kwargs=True)
               for kind, block in first_of.items()]
    handles += [model.encoders[0].register_forward_pre_hook(keep_input("encoder"), with_kwargs=True),
               model.shorten[0].register_forward_pre_hook(keep_input("shorten"), with_kwargs=True),
               model.hook_latent_in.register_forward_pre_hook(keep_input("latent"), with_kwargs=True),
               model.decoders[0].register_forward_pre_hook(keep_input("decoder"), with_kwargs=True),
               model.encoders[0].register_forward_hook(keep_output("skip")),
               model.hook_latent_out.register_forward_hook(keep_output("latent_out")),
               model.decoders[0].register_forward_hook(keep_output("decoder_out"))]
    try:
        with autocast(), torch.no_grad():
            model.loss(idx, targets)
    finally:
        for h in handles:
            h.remove()

    def stage(name: str, module: nn.Module) -> Callable[[Tensor], Tensor]:
        args, kwargs = caught[name]
        return lambda x: module(x, *args[1:], **kwargs)

    sh_args = caught["shorten"][0]
    lat_x = caught["latent"][0][0]
    lat_pos = torch.arange(lat_x.shape[1], device=idx.device)
    layers = {f"{kind}_layer": (stage(f"{kind}_layer", block), [caught[f"{kind}_layer"][0][0]])
              for kind, block in first_of.items()}
    return layers, {
        "token_layers_before": (stage("encoder", model.encoders[0]), [caught["encoder"][0][0]]),
        "compression": (lambda x: model.shorten[0](x, *sh_args[1:]), [sh_args[0]]),
        "latent_stack": (lambda x: model._latent_stack(model.encoders[1](x, model.positions[0]), False, lat_pos)[1],
                         [lat_x]),
        "upsampling": (lambda lat, skip: upsample_add(lat, skip, g, k), [caught["latent_out"], caught["skip"]]),
        "token_layers_after": (stage("decoder", model.decoders[0]), [caught["decoder"][0][0]]),
        "head_and_loss": (lambda h: F.cross_entropy(model.lm_head(model.ln_f(h)).flatten(0, 1).float(),
                                                    targets.flatten()), [caught["decoder_out"]]),
    }


def component_split(model: nn.Module, idx: Tensor, targets: Tensor, autocast: Callable[[], Any],
                    iters: int = 10) -> dict:
    """Per-component forward + backward times of a one-level hourglass on the batch ``idx`` (see module doc),
    in training mode. ``autocast``: a zero-argument callable giving the trainer's autocast context. Returns
    ``{"components": {name: {kernel_ms, wall_ms, kernel_share}}, "layers": {name: {kernel_ms, wall_ms}},
    "total": {...}, "batch": [B, T], "local_backend": ...}``."""
    device = idx.device
    model.train()
    layer_pieces, pieces = parts(model, idx, targets, autocast)
    out: dict[str, dict[str, float]] = {}
    with autocast():
        layers = {name: _measure(_fwd_bwd(f, inputs), device, iters) for name, (f, inputs) in layer_pieces.items()}
        for name, (f, inputs) in pieces.items():
            out[name] = _measure(_fwd_bwd(f, inputs), device, iters)

        def whole() -> None:
            model.loss(idx, targets).backward()
            model.zero_grad(set_to_none=True)

        total = _measure(whole, device, iters)
    summed = {key: sum(v[key] for v in out.values()) for key in ("kernel_ms", "wall_ms")}
    out["other"] = {key: total[key] - summed[key] for key in summed}
    for v in out.values():
        v["kernel_share"] = v["kernel_ms"] / total["kernel_ms"] if total["kernel_ms"] else None
    return {"components": out, "layers": layers, "total": total, "batch": list(idx.shape),
            "local_backend": model.opts.local_backend}


def total_time(model: nn.Module, idx: Tensor, targets: Tensor, autocast: Any, iters: int = 10) -> dict:
    """Forward + backward of any model's loss (eager): kernel and wall milliseconds (the GPT's reference)."""
    model.train()

    def whole() -> None:
        model.loss(idx, targets).backward()
        model.zero_grad(set_to_none=True)

    with autocast():
        return _measure(whole, idx.device, iters)
