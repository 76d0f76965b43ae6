"""Interventions by node id, against hand-written TransformerLens hooks on stories260k."""

from __future__ import annotations

import pytest
import torch
from conftest import relu_transcoders

from featcircuits.cli import main
from featcircuits.explain import Scale, generate, intervene, measure_node_effects
from featcircuits.graph import build_graph
from featcircuits.patching.replacement import ReplacementModel

PROMPT = "Once upon a time, there was a little dog named Tim. Tim liked to"


@pytest.fixture(scope="module")
def rm(stories_model):
    return ReplacementModel(stories_model, relu_transcoders(stories_model, d_sae=96, bias=-0.3))


def _site_hooks(rm, layer: int, edit):
    """Hooks replacing MLP ``layer``'s output by ``edit(reconstruction, error, acts, dictionary)``."""
    d = rm.site(f"mlp{layer}").dictionary
    store = {}

    def read(x, hook):
        store["x"] = x
        return x

    def write(out, hook):
        acts = d.encode(store["x"])
        recon = d.decode(acts)
        return edit(recon, out - recon, acts, d)

    return [(f"blocks.{layer}.ln2.hook_normalized", read), (f"blocks.{layer}.hook_mlp_out", write)]


@torch.no_grad()
def test_setting_a_feature_matches_a_hand_written_hook(rm, stories_model):
    tokens = rm.to_tokens(PROMPT)
    acts = rm.clean_run(tokens).feature_acts["mlp2"]
    pos, feature = 7, int(acts[7].argmax())

    def edit(recon, error, acts, d):
        changed = acts.clone()
        changed[:, pos, feature] = 4.0
        return d.decode(changed) + error

    expected = stories_model.run_with_hooks(tokens[None], fwd_hooks=_site_hooks(rm, 2, edit))[0, -1]
    result = intervene(rm, PROMPT, {f"mlp2:{feature}@{pos}": 4.0})
    torch.testing.assert_close(result.logits_after, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.logits_before, stories_model(tokens[None])[0, -1], atol=1e-4, rtol=0)
    assert (result.logits_after - result.logits_before).abs().max() > 1e-3
    assert len(result.top_after) == 5 and abs(sum(p for _, p in result.top_before)) <= 1.0


@torch.no_grad()
def test_ablating_an_error_node_and_scaling_a_head_match_hand_written_hooks(rm, stories_model):
    tokens = rm.to_tokens(PROMPT)

    def drop_error(recon, error, acts, d):
        error = error.clone()
        error[:, 5] = 0
        return recon + error

    def double_head(z, hook):
        z = z.clone()
        z[:, :, 3] *= 2
        return z

    hooks = _site_hooks(rm, 1, drop_error) + [("blocks.3.attn.hook_z", double_head)]
    expected = stories_model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1]
    result = intervene(rm, PROMPT, {"mlp1:error@5": "ablate", "L3.H3": "*2"})
    torch.testing.assert_close(result.logits_after, expected, atol=1e-4, rtol=0)
    # the same head intervention on the plain model
    plain = intervene(stories_model, PROMPT, {"L3.H3": Scale(2.0)})
    head_only = stories_model.run_with_hooks(tokens[None], fwd_hooks=[("blocks.3.attn.hook_z", double_head)])[0, -1]
    torch.testing.assert_close(plain.logits_after, head_only, atol=1e-4, rtol=0)


@torch.no_grad()
def test_generation_clamps_a_feature_at_every_new_position(rm, stories_model):
    feature = int(rm.clean_run(rm.to_tokens(PROMPT)).feature_acts["mlp3"].sum(0).argmax())
    result = generate(rm, PROMPT, {f"mlp3:{feature}": 0.0}, max_new_tokens=6)

    def ablate(recon, error, acts, d):
        changed = acts.clone()
        changed[..., feature] = 0
        return d.decode(changed) + error

    tokens = rm.to_tokens(PROMPT)
    for _ in range(6):  # by hand: the feature off at every position, the new ones included
        logits = stories_model.run_with_hooks(tokens[None], fwd_hooks=_site_hooks(rm, 3, ablate))[0, -1]
        tokens = torch.cat([tokens, logits.argmax()[None]])
    assert result.tokens_after == tokens[-6:].tolist()
    plain = stories_model.generate(PROMPT, max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens")
    assert result.tokens_before == plain[0, -6:].tolist()
    assert isinstance(result.text_after, str)


def test_node_effects_are_the_measured_change_of_each_target(rm):
    graph = build_graph(rm, prompt=PROMPT, targets=[281, 410], progress=False)
    effects = measure_node_effects(graph, n_nodes=6)
    assert len(effects) == 6 and graph.node_effects is effects
    node_id, measured = next(iter(effects.items()))
    result = intervene(rm, graph.tokens, {node_id: "ablate"})
    for target, value in zip(graph.targets, measured, strict=True):
        before = result.logits_before[target.token] - result.logits_before.mean()
        after = result.logits_after[target.token] - result.logits_after.mean()
        assert float(after - before) == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize(("interventions", "message"), [
    ({"mlp9:3@1": 0.0}, "No site 'mlp9'"),
    ({"mlp2:4000@1": 0.0}, "outside mlp2's 96 features"),
    ({"mlp2:3@1": float("nan")}, "is not finite"),
    ({"mlp2:3@1": "double"}, "is not a number, 'ablate' or a scale"),
    ({"mlp2:3@99": 1.0}, "outside the"),
    ({"L7.H0": "ablate"}, "No component 'L7.H0'"),
    ({"embed@0": "ablate"}, "Cannot intervene on 'embed@0'"),
    ({"mlp2:x": 1.0}, "is not a node id"),
])
def test_bad_interventions_are_named(rm, interventions, message):
    with pytest.raises(ValueError, match=message):
        intervene(rm, PROMPT, interventions)


def test_steer_command_prints_before_and_after(stories_path, tmp_path, capsys, rm):
    folder = tmp_path / "tc"
    for site in rm.sites:
        if site.dictionary is not None:
            site.dictionary.save(str(folder / site.dictionary.cfg.hook_in))
    code = main(["steer", "--model", str(stories_path), "--dictionaries", str(folder), "--prompt", PROMPT,
                 "--set", "mlp2:3=*0", "--set", "L3.H3=*2", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "next token before:" in out and "continuation after:" in out
    assert main(["steer", "--model", str(stories_path), "--prompt", PROMPT, "--set", "mlp2:3"]) == 2
    assert "write NODE=SPEC" in capsys.readouterr().err
