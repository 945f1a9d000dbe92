"""MIB's head-sender convention on post-norm models (design record 0019), against MIB's definitions.

MIB (EAP-IG's ``eap`` package on a TransformerLens Gemma-2): a head sends ``attn.hook_result``, its
write W_O^h z_h before ``ln1_post``. EAP dots that write's difference with the receiver's input
gradient; exact effects (``evaluate_graph``) feed the receiver ln1_post(a + Δ_h) - ln1_post(a), a the
layer's clean Σ_h W_O^h z_h + b_O. The references below are built from plain hooks on the
``transformers`` model in float64 (``reference.edges.receiver_metric``), not from atpstar's engine.
"""

from __future__ import annotations

import pytest
import torch

import atpstar
from atpstar.cost import Cost
from atpstar.edges.circuit_run import circuit_metric
from atpstar.edges.graph import graph_of
from atpstar.edges.patching import prepare_edges
from atpstar.runner import Run
from reference.edges import POST_NORMS, _ig_points, receiver_metric, receiver_spec, ungrouped_copy
from reference.hooks import _layers
from reference.models import build_hf, load, make_pairs


def mib_senders(ref, tokens):
    """(pre [S, T, D]: input, heads' W_O^h z_h before the norm, MLPs' normalised writes; a: per layer [T, D])."""
    cfg = ref.config
    heads, layers = cfg.num_attention_heads, _layers(ref)
    d_head = cfg.head_dim
    z, a, mlp, embed = {}, {}, {}, {}
    handles = [layers[0].register_forward_pre_hook(lambda m, args: embed.__setitem__(0, args[0]))]
    post_attn, post_mlp = POST_NORMS[cfg.model_type]
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: z.__setitem__(i, args[0])))
        norm = getattr(layer, post_attn)
        handles.append(norm.register_forward_pre_hook(lambda m, args, i=i: a.__setitem__(i, args[0])))
        handles.append(getattr(layer, post_mlp).register_forward_hook(lambda m, args, o, i=i: mlp.__setitem__(i, o)))
    try:
        with torch.no_grad():
            ref(tokens[None])
    finally:
        for handle in handles:
            handle.remove()
    rows = [embed[0][0]]
    for i, layer in enumerate(layers):
        w = layer.self_attn.o_proj.weight.T  # [H*E, D]
        rows += [z[i][0, :, h * d_head : (h + 1) * d_head] @ w[h * d_head : (h + 1) * d_head] for h in range(heads)]
        rows.append(mlp[i][0])
    return torch.stack(rows), [a[i][0] for i in range(len(layers))]


def mib_references(hf_model, pairs, graph):
    """{"exact", "eap", "eap_ig"} [P, N] by MIB's definitions (EAP-IG: ``IG_STEPS`` input points)."""
    ref = ungrouped_copy(hf_model)
    layers, post_attn = _layers(ref), POST_NORMS[ref.config.model_type][0]
    names, senders = graph.edge_names, graph.sender_index.tolist()
    receivers = [receiver_spec(graph.receiver_names[r]) for r in graph.receiver_index.tolist()]
    exact, eap, eap_ig = [], [], []
    for p in range(pairs.n_pairs):
        base_pre, base_a = mib_senders(ref, pairs.clean[p])
        source_pre, _ = mib_senders(ref, pairs.noise[p])
        delta = source_pre - base_pre  # [S, T, D]
        through = delta.clone()  # a head's change as its receivers read it: ln(a + Δ_h) - ln(a)
        with torch.no_grad():
            for layer in range(graph.n_layers):
                norm = getattr(layers[layer], post_attn)
                for head in range(graph.n_heads):
                    s = graph.head_sender(layer, head)
                    through[s] = norm(base_a[layer] + delta[s]) - norm(base_a[layer])
        answer, distractor = pairs.answer[p : p + 1], pairs.distractor[p : p + 1]
        args = (ref, pairs.clean[p], answer, distractor, pairs.metric, receivers)
        with torch.no_grad():
            zero = receiver_metric(*args, torch.zeros(len(names), *delta.shape[1:], dtype=delta.dtype))
            exact.append(receiver_metric(*args, through[senders]) - zero)
        points = [None, *_ig_points(ref, pairs.clean[p], pairs.noise[p], IG_STEPS)]
        grads = []
        for hidden0 in points:  # the base run, then EAP-IG's points
            eps = torch.zeros(len(names), dtype=delta.dtype, requires_grad=True)
            value = receiver_metric(*args, eps[:, None, None] * delta[senders], hidden0=hidden0)
            grads.append(torch.autograd.grad(value.sum(), eps)[0])
        eap.append(grads[0])
        eap_ig.append(torch.stack(grads[1:]).mean(0))
    return {"exact": torch.stack(exact), "eap": torch.stack(eap), "eap_ig": torch.stack(eap_ig)}


IG_STEPS = 3


@pytest.fixture(scope="module", params=("gemma2",))
def gemma(request):
    hf_model = build_hf(request.param, n_layers=2, seed=11)
    model = load(hf_model)
    pairs = make_pairs(n_pairs=2, seq_len=6, seed=12)
    graph = graph_of(model, "mib")
    return hf_model, model, pairs, graph, mib_references(hf_model, pairs, graph)


def test_exact_edge_effects_follow_mibs_definition(gemma):
    _, model, pairs, graph, want = gemma
    got = atpstar.attribute(model, pairs, method="activation_patching", nodes=["edge"], edge_convention="mib")
    assert torch.allclose(got.per_pair["edge"].double(), want["exact"], rtol=1e-9, atol=1e-11)
    assert got.edge_graph().convention == "mib"


