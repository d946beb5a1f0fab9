"""The eager (PyTorch-op) sparse primitives: the CPU path, and the GPU path when Triton is off.

Both take a CSR layout (indices [nnz], offsets [B + 1], see saelab.kernels.layout):

    bag_sum(indices, offsets, weights, table)     -> out [B, d],   out[t] = sum_p weights[p] * table[indices[p]]
    bag_dots(indices, offsets, rows, table, dense) -> out [nnz],   out[p] = table[indices[p]] . dense[rows[p]]

with p running over token t's entries offsets[t]:offsets[t + 1]; table is [n, d], dense [B, d]. bag_sum is
`embedding_bag` with per-sample weights; bag_dots is that op's per-sample-weight gradient, which ATen
implements without materialising the [nnz, d] gathered rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SUM = 0  # EmbeddingBag mode code for "sum" in the ATen backward op


def bag_sum(indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[B, d]: per token, the weighted sum of the table rows its entries point at (empty rows give 0)."""
    if indices.numel() == 0:
        return table.new_zeros(offsets.numel() - 1, table.shape[1])
    return F.embedding_bag(
        indices,
        table.contiguous(),
        offsets,
        mode="sum",
        per_sample_weights=weights.to(table.dtype),
        include_last_offset=True,
    )


def bag_dots(
    indices: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, dense: torch.Tensor
) -> torch.Tensor:
    """[nnz]: for each entry p, the dot product of table[indices[p]] with dense[rows[p]]."""
    if indices.numel() == 0:
        return table.new_zeros(0)
    table, dense = table.contiguous(), dense.to(table.dtype).contiguous()
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        dense, table, indices, offsets[:-1], rows, _SUM, -1
    )
