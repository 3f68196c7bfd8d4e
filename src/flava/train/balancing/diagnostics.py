"""Gradient diagnostics: each objective's gradient norm on each shared encoder and the cosine
between objectives' gradients there, so a user sees which objectives fight, and where."""

from __future__ import annotations

import torch

SEP = "|"
"""Joins two objectives' names in a cosine's key: `global_contrastive|itm`."""


def gradient_report(grads: dict[str, dict[str, torch.Tensor]], unit: float = 1.0) -> dict[str, dict]:
    """{encoder: {"norm": {objective: n}, "cosine": {"a|b": c}}} from each objective's flat
    gradient by encoder (missing where the objective does not reach it), divided by `unit` (the
    loss scale); one host read for all the numbers."""
    names = list(grads)
    encoders = list(dict.fromkeys(e for g in grads.values() for e in g))
    keys, values = [], []
    for enc in encoders:
        have = [n for n in names if enc in grads[n]]
        for n in have:
            keys.append((enc, "norm", n))
            values.append(grads[n][enc].norm() / unit)
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                ga, gb = grads[a][enc], grads[b][enc]
                keys.append((enc, "cosine", f"{a}{SEP}{b}"))
                values.append(ga @ gb / (ga.norm() * gb.norm()).clamp(min=1e-30))
    out: dict[str, dict] = {}
    for (enc, what, key), v in zip(keys, torch.stack(values).tolist() if values else []):
        out.setdefault(enc, {"norm": {}, "cosine": {}})[what][key] = v
    return out
