"""The GLoRA formula, written once (docs/method.md §1):

    W = W0 + W0 * A + B          b = b0 + b0 * D + E + W0 @ C

Every path that builds a layer's weight or bias calls these two functions: the layer's forward
(when it rebuilds the kernel), the merged copy, and all three merge strategies of the search.
Terms come from ``GLoRASupport.term`` (one layer, 2-D factors) or from the batched merge (a
stack of layers, 3-D factors, every tensor present with unused components masked to zero); the
functions accept both, since every op here broadcasts or has a batched twin.
"""
from __future__ import annotations

import torch

from .support import LowRank, PerRow, Term


def _product(term: LowRank, out: torch.Tensor | None) -> torch.Tensor:
    multiply = torch.bmm if term.down.dim() == 3 else torch.mm
    return multiply(term.down, term.up, out=out)


def _add_term(weight: torch.Tensor, term: Term) -> torch.Tensor:
    """``weight += term`` in place (``weight`` is a fresh tensor or the caller's buffer)."""
    if isinstance(term, LowRank):
        add_product = weight.baddbmm_ if term.down.dim() == 3 else weight.addmm_
        return add_product(term.down, term.up)
    return weight.add_(term.matrix())


def adapted_weight(w0: torch.Tensor, a: Term | None, b: Term | None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``W0 + W0 * A + B`` as a new tensor (or written into ``out``), never ``W0`` itself.

    The first op makes the result and fuses what it can; later terms accumulate into it, so no
    second weight-sized temporary is made (a candidate merges every layer, just in time once per
    batch: every pass over the weight counts).  Autograd records it (the forward's rebuilt
    kernel) as long as ``out`` is not given: the in-place steps act on a tensor this made.  It is
    computed in the weights' own precision, autocast or not: a mixed-precision forward rounds the
    finished kernel once, in the layer's own op.
    """
    with torch.autocast(w0.device.type, enabled=False):  # built in the weights' own precision
        return _adapted_weight(w0, a, b, out)


def _adapted_weight(w0: torch.Tensor, a: Term | None, b: Term | None, out: torch.Tensor | None) -> torch.Tensor:
    in_place = out is not None or not torch.is_grad_enabled()  # autograd cannot differentiate out=
    if isinstance(a, LowRank):
        product = _product(a, out)
        weight = torch.addcmul(w0, w0, product, out=product if in_place else None)  # W0 + W0 * A
    elif a is not None:
        weight = torch.addcmul(w0, w0, a.matrix(), out=out)
    elif isinstance(b, LowRank):  # W0 + B in one op
        multiply_add = torch.baddbmm if b.down.dim() == 3 else torch.addmm
        return multiply_add(w0, b.down, b.up, out=out)
    elif b is not None:
        return torch.add(w0, b.matrix(), out=out)
    else:
        return w0.clone() if out is None else out.copy_(w0)
    return weight if b is None else _add_term(weight, b)


def adapted_bias(w0: torch.Tensor, b0: torch.Tensor | None, c: Term | None, d: PerRow | None,
                 e: PerRow | None) -> torch.Tensor | None:
    """``b0 + b0 * D + E + W0 @ C``, or None when the layer has no bias and C, E are absent.

    The result may share storage with ``b0`` (D, E, C absent) or with E (no bias, C absent):
    callers that keep it copy it.  Computed in the weights' own precision, as ``adapted_weight``.
    """
    with torch.autocast(w0.device.type, enabled=False):
        return _adapted_bias(w0, b0, c, d, e)


def _adapted_bias(w0: torch.Tensor, b0: torch.Tensor | None, c: Term | None, d: PerRow | None,
                  e: PerRow | None) -> torch.Tensor | None:
    bias = b0
    if b0 is not None and d is not None:
        bias = torch.addcmul(b0, b0, d.value)
    if e is not None:
        bias = e.value.expand(w0.shape[:-1]) if bias is None else bias + e.value
    if c is not None:
        prompt = (w0 @ c.matrix())[..., 0]  # C is a (d_in, 1) column: W0 @ C is a vector
        bias = prompt if bias is None else bias + prompt
    return bias
