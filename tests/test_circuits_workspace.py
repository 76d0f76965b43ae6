"""The edge forward's scratch buffers: reused within their budget, never kept past it."""

import torch

from featcircuits.patching.workspace import Workspace


def test_workspace_reuses_a_role_buffer_and_keeps_nothing_past_its_budget():
    like = torch.zeros(1)
    workspace = Workspace(max_bytes=4 * 1000)
    first = workspace.take("diffs", (10, 50), like)
    smaller = workspace.take("diffs", (20, 10), like)
    assert smaller.shape == (20, 10) and smaller.data_ptr() == first.data_ptr()  # the same memory, reused
    other = workspace.take("inputs", (10, 40), like)
    assert other.data_ptr() != first.data_ptr()  # roles never share memory
    big = workspace.take("inputs", (2000,), like)  # 8,000 bytes: past the budget, fresh and not kept
    assert big.shape == (2000,) and "inputs" not in workspace._buffers
    held = sum(buffer.numel() * buffer.element_size() for buffer in workspace._buffers.values())
    assert held <= workspace.max_bytes
    assert workspace.take("diffs", (500,), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
