"""Ground-truth circuits from tracr: compile a RASP program and load it as a HookedTransformer.

tracr (``pip install tracr-pypi``, a dev/benchmark dependency: jax stays out of the library's own
requirements) compiles a RASP program to transformer weights whose residual stream is a sum of
labelled one-hot directions (``"tokens:a"``, ``"indices:3"``, ``"frac_prevs_1"``, ...). Each tracr
layer is one attention sublayer and one MLP; tracr's attention is bidirectional, scaled by
``1/sqrt(key_size)``, with no layer norm. The ground truth is read off the compiled weights: a head or
MLP is in the circuit when it has non-zero weights; an edge sender -> receiver when the residual labels
the sender writes overlap the labels the receiver reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["TracrModel", "compile_tracr", "tracr_program", "program_name", "tracr_name", "TRACR_PROGRAMS"]


def _require_tracr():
    try:
        from tracr.compiler import compiling, lib
        from tracr.rasp import rasp
    except ImportError as err:  # pragma: no cover - exercised only without the dev extra
        raise ImportError("tracr is not installed: `pip install tracr-pypi` (or `pip install -e .[dev]`).") from err
    return compiling, lib, rasp


def _programs() -> dict[str, Callable[[Any, Any, int], Any]]:
    """name -> (lib, rasp, max_seq_len) -> program, with the customary arguments."""
    return {
        "frac_prevs": lambda lib, rasp, n: lib.make_frac_prevs(rasp.tokens == "x"),
        "reverse": lambda lib, rasp, n: lib.make_reverse(rasp.tokens),
        "length": lambda lib, rasp, n: lib.make_length(),
        "hist": lambda lib, rasp, n: lib.make_hist(),
        "sort_unique": lambda lib, rasp, n: lib.make_sort_unique(rasp.tokens, rasp.tokens),
        "sort": lambda lib, rasp, n: lib.make_sort(rasp.tokens, rasp.tokens, max_seq_len=n, min_key=1),
        "sort_freq": lambda lib, rasp, n: lib.make_sort_freq(n),
        "pair_balance": lambda lib, rasp, n: lib.make_pair_balance(rasp.tokens, "(", ")"),
        "shuffle_dyck": lambda lib, rasp, n: lib.make_shuffle_dyck(["()", "{}"]),
        "shuffle_dyck2": lambda lib, rasp, n: lib.make_shuffle_dyck2(),
        "count_less_freq": lambda lib, rasp, n: lib.make_count_less_freq(2),
        "count": lambda lib, rasp, n: lib.make_count(rasp.tokens, "a"),
        "detect_pattern": lambda lib, rasp, n: lib.detect_pattern(rasp.tokens, "abc"),
        "shift_by": lambda lib, rasp, n: lib.shift_by(1, rasp.tokens),
    }


# name -> (vocab, max_seq_len) customary for that program
TRACR_PROGRAMS: dict[str, tuple[set, int]] = {
    "frac_prevs": ({"w", "x", "y", "z"}, 5),
    "reverse": ({"a", "b", "c"}, 5),
    "length": ({"a", "b", "c"}, 5),
    "hist": ({"a", "b", "c"}, 5),
    "sort_unique": ({1, 2, 3, 4, 5}, 5),
    "sort": ({1, 2, 3, 4}, 5),
    "sort_freq": ({"a", "b", "c"}, 5),
    "pair_balance": ({"(", ")", "a"}, 5),
    "shuffle_dyck": ({"(", ")", "{", "}"}, 5),
    "shuffle_dyck2": ({"(", ")", "{", "}"}, 5),
    "count_less_freq": ({"a", "b", "c"}, 5),
    "count": ({"a", "b", "c"}, 5),
    "detect_pattern": ({"a", "b", "c"}, 5),
    "shift_by": ({"a", "b", "c"}, 5),
}


def tracr_name(name: str) -> str:
    """The name of ``name``'s builder in ``tracr.compiler.lib`` (``"hist"`` -> ``"make_hist"``; ``"shift_by"``
    and ``"detect_pattern"`` are named so there already)."""
    return name if name in ("shift_by", "detect_pattern") else f"make_{name}"


def program_name(name: str) -> str:
    """``name`` (ours, ``"hist"``, or tracr's own, ``"make_hist"``) as a key of :data:`TRACR_PROGRAMS`."""
    if name in TRACR_PROGRAMS:
        return name
    ours = {tracr_name(key): key for key in TRACR_PROGRAMS}
    if name in ours:
        return ours[name]
    raise ValueError(f"Unknown tracr program {name!r}; choose one of {sorted(TRACR_PROGRAMS)} or tracr's own names "
                     f"for them ({', '.join(sorted(ours))}).")


def tracr_program(name: str, max_seq_len: int | None = None) -> tuple[Any, set, int]:
    """A program of tracr's lib by name (ours, ``"hist"``, or tracr's, ``"make_hist"``), with its customary
    vocab and length: ``(program, vocab, n)``."""
    name = program_name(name)
    _, lib, rasp = _require_tracr()
    programs = _programs()
    vocab, default_len = TRACR_PROGRAMS[name]
    n = max_seq_len or default_len
    return programs[name](lib, rasp, n), vocab, n


@dataclass
class TracrModel:
    """A compiled RASP program as a HookedTransformer plus what the ground truth needs.

    ``residual_labels[i]`` names residual dimension ``i``; ``output_values`` are the output tokens
    (``None`` for a numerical output, whose single logit is the output value).
    """

    model: Any
    residual_labels: list[str]
    input_encoding: dict
    output_values: list | None
    output_label: str
    program: Any

    def encode(self, tokens: Sequence) -> list[int]:
        """Input token ids for ``tokens`` (BOS prepended)."""
        return [self.input_encoding["BOS"]] + [self.input_encoding[t] for t in tokens]

    # -- ground truth ---------------------------------------------------------------------------

    def _reads_writes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Component id -> (labels read, labels written) as boolean masks ``[d_model]``."""
        m, tol = self.model, 1e-6
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        embed_writes = (m.W_E.abs().sum(0) > tol) | (m.W_pos.abs().sum(0) > tol)
        out["embed"] = (torch.zeros_like(embed_writes), embed_writes)
        for layer, block in enumerate(m.blocks):
            for head in range(m.cfg.n_heads):
                reads = sum(w[head].abs().sum(-1) for w in (block.attn.W_Q, block.attn.W_K, block.attn.W_V)) > tol
                writes = block.attn.W_O[head].abs().sum(0) > tol
                out[f"L{layer}.H{head}"] = (reads, writes)
            out[f"L{layer}.MLP"] = (block.mlp.W_in.abs().sum(-1) > tol, block.mlp.W_out.abs().sum(0) > tol)
        out["logits"] = (m.W_U.abs().sum(-1) > tol, torch.zeros_like(embed_writes))
        return out

    def component_truth(self, node_ids: Sequence[str]) -> torch.Tensor:
        """``[n_nodes]`` True for heads/MLPs the compiler gave weights (they implement program steps)."""
        rw = self._reads_writes()
        return torch.tensor([bool(rw[n][1].any()) for n in node_ids])

    def edge_truth(self, edge_ids: Sequence[tuple[str, str]]) -> torch.Tensor:
        """``[n_edges]`` True where the sender writes a residual label the receiver reads."""
        rw = self._reads_writes()
        return torch.tensor([bool((rw[s][1] & rw[r][0]).any()) for s, r in edge_ids])

    def label_directions(self) -> torch.Tensor:
        """``[d_model, d_model]`` the labelled directions (tracr's residual basis is the standard one)."""
        return torch.eye(len(self.residual_labels))


def _craft_model(program: Any, vocab: set, max_seq_len: int, compiler_bos: str, compiler_pad: str):
    """Run tracr's compiler up to its craft model (numpy weights per block); skips the haiku assembly."""
    from tracr.compiler import (
        basis_inference,
        craft_graph_to_model,
        expr_to_craft_graph,
        nodes,
        rasp_to_graph,
    )
    from tracr.craft import bases
    from tracr.rasp import rasp

    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sink = extracted.graph, extracted.sink
    basis_inference.infer_bases(graph, sink, vocab, max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph, bos_dir=bases.BasisDirection(rasp.tokens.label, compiler_bos), mlp_exactness=100)
    craft = craft_graph_to_model.craft_graph_to_model(graph, extracted.sources)
    token_values = graph.nodes[rasp.tokens.label][nodes.VALUE_SET] | {compiler_bos, compiler_pad}
    tokens_space = bases.VectorSpaceWithBasis(sorted(bases.BasisDirection(rasp.tokens.label, v) for v in token_values))
    indices_space = bases.VectorSpaceWithBasis.from_values(rasp.indices.label, range(max_seq_len))
    output_space = bases.VectorSpaceWithBasis(sink[nodes.OUTPUT_BASIS])
    return craft, tokens_space, indices_space, output_space, rasp.is_categorical(sink[nodes.EXPR])


def compile_tracr(program: Any, vocab: set, max_seq_len: int, compiler_bos: str = "BOS",
                  compiler_pad: str = "compiler_pad") -> TracrModel:
    """Compile ``program`` with tracr and build the equivalent HookedTransformer from the craft blocks.

    The weights are laid out as tracr's own assembler lays them out (one attention and one MLP slot per
    layer, blocks placed in the first free slot of their type, unused slots zero), computed here with
    numpy so that no jax model is initialised.
    """
    _require_tracr()
    from tracr.craft import bases, transformers, vectorspace_fns
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    craft, tokens_space, indices_space, output_space, categorical = _craft_model(
        program, vocab, max_seq_len, compiler_bos, compiler_pad)
    residual = bases.join_vector_spaces(craft.residual_space, tokens_space, indices_space, output_space)
    labels = [str(direction) for direction in residual.basis]

    def project(source, target) -> torch.Tensor:
        return torch.tensor(np.asarray(vectorspace_fns.project(source, target).matrix), dtype=torch.float32)

    # Place blocks in layer slots: attention then MLP per layer, in order, skipping slots of the other type.
    placed: list[tuple[int, Any]] = []
    slot = 0  # 2 * layer + (0 attention | 1 mlp)
    for block in craft.blocks:
        is_mlp = isinstance(block, transformers.MLP)
        while (slot % 2 == 1) != is_mlp:
            slot += 1
        placed.append((slot, block))
        slot += 1
    n_layers = placed[-1][0] // 2 + 1
    heads = [list(b.as_multi().heads()) for _, b in placed if not isinstance(b, transformers.MLP)]
    n_heads = max((len(h) for h in heads), default=1)
    d_head = max((max(head.w_qk.matrix.shape) for group in heads for head in group), default=1)
    mlps = [b for _, b in placed if isinstance(b, transformers.MLP)]
    d_mlp = max((m.fst.output_space.num_dims for m in mlps), default=1)
    out_names = [str(direction) for direction in output_space.basis]
    d_model = len(labels)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_head=d_head, n_heads=n_heads, d_mlp=d_mlp,
        d_vocab=len(tokens_space.basis), d_vocab_out=len(out_names), n_ctx=max_seq_len + 1, act_fn="relu",
        normalization_type=None, attention_dir="bidirectional", positional_embedding_type="standard",
        default_prepend_bos=False, device="cpu",
    )
    model = HookedTransformer(cfg)
    state = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    # Token embedding: each token's one-hot direction plus the constant "one" direction tracr relies on.
    token_embed = project(tokens_space, residual)
    if "one" in labels:
        token_embed[:, labels.index("one")] = 1.0
    state["embed.W_E"] = token_embed
    state["pos_embed.W_pos"] = torch.cat([torch.zeros(1, d_model), project(indices_space, residual)])
    state["unembed.W_U"] = project(residual, output_space)
    for slot, block in placed:
        layer = slot // 2
        if isinstance(block, transformers.MLP):
            hidden = block.fst.output_space.num_dims
            fst = torch.tensor(np.asarray(block.fst.matrix), dtype=torch.float32)
            snd = torch.tensor(np.asarray(block.snd.matrix), dtype=torch.float32)
            state[f"blocks.{layer}.mlp.W_in"][:, :hidden] = project(residual, block.fst.input_space) @ fst
            state[f"blocks.{layer}.mlp.W_out"][:hidden] = snd @ project(residual, block.snd.output_space).T
            continue
        for index, head in enumerate(block.as_multi().heads()):
            w_qk = torch.tensor(np.asarray(head.w_qk.matrix), dtype=torch.float32)
            w_ov = torch.tensor(np.asarray(head.w_ov.matrix), dtype=torch.float32)
            key_width, value_width = w_qk.shape[1], w_ov.shape[1]
            attn = f"blocks.{layer}.attn"
            state[f"{attn}.W_Q"][index, :, :key_width] = project(residual, head.w_qk.left_space) @ w_qk
            state[f"{attn}.W_K"][index, :, :key_width] = project(residual, head.w_qk.right_space)
            state[f"{attn}.W_V"][index, :, :value_width] = project(residual, head.w_ov.input_space) @ w_ov
            state[f"{attn}.W_O"][index, :value_width] = project(residual, head.w_ov.output_space).T
    for name, value in model.state_dict().items():
        if "mask" in name or name.endswith("IGNORE"):
            state[name] = value  # buffers (causal mask, -inf constant) stay as built
    model.load_state_dict(state)
    model.cfg.model_name = f"tracr-{program.label}"
    output_values = [direction.value for direction in output_space.basis] if categorical else None
    encoding = {direction.value: index for index, direction in enumerate(tokens_space.basis)}
    return TracrModel(model.eval(), labels, encoding, output_values, program.label, program)
