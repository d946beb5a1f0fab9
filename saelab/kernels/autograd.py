"""Sparse encoder and decoder as autograd functions: O(nnz * d) forward and backward, never a dense [B, n].

    encode_at(x, center, W_enc, b_enc, layout, z_at) -> z_at [nnz]
        the pre-activations z = (x - center) @ W_enc + b_enc at the layout's entries (computed by the caller,
        without grad, from its dense z); backward sends gradients to x, center, W_enc and b_enc through those
        entries only
    decode(values, W_dec, layout) -> [B, d_in]
        sum of the entries' decoder rows weighted by values

Gradients, with g the incoming gradient and p an entry at (token t, latent i):
    decode:    dvalues[p] = W_dec[i] . g[t];          dW_dec[i] = sum_p values[p] * g[t]
    encode_at: dW_enc[:, i] = sum_p g[p] * x[t];      db_enc[i] = sum_p g[p];      dx[t] = sum_p g[p] * W_enc[:, i];
               dcenter = -sum_t dx[t] = -W_enc @ db_enc
The latent-sums use the layout's transpose (entries grouped by latent), so they are gathers, not atomics:
deterministic on every backend. dW_enc comes out as [d_sae, d_in] rows and is returned transposed (autograd
copies it into W_enc's layout: one pass over W_enc, as the optimiser's).
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from saelab.kernels.backend import backend_for
from saelab.kernels.layout import SparseLayout


def latent_sums(layout: SparseLayout, weights: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """[n_latents, d]: row i = sum over latent i's entries p of weights[p] * dense[token(p)]."""
    order, rows, latent_offsets = layout.transpose
    return backend_for(dense.device).bag_sum(rows, latent_offsets, weights[order], dense)


class _Decode(Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, W_dec: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.layout = layout
        return backend_for(W_dec.device).bag_sum(layout.indices, layout.offsets, values, W_dec)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, W_dec = ctx.saved_tensors
        layout: SparseLayout = ctx.layout
        grad_out = grad_out.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            kernels = backend_for(W_dec.device)
            grad_values = kernels.bag_dots(layout.indices, layout.offsets, layout.rows, W_dec, grad_out).to(
                values.dtype
            )
        if ctx.needs_input_grad[1]:
            grad_W = latent_sums(layout, values.detach(), grad_out).to(W_dec.dtype)
        return grad_values, grad_W, None


class _EncodeAt(Function):
    @staticmethod
    def forward(ctx, x, center, W_enc, b_enc, layout: SparseLayout, z_at: torch.Tensor) -> torch.Tensor:
        x_in = x if center is None else x - center
        ctx.save_for_backward(x_in, W_enc)
        ctx.layout = layout
        return z_at.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_in, W_enc = ctx.saved_tensors
        layout: SparseLayout = ctx.layout
        grad_x = grad_W = None
        grad_b = torch.zeros(layout.n_latents, dtype=W_enc.dtype, device=grad.device)
        grad_b.index_add_(0, layout.indices, grad.to(W_enc.dtype))
        if ctx.needs_input_grad[0]:
            grad_x = backend_for(x_in.device).bag_sum(layout.indices, layout.offsets, grad, W_enc.T).to(x_in.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = latent_sums(layout, grad, x_in.contiguous()).to(W_enc.dtype).T
        return grad_x, _center_grad(ctx, W_enc, grad_b), grad_W, grad_b, None, None


class _EncodeAtDense(_EncodeAt):
    """encode_at with the textbook dense backward (G = the [B, n] gradient scattered from the entries; dW_enc = x^T G):
    the fallback for codes too dense for the sparse path, without recomputing the forward matmul."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_in, W_enc = ctx.saved_tensors
        dense_grad = ctx.layout.to_dense(grad.to(W_enc.dtype))
        grad_x = dense_grad @ W_enc.T if ctx.needs_input_grad[0] else None
        grad_W = x_in.T @ dense_grad if ctx.needs_input_grad[2] else None
        grad_b = dense_grad.sum(0)
        return grad_x, _center_grad(ctx, W_enc, grad_b), grad_W, grad_b, None, None


def _center_grad(ctx, W_enc: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor | None:
    """Every token's encoder input is x - center, so d center = -sum_t dx_t = -W_enc @ d b_enc: a mat-vec
    instead of a [B, d_in] gradient."""
    return -(W_enc @ grad_b) if ctx.needs_input_grad[1] else None


def decode(values: torch.Tensor, W_dec: torch.Tensor, layout: SparseLayout, dense: bool = False) -> torch.Tensor:
    """values [nnz], W_dec [n_latents, d] -> [batch, d]: each token's entries' decoder rows weighted by values.

    dense=True computes the same as a dense code [batch, n_latents] @ W_dec (the fallback for dense codes).
    """
    if dense:
        return layout.to_dense(values.to(W_dec.dtype)) @ W_dec
    return _Decode.apply(values, W_dec, layout)


def encode_at(
    x: torch.Tensor,
    center: torch.Tensor | None,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    layout: SparseLayout,
    z_at: torch.Tensor,
    dense: bool = False,
) -> torch.Tensor:
    """z_at [nnz] (= ((x - center) @ W_enc + b_enc) at the layout's entries, computed by the caller) with sparse
    gradients.

    x [batch, d_in], center [d_in] or None (no centering), W_enc [d_in, n_latents], b_enc [n_latents]. Returns z_at
    as a new tensor whose backward reaches x, center, W_enc and b_enc through the layout's entries only
    (dense=True: through dense [B, n] matmuls, the fallback for dense codes; same values).
    """
    return (_EncodeAtDense if dense else _EncodeAt).apply(x, center, W_enc, b_enc, layout, z_at)
