"""The Triton sparse primitives: same signatures and semantics as saelab.kernels.eager.

Launch grids (no atomics, so results are deterministic run to run):

    bag_sum   grid (B, cdiv(d, BLOCK_D))   program (t, j) owns out[t, j*BLOCK_D : (j+1)*BLOCK_D] and walks token t's
                                           entries offsets[t]:offsets[t + 1] in chunks of BLOCK_P, gathering a
                                           [BLOCK_P, BLOCK_D] tile of table rows per chunk
    bag_dots  grid (cdiv(nnz, BLOCK_P),)   program i owns entries i*BLOCK_P : (i+1)*BLOCK_P and walks d in
                                           chunks of BLOCK_D, gathering the entries' table and dense rows

Both accumulate in fp32 and write table.dtype. The table (and bag_dots' dense) is read through its strides, so
a transposed view costs no copy. On CPU tensors the kernels run under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_P = 16  # entries per chunk
_MAX_BLOCK_D = 128  # feature columns per chunk


@triton.jit
def _bag_sum_kernel(
    indices_ptr,
    offsets_ptr,
    weights_ptr,
    table_ptr,
    out_ptr,
    d,
    stride_tn,
    stride_td,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    col_offsets = cols.to(tl.int64) * stride_td
    start = tl.load(offsets_ptr + token)
    end = tl.load(offsets_ptr + token + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for chunk in range(start, end, BLOCK_P):
        entries = chunk + tl.arange(0, BLOCK_P)
        entry_mask = entries < end
        latents = tl.load(indices_ptr + entries, mask=entry_mask, other=0)
        weights = tl.load(weights_ptr + entries, mask=entry_mask, other=0).to(tl.float32)
        tile = tl.load(
            table_ptr + latents[:, None] * stride_tn + col_offsets[None, :],
            mask=entry_mask[:, None] & col_mask[None, :],
            other=0,
        ).to(tl.float32)
        acc += tl.sum(tile * weights[:, None], axis=0)
    tl.store(out_ptr + token * d + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _bag_dots_kernel(
    indices_ptr,
    rows_ptr,
    table_ptr,
    dense_ptr,
    out_ptr,
    nnz,
    d,
    stride_tn,
    stride_td,
    stride_dn,
    stride_dd,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    entries = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    entry_mask = entries < nnz
    table_rows = tl.load(indices_ptr + entries, mask=entry_mask, other=0) * stride_tn
    dense_rows = tl.load(rows_ptr + entries, mask=entry_mask, other=0) * stride_dn
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for chunk in range(0, d, BLOCK_D):
        cols = (chunk + tl.arange(0, BLOCK_D)).to(tl.int64)
        mask = entry_mask[:, None] & (cols < d)[None, :]
        a = tl.load(table_ptr + table_rows[:, None] + cols[None, :] * stride_td, mask=mask, other=0)
        b = tl.load(dense_ptr + dense_rows[:, None] + cols[None, :] * stride_dd, mask=mask, other=0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + entries, acc.to(out_ptr.dtype.element_ty), mask=entry_mask)


def _block_d(d: int) -> int:
    return min(triton.next_power_of_2(d), _MAX_BLOCK_D)


def bag_sum(indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """indices [nnz], offsets [B + 1], weights [nnz], table [n, d] -> [B, d] in table.dtype.

    out[t] = sum over p in offsets[t]:offsets[t + 1] of weights[p] * table[indices[p]]; empty rows give 0.
    """
    batch, d = offsets.numel() - 1, table.shape[1]
    if indices.numel() == 0 or batch == 0 or d == 0:
        return table.new_zeros(batch, d)
    out = table.new_empty(batch, d)
    block_d = _block_d(d)
    _bag_sum_kernel[(batch, triton.cdiv(d, block_d))](
        indices.contiguous(),
        offsets.contiguous(),
        weights.contiguous(),
        table,
        out,
        d,
        table.stride(0),
        table.stride(1),
        BLOCK_P=_BLOCK_P,
        BLOCK_D=block_d,
    )
    return out


def bag_dots(
    indices: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, dense: torch.Tensor
) -> torch.Tensor:
    """indices [nnz], offsets [B + 1], rows [nnz], table [n, d], dense [B, d] -> [nnz] in table.dtype.

    out[p] = table[indices[p]] . dense[rows[p]]. offsets is unused (rows already names each entry's token); it is
    taken for the eager backend's signature.
    """
    nnz, d = indices.numel(), table.shape[1]
    if nnz == 0 or d == 0:
        return table.new_zeros(nnz)
    out = table.new_empty(nnz)
    _bag_dots_kernel[(triton.cdiv(nnz, _BLOCK_P),)](
        indices.contiguous(),
        rows.contiguous(),
        table,
        dense,
        out,
        nnz,
        d,
        table.stride(0),
        table.stride(1),
        dense.stride(0),
        dense.stride(1),
        BLOCK_P=_BLOCK_P,
        BLOCK_D=_block_d(d),
    )
    return out
