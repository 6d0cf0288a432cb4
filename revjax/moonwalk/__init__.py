r"""Moonwalk: gradients by a forward sweep of vector-inverse-Jacobian products.

After Krylov, Karamzade and Fox, "Moonwalk: Inverse-Forward Differentiation" (arXiv 2402.14212).
The derivation below is ours.

**Setting.** A chain ``x_i = f_i(theta_i, x_{i-1})``, ``i = 1..n``, and a loss ``L(x_n)``. Write
``h_i = dL/dx_i`` (a row vector), ``J_i = dx_i/dx_{i-1}`` and ``K_i = dx_i/dtheta_i``. Backprop
runs ``h_{i-1} = h_i J_i`` from ``i = n`` down and emits ``dL/dtheta_i = h_i K_i``; it needs every
``x_{i-1}`` (to form ``J_i``, ``K_i``) in reverse order, hence stores them.

**Inverting the recursion.** If ``J_i`` is surjective (``f_i`` is *submersive*: full row rank),
``b J_i = a`` has exactly one solution ``b`` for every ``a`` in the row space of ``J_i``. Since
``h_{i-1} = h_i J_i`` lies in that row space by construction, ``h_i`` is recovered from
``h_{i-1}`` as that solution, the **vijp** ``h_i = vijp_i(h_{i-1})``. Given ``h_0 = dL/dx_0``,
a *forward* sweep computes ``x_i``, ``h_i = vijp_i(h_{i-1})`` and ``dL/dtheta_i = h_i K_i`` layer
by layer and stores nothing per layer. Per layer type (``revjax.moonwalk.layers``):

* additive coupling ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` with input cotangent ``(a1, a2)``.
  Backprop gives ``a1 = t1`` and ``a2 = b2 + F'(x2)^T t1`` with ``t1 = b1 + G'(y1)^T b2`` the total
  cotangent of ``y1``. Hence ``t1 = a1``, ``b2 = a2 - vjp_F(x2)(a1)``, ``b1 = a1 - vjp_G(y1)(b2)``;
  ``theta_F`` gets ``vjp_F`` w.r.t. ``theta`` at ``a1`` and ``theta_G`` at ``b2``. (Affine
  couplings add an elementwise ``e^{-s}``; both are ``Coupling.vijp_step``.)
* leaky ReLU: ``J = diag(sigma'(x))``, so ``b = a / sigma'(x)`` with ``x`` known in the sweep.
* width-reducing linear ``y = x W``, ``W = [U; V]`` (``n x k``), ``U`` unit upper triangular:
  ``b W^T = a`` restricted to the first ``k`` coordinates is ``b U^T = a_{:k}``, a triangular
  solve that always has a unique solution.
* any invertible layer: ``J^{-1} = dx/dy``, so ``b = a (dx/dy)``, the vjp of the inverse.
* fallback: the explicit per-example Jacobian ``J = U S V^T`` and ``b = a V S^{-1} U^T``.

**Getting h_0.** *Pure-forward Moonwalk* uses forward mode only: with per-example losses, one
JVP per input coordinate (all examples at once) gives ``h_0``; cost ``d`` forward passes for a
per-example input of size ``d``, instead of ``P`` (the parameter count) for exact forward mode.
``2 ceil(log2 B)`` more JVPs for a batch of ``B`` check the premise: each sets its tangent in
one subset of the examples only (for each bit of the example index, those with it set and
those with it clear, so every two examples are split by some subset). With independent
examples the loss tangents outside the subset are exactly zero; a nonzero one (a batch mean in
the loss, batch statistics in a layer) raises instead of returning a wrong gradient.
*Mixed Moonwalk* runs a reverse pass for ``h_0`` alone, which needs much less than backprop's
residuals: no ``K_i`` terms, so a linear layer needs only its weights, a leaky ReLU one bit per
element (the sign of its input, packed 8 per byte) and a coupling nothing at all (its input is
reconstructed from its output, as in RevBackprop). Then the forward sweep as above.

**Baselines** in the same API (``value_and_grad(..., method=...)``): ``backprop``,
``revbackprop`` (``revjax.reversible_scan``), ``forward`` (one JVP per parameter) and
``projected_forward`` (Baydin et al. 2022, arXiv 2202.08587: ``(g . v) v`` averaged over Gaussian
tangents ``v``, unbiased because ``E[v v^T] = I``).
"""

from revjax.moonwalk.gradients import METHODS, input_cotangent_by_jvps, value_and_grad
from revjax.moonwalk.layers import (
    Layer,
    chain,
    dense,
    from_coupling,
    init_submersive_linear,
    leaky_relu,
    stack,
    submersive_linear,
    submersive_weight,
    vijp,
)

__all__ = [
    "METHODS",
    "Layer",
    "chain",
    "dense",
    "from_coupling",
    "init_submersive_linear",
    "input_cotangent_by_jvps",
    "leaky_relu",
    "stack",
    "submersive_linear",
    "submersive_weight",
    "value_and_grad",
    "vijp",
]
