"""Sparse kernels for TopK training: the encoder backward touches only the ``k`` kept latents per row.

With ``k = 32`` of ``d_sae = 16384`` latents, the dense encoder backward (``x.T @ grad_pre``) is as
expensive as the forward matmul although 99.8% of ``grad_pre`` is zero. Here the gradient is a
sparse (CSR) times dense product, and the decoder is an ``embedding_bag`` over the kept latents, whose
backward is an index-add: neither ever builds a dense ``[batch, d_sae]`` gradient.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = ["gathered_pre_acts", "sparse_decode"]

# CSR x dense is all this module uses of sparse tensors, and it is exercised by the tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _rows_times_dense(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``G.T @ dense`` for the sparse ``G [batch, n_rows]`` holding ``values [batch, k]`` at ``indices``.

    Returns ``[n_rows, d]``; built as a CSR matrix (rows = latents) so the product is one sparse GEMM.
    """
    batch, k = indices.shape
    flat = indices.reshape(-1)
    order = flat.argsort()
    columns = torch.arange(batch, device=indices.device).repeat_interleave(k)[order]
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=n_rows).cumsum(0)
    matrix = torch.sparse_csr_tensor(
        crow, columns, values.reshape(-1)[order].to(dense.dtype), (n_rows, batch), check_invariants=False
    )
    return matrix @ dense


class _GatheredPreActs(torch.autograd.Function):
    """``pre[b, indices[b, j]]`` where ``pre = x @ W_enc_t.T + b_enc`` was computed without grad."""

    @staticmethod
    def forward(ctx, x, W_enc_t, b_enc, indices, pre):  # type: ignore[override]
        ctx.save_for_backward(x, W_enc_t, indices)
        ctx.d_sae = W_enc_t.shape[0]
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx, grad_values):  # type: ignore[override]
        x, W_enc_t, indices = ctx.saved_tensors
        grad_values = grad_values.to(W_enc_t.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # grad_x[b] = sum_j g[b, j] * W_enc_t[indices[b, j]]: an embedding bag, no dense intermediate.
            grad_x = F.embedding_bag(indices, W_enc_t, per_sample_weights=grad_values, mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = _rows_times_dense(indices, grad_values, x.to(W_enc_t.dtype), ctx.d_sae)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.d_sae, device=W_enc_t.device, dtype=W_enc_t.dtype)
            grad_b.index_add_(0, indices.reshape(-1), grad_values.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


def gathered_pre_acts(
    x: torch.Tensor, W_enc_t: torch.Tensor, b_enc: torch.Tensor, indices: torch.Tensor, pre: torch.Tensor
) -> torch.Tensor:
    """Differentiable ``[batch, k]`` values of chosen latents.

    Args:
        x: encoder input ``[batch, d_in]``.
        W_enc_t: encoder, one row per latent ``[d_sae, d_in]``.
        b_enc: ``[d_sae]``.
        indices: chosen latents ``[batch, k]``.
        pre: the already computed pre-activations ``[batch, d_sae]`` (no grad).
    """
    return _GatheredPreActs.apply(x, W_enc_t, b_enc, indices, pre)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j values[b, j] * W_dec[indices[b, j]]``: ``[batch, k]`` x ``[d_sae, d_out]`` -> ``[batch, d_out]``."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
