"""Supernodes: features that write the same direction from the same place and feed the graph alike are one
unit; ablating it through intervene is ablating its members; the export carries it."""

from __future__ import annotations

import torch
from conftest import relu_transcoders

from featcircuits.explain import group_supernodes, intervene
from featcircuits.graph import build_graph, to_circuit_tracer_json
from featcircuits.patching.replacement import ReplacementModel

PROMPT = "Once upon a time, there was a little girl named Lily. She liked to"


def test_a_duplicated_feature_forms_a_supernode_that_ablates_as_one(stories_model):
    transcoders = relu_transcoders(stories_model, d_sae=32, bias=-0.3)
    layer1 = transcoders[1]
    with torch.no_grad():  # feature 1 is feature 0 again, a little weaker: the same thing, twice
        layer1.W_enc[:, 1] = layer1.W_enc[:, 0]
        layer1.b_enc[1] = layer1.b_enc[0] * 1.1
        layer1.W_dec[1] = 0.9 * layer1.W_dec[0]
    rm = ReplacementModel(stories_model, transcoders)
    graph = build_graph(rm, prompt=PROMPT, progress=False)
    both = {p for p in range(graph.clean.n_pos)
            if graph.clean.feature_acts["mlp1"][p, 0] > 0 and graph.clean.feature_acts["mlp1"][p, 1] > 0}
    assert both  # they fire together somewhere
    supernodes = group_supernodes(graph)
    pairs = [s for s in supernodes if {m.split("@")[0] for m in s.members} == {"mlp1:0", "mlp1:1"}]
    assert {int(s.members[0].split("@")[1]) for s in pairs} == both
    assert all(len(s.members) == 2 for s in supernodes)  # nothing else is grouped
    assert all(s.members[0].startswith("mlp1:0@") for s in pairs)  # the stronger one leads
    unit = pairs[0]
    together = intervene(rm, PROMPT, unit.interventions("ablate"))
    by_hand = intervene(rm, PROMPT, {unit.members[0]: 0.0, unit.members[1]: 0.0})
    torch.testing.assert_close(together.logits_after, by_hand.logits_after)
    data = to_circuit_tracer_json(graph, node_threshold=1.0, edge_threshold=1.0, supernodes=supernodes)
    exported = data["qParams"]["supernodes"]
    assert [row[0] for row in exported] == [s.name for s in supernodes]
    pos = unit.members[0].split("@")[1]
    assert [f"1_0_{pos}", f"1_1_{pos}"] in [sorted(row[1:]) for row in exported]
