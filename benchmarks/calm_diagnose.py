"""Why CALM key-value arithmetic fails at CPU scale: probes of the trained anchor / augmenting runs.

    python benchmarks/calm_diagnose.py [--runs runs/compose_bench/calm/runs] [--steps 1500] [--threads 1]

Needs the anchor and augmenting runs of ``benchmarks/compose.py calm`` (same config). Measures, on ``kv_arith``
(``a1 a2 a3 + b1 b2 b3 =``; the numbers sit at positions 2 and 6 in the anchor's own format ``_ _ x + _ _ y =``):

1. the augmenting model's own next-token accuracy at the last key letters (does it know the values there?);
2. the anchor given the right number tokens in place of the last key letters (other letters kept), or given the
   number embedding ADDED to the letter's (what an additive bridge writes if it does not also cancel the letter);
3. the best linear bridge: least-squares map from the augmenting model's last-layer state at the last key letter
   to the ideal injection E_anchor[value] - E_anchor[letter], fitted on training keys, injected at the anchor input;
4. an oracle bridge: a free per-value table T[value] replacing the last key letter at the anchor input (letters
   cancelled exactly, true values given), trained through the frozen anchor from zero like the bridges are;
5. a value-code probe: a ridge map (fitted on training keys) from the augmenting model's state at a key's last
   letter to the anchor's number embeddings, decoded by the nearest one: does a linear code transfer to new keys?

Writes ``OUT/calm_diagnose.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modformer.bench.common import write_result  # noqa: E402
from modformer.compose import calm  # noqa: E402
from modformer.compose.spec import load_spec  # noqa: E402
from modformer.runs import run_model  # noqa: E402

SLOTS = (2, 6)   # last letter of each key = the anchor's number positions
RIDGE = (0.0, 1.0, 100.0)   # ridge strengths of the value-code probe


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "compose_bench" / "calm" / "runs"))
    p.add_argument("--steps", type=int, default=1500, help="oracle table training steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    spec = load_spec(ROOT / "configs" / "compose_calm.yaml", calm.DEFAULTS, [])
    _, _, arith, _ = calm._datasets(spec["data"])
    anchor, aug = run_model(Path(args.runs) / "anchor").eval(), run_model(Path(args.runs) / "augmenting").eval()
    for m in (anchor, aug):
        m.requires_grad_(False)
    value = dict(zip(map(tuple, arith.keys.tolist()), arith.values.tolist()))
    E = anchor.tok_emb.weight
    last = f"blocks.{len(aug.blocks) - 1}.hook_resid_post"
    data = {}
    for split in ("train", "val"):
        x, y = arith._x[split], arith._y[split][:, -1]
        v = torch.stack([torch.tensor([value[tuple(r)] for r in x[:, s - 2:s + 1].tolist()]) for s in SLOTS], 1)
        with torch.no_grad():
            logits, cache = aug.run_with_cache(x, [last])
        data[split] = (x, y, v, logits, cache[last])

    def acc(x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor | None) -> float:
        """Anchor accuracy with ``delta`` (N, 2, D) added to its input at the number slots."""
        def add(h: torch.Tensor, hook: object) -> torch.Tensor:
            h = h.clone()
            h[:, list(SLOTS)] += delta
            return h
        hooks = [("blocks.0.hook_resid_pre", add)] if delta is not None else []
        with torch.no_grad():
            return float((anchor.run_with_hooks(x, hooks)[:, -1].argmax(-1) == y).float().mean())

    out: dict[str, dict[str, float]] = {}
    for split, (x, y, v, logits, _) in data.items():
        xn = x.clone()
        xn[:, list(SLOTS)] = v
        xp = xn.clone()
        xp[:, [s for s in range(x.shape[1] - 1) if s not in SLOTS and s != 3]] = arith.pad
        out[split] = {
            "augmenting_next_token_acc_at_key_end": float((logits[:, list(SLOTS)].argmax(-1) == v).float().mean()),
            "anchor_alone": acc(x, y, None),
            "anchor_numbers_for_last_letters": acc(xn, y, None),
            "anchor_own_format": acc(xp, y, None),
            "anchor_letter_plus_number_embedding": acc(x, y, E[v].detach()),
        }
    # 3. least-squares linear bridge (with bias) on the training keys
    x, y, v, _, h = data["train"]
    feats = torch.cat([h[:, list(SLOTS)], torch.ones(*v.shape, 1)], -1).flatten(0, 1)
    target = (E[v] - E[x[:, list(SLOTS)]]).detach().flatten(0, 1)
    W = torch.linalg.solve(feats.T @ feats + 1e-3 * torch.eye(feats.shape[1]), feats.T @ target)
    for split, (x, y, v, _, h) in data.items():
        out[split]["linear_bridge_least_squares"] = acc(x, y, torch.cat([h[:, list(SLOTS)],
                                                                        torch.ones(*v.shape, 1)], -1) @ W)
    # 5. is there a key-general value code? ridge map (fitted on training keys) from the augmenting state at a
    #    key's last letter (first slot: the state depends on the key only) to the anchor's number embeddings,
    #    decoded by the nearest number embedding; measured on the held-out keys
    numbers = E[:arith.p].detach()
    per_key = {}
    for split, (x, _, v, _, h) in data.items():
        keys = {tuple(r[:3]): i for i, r in enumerate(x.tolist())}            # one example per first key
        idx = torch.tensor(list(keys.values()))
        per_key[split] = (h[idx, SLOTS[0]], v[idx, 0])
    (ht, vt), (hv, vv) = per_key["train"], per_key["val"]
    mu, nu = ht.mean(0), numbers[vt].mean(0)
    for lam in RIDGE:
        W = torch.linalg.solve((ht - mu).T @ (ht - mu) + lam * torch.eye(ht.shape[1]), (ht - mu).T @ (numbers[vt] - nu))
        for split, (hh, vvv) in (("train", (ht, vt)), ("val", (hv, vv))):
            dec = torch.cdist((hh - mu) @ W + nu, numbers).argmin(-1)
            out[split][f"value_code_ridge{lam:g}"] = float((dec == vvv).float().mean())
    # 4. oracle per-value table through the frozen anchor
    T = torch.nn.Parameter(torch.zeros(arith.p, E.shape[1]))
    opt = torch.optim.AdamW([T], lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x, y, v = data["train"][:3]
    losses = []
    for _ in range(args.steps):
        i = torch.randint(len(x), (256,), generator=g)

        def put(hid: torch.Tensor, hook: object, i: torch.Tensor = i) -> torch.Tensor:
            return torch.cat([hid[:, :2], hid[:, 2:3] + T[v[i, :1]] - E[x[i, 2:3]], hid[:, 3:6],
                              hid[:, 6:7] + T[v[i, 1:]] - E[x[i, 6:7]], hid[:, 7:]], 1)
        loss = F.cross_entropy(anchor.run_with_hooks(x[i], [("blocks.0.hook_resid_pre", put)])[:, -1], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for split, (x, y, v, _, _) in data.items():
        out[split]["oracle_value_table"] = acc(x, y, (T[v] - E[x[:, list(SLOTS)]]).detach())
    headline = {**{f"{k}_{s}": val for s, d in out.items() for k, val in d.items()},
                "oracle_table_steps": args.steps, "oracle_table_final_loss": sum(losses[-50:]) / 50,
                "seconds": time.perf_counter() - t0}
    for k, val in headline.items():
        print(f"{k:55s} {val:.4g}")
    write_result("calm_diagnose", headline, [], torch.device("cpu"), args.out,
                 extra={"threads": args.threads, "runs": args.runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
