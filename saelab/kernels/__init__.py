"""Sparse kernels for the training hot path: only the k of n latents each token uses are touched.

    SparseLayout   where a code's nonzeros are (CSR; fixed-k is a special case)        saelab.kernels.layout
    encode_at      encoder pre-activations at those entries, with sparse gradients      saelab.kernels.autograd
    decode         decoder sum over those entries, with sparse gradients                saelab.kernels.autograd
    latent_sums    the transposed product: per latent, its entries' weighted token rows saelab.kernels.autograd

The primitives run eagerly (PyTorch ops; CPU and GPU) or as Triton kernels (GPU; CPU via TRITON_INTERPRET=1),
chosen by SAELAB_KERNELS (saelab.kernels.backend).
"""

from saelab.kernels.autograd import decode, encode_at, latent_sums
from saelab.kernels.layout import SparseCode, SparseLayout

__all__ = ["SparseCode", "SparseLayout", "decode", "encode_at", "latent_sums"]
