"""``torch.compile`` of a training loss, with compiler failures turned into errors that name the fix.

Only the dense losses (ReLU, JumpReLU) are compiled: TopK and BatchTopK already run hand-written sparse
kernels (``sparse_ops``) whose data-dependent selection would only break the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["COMPILED_ARCHITECTURES", "compile_loss", "explain_compile_failure"]

COMPILED_ARCHITECTURES = ("relu", "jumprelu")


def compile_loss(loss_fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """``torch.compile(loss_fn)`` for fixed batch shapes with ``backend`` (checked here, compiled on first call).

    Inputs that change between steps (the sparsity coefficient during its warmup) must reach ``loss_fn`` as
    tensors: a Python number would be baked into the graph and force a recompilation per value.
    """
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(
            f"TrainConfig.compile_backend={backend!r} is not a torch.compile backend; choose one of {known} "
            "(inductor generates kernels; aot_eager needs no compiler), or set compile=false."
        )
    return torch.compile(loss_fn, backend=backend, dynamic=False)


@contextmanager
def explain_compile_failure(backend: str, architecture: str) -> Iterator[None]:
    """Re-raise a backend failure (first forward or backward of a compiled loss) with the ways to fix it."""
    import torch._dynamo.exc

    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(
            f"torch.compile of the {architecture} training loss failed in backend {backend!r}: {cause}\n"
            "Fix: inductor on CPU needs a working C++ compiler (install g++ or clang, or point the CXX environment "
            "variable at one; on CUDA it needs Triton); or set compile_backend=aot_eager (no code generation), "
            "or compile=false. No weights were changed by this step."
        ) from err
