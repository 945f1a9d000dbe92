"""feature_circuit: the graph it builds, its JSON, and its weights against the edge functions."""

from __future__ import annotations

import json

import pytest
import torch

from atpstar import load_dictionary
from atpstar.errors import InputError
from atpstar.features import FeatureCircuit, feature_circuit
from atpstar.testing.fixtures import write_circuit_tracer
from features.test_latent_edges import HOOKS, random_saes
from reference.models import build_hf, load, make_pairs


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model = load(build_hf("llama", n_layers=3))
    dicts = random_saes(tmp_path_factory.mktemp("circuit"), model.d_model)
    return model, make_pairs(n_pairs=2, seq_len=5), dicts


@pytest.mark.parametrize("method", ["atp", "exact"])
def test_circuit_graph_and_json(case, method, tmp_path):
    model, pairs, dicts = case
    circuit = feature_circuit(model, pairs, list(reversed(dicts)), k=3, method=method)
    data = json.loads(circuit.to_json())
    assert data["format"] == "atpstar.feature_circuit" and data["method"] == method
    assert [d["hook"] for d in data["dictionaries"]] == list(HOOKS)  # forward order
    latents = [n for n in data["nodes"] if n["id"] != "metric"]
    assert len(latents) == 3 * len(HOOKS)
    assert all(set(n) == {"id", "dictionary", "hook", "layer", "index", "position", "score"} for n in data["nodes"])
    ids = {n["id"] for n in data["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in data["edges"])
    assert len(data["edges"]) == 3 * 3 * (len(HOOKS) - 1) + 3  # consecutive pairs, then the last to the metric
    to_metric = {e["source"]: e["weight"] for e in data["edges"] if e["target"] == "metric"}
    assert to_metric == {n["id"]: n["score"] for n in latents if n["hook"] == HOOKS[-1]}
    assert circuit.cost.forward > 0
    loaded = FeatureCircuit.load(circuit.save(tmp_path / "circuit.json"))
    assert loaded.data == circuit.data


def test_exact_scores_are_ranked_by_size(case):
    model, pairs, dicts = case
    circuit = feature_circuit(model, pairs, dicts, k=4, method="exact", candidates=12)
    first = [abs(n["score"]) for n in circuit.nodes if n["hook"] == HOOKS[0]]
    assert first == sorted(first, reverse=True) and first[0] > 0
    assert torch.isfinite(torch.tensor([e["weight"] for e in circuit.edges])).all()


def test_bad_arguments(case, tmp_path):
    model, pairs, dicts = case
    with pytest.raises(InputError, match="method"):
        feature_circuit(model, pairs, dicts, method="ig")
    with pytest.raises(InputError, match="at least one dictionary"):
        feature_circuit(model, pairs, [])
    with pytest.raises(InputError, match="k must be"):
        feature_circuit(model, pairs, dicts, k=0)
    other = random_saes(tmp_path, model.d_model + 8, HOOKS[:1])
    with pytest.raises(InputError, match="d_in 40"):
        feature_circuit(model, pairs, other)
    transcoder = load_dictionary(write_circuit_tracer(tmp_path / "tc", [1], model.d_model, 4), layer=1)
    with pytest.raises(InputError, match="transcoder"):
        feature_circuit(model, pairs, [transcoder])


def test_drawing_carries_the_json(case, tmp_path):
    import re

    from atpstar.features.draw import circuit_section, write_html

    model, pairs, dicts = case
    circuit = feature_circuit(model, pairs, dicts, k=2)
    section = circuit_section(circuit.data)
    assert section.count("<circle") == 2 * len(HOOKS) and section.count("<line") == len(circuit.edges)
    embedded = re.search(r'class="atpstar-feature-circuit">(.*)</script>', section, re.S)
    assert embedded is not None and json.loads(embedded.group(1).replace("<\\/", "</")) == circuit.data
    assert "<svg" in write_html(circuit.data, tmp_path / "c.html").read_text()