def test_eap_and_eap_ig_senders_are_mibs(gemma):
    _, model, pairs, graph, want = gemma
    got = atpstar.attribute(model, pairs, method="atp", nodes=["edge"], edge_convention="mib")
    assert torch.allclose(got.per_pair["edge"].double(), want["eap"], rtol=1e-8, atol=1e-10)
    own = atpstar.attribute(model, pairs, method="atp", nodes=["edge"]).per_pair["edge"].double()
    heads = torch.tensor([name.startswith("a") for name in graph.edge_names])
    inputs_and_mlps = ~heads  # only head senders differ between the conventions
    assert torch.allclose(own[:, inputs_and_mlps], want["eap"][:, inputs_and_mlps], rtol=1e-8, atol=1e-10)
    assert not torch.allclose(own[:, heads], want["eap"][:, heads], rtol=1e-3)
    ig = atpstar.attribute(model, pairs, method="atp+ig", nodes=["edge"], edge_convention="mib", ig_steps=IG_STEPS)
    assert torch.allclose(ig.per_pair["edge"].double(), want["eap_ig"], rtol=1e-8, atol=1e-10)


def test_all_edges_of_a_head_absent_is_patching_the_head(gemma):
    """Under MIB's convention a head's outgoing edges all absent = its z patched to the source run."""
    _, model, pairs, graph, _ = gemma
    cache = prepare_edges(model, graph, pairs, "noising", Cost())
    source = cache.base_senders + cache.delta
    sender = graph.head_sender(0, 1)
    absent = torch.zeros(pairs.n_pairs, graph.n_senders, graph.n_receivers, dtype=torch.bool)
    absent[:, sender] = graph.valid[sender]
    got = circuit_metric(model, cache, source, torch.arange(pairs.n_pairs), absent, Cost())
    noise_run = Run(model.n_layers, record=("z",))
    with torch.no_grad():
        model.run_layers(model.embed(pairs.noise), noise_run)
    noise_z = noise_run.get("z", 0)

    def patch(layer, site, x, run):
        if layer == 0 and site == "z":
            x = x.clone()
            x[:, 1] = noise_z[:, 1]
        return x

    with torch.no_grad():
        final = model.run_layers(model.embed(pairs.clean), Run(model.n_layers, patch=patch))
        want = pairs.evaluate_metric(model.unembed(final[:, -1]), torch.arange(pairs.n_pairs))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    every = graph.valid[None].expand(pairs.n_pairs, -1, -1)
    with torch.no_grad():
        final = model.run_layers(model.embed(pairs.noise), Run(model.n_layers))
        noise_metric = pairs.evaluate_metric(model.unembed(final[:, -1]), torch.arange(pairs.n_pairs))
    all_absent = circuit_metric(model, cache, source, torch.arange(pairs.n_pairs), every, Cost())
    assert torch.allclose(all_absent, noise_metric, rtol=1e-10, atol=1e-10)


def test_conventions_agree_without_a_post_norm():
    model = load(build_hf("llama", n_layers=2, seed=3))
    pairs = make_pairs(n_pairs=2, seq_len=6, seed=4)
    own = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    mib = atpstar.attribute(model, pairs, method="atp", nodes=["edge"], edge_convention="mib")
    assert torch.equal(own.per_pair["edge"], mib.per_pair["edge"])
    assert "convention" not in mib.info["edge_graph"]


def test_to_mib_refuses_the_other_convention(gemma, tmp_path):
    _, model, pairs, _, _ = gemma
    own = atpstar.attribute(model, pairs, method="atp", nodes=["edge"])
    with pytest.raises(atpstar.errors.InputError, match="edge_convention='mib'"):
        own.to_mib(tmp_path / "c.json")
    own.to_mib(tmp_path / "c.json", convention="atpstar")
    with pytest.raises(atpstar.errors.InputError, match="unknown edge_convention"):
        atpstar.attribute(model, pairs, method="atp", nodes=["edge"], edge_convention="tl")


@pytest.mark.parametrize("receiver", ["logits", "a1.h0<q>", "m1"])
def test_heads_of_one_layer_absent_together_pass_the_norm_once(gemma, receiver):
    """Two heads of layer 0 and m0 absent from one receiver: it reads ln(a + Δ_1 + Δ_2) - ln(a) + Δ_m0
    (MIB's ``evaluate_graph``), not the sum of the heads' separate effects."""
    hf_model, model, pairs, graph, _ = gemma
    names = graph.edge_names
    chosen = [names.index(f"{s}->{receiver}") for s in ("a0.h1", "a0.h2", "m0")]
    absent = torch.zeros(pairs.n_pairs, graph.n_senders, graph.n_receivers, dtype=torch.bool)
    for e in chosen:
        absent[:, graph.sender_index[e], graph.receiver_index[e]] = True
    cache = prepare_edges(model, graph, pairs, "noising", Cost())
    got = circuit_metric(model, cache, cache.base_senders + cache.delta, torch.arange(pairs.n_pairs), absent, Cost())
    ref = ungrouped_copy(hf_model)
    norm = getattr(_layers(ref)[0], POST_NORMS["gemma2"][0])
    for p in range(pairs.n_pairs):
        base_pre, base_a = mib_senders(ref, pairs.clean[p])
        source_pre, _ = mib_senders(ref, pairs.noise[p])
        delta = source_pre - base_pre
        heads = delta[graph.head_sender(0, 1)] + delta[graph.head_sender(0, 2)]
        with torch.no_grad():
            shift = norm(base_a[0] + heads) - norm(base_a[0]) + delta[graph.mlp_sender(0)]
            args = (ref, pairs.clean[p], pairs.answer[p : p + 1], pairs.distractor[p : p + 1], pairs.metric)
            want = receiver_metric(*args, [receiver_spec(receiver)], shift[None])
        assert torch.allclose(got[p : p + 1], want, rtol=1e-10, atol=1e-10)
