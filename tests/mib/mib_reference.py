"""A small re-implementation of MIB's circuit loader and evaluation, written from MIB's definitions.

It uses nothing of atpstar: the graph is built as EAP-IG's ``Graph.from_model`` builds it, files are read
as ``Graph.from_json`` / ``Graph.from_pt`` read them, circuits are chosen by ``apply_topn`` and ``prune``,
and ``evaluate_graph`` runs a float64 GPT-2 forward written out by hand from the ``transformers``
weights, with TransformerLens' split q/k/v inputs: every receiver reads its current residual input
plus Σ over its absent edges of (corrupted sender - current sender). ``area_under_curve`` is MIB's
``evaluate_area_under_curve`` (linear fractions) and ``multifile_curve`` its 9-circuit variant.

Matrices are [n_forward, n_backward] as in EAP-IG (forward: input, then per layer a{l}.h0.. and m{l};
backward: per layer q of every head, k, v, then m{l}; last logits).
"""

from __future__ import annotations

import json
import math
import os

import torch

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)


class MibGraph:
    """EAP-IG's graph: scores, in_graph, real_edge_mask, forward_to_backward, edge names -> matrix index."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = dict(cfg)
        n_layers, n_heads = cfg["n_layers"], cfg["n_heads"]
        self.n_forward = 1 + n_layers * (n_heads + 1)
        self.n_backward = n_layers * (3 * n_heads + 1) + 1
        self.scores = torch.zeros(self.n_forward, self.n_backward, dtype=torch.float64)
        self.in_graph = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        self.real = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        self.nodes_in_graph = torch.zeros(self.n_forward, dtype=torch.bool)
        self.f2b = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool)
        self.edges: dict[str, tuple[int, int]] = {}
        self.fwd = {"input": 0}
        residual = ["input"]
        for layer in range(n_layers):
            attn = [f"a{layer}.h{h}" for h in range(n_heads)]
            for h, name in enumerate(attn):
                self.fwd[name] = 1 + layer * (n_heads + 1) + h
                for i in range(3):
                    self.f2b[self.fwd[name], self.qkv_index(layer, i, h)] = True
            self.fwd[f"m{layer}"] = 1 + layer * (n_heads + 1) + n_heads
            self.f2b[self.fwd[f"m{layer}"], self.mlp_index(layer)] = True
            if cfg["parallel_attn_mlp"]:
                for node in residual:
                    self._add_attention_edges(node, layer, attn)
                    self._add(node, f"m{layer}", self.mlp_index(layer))
                residual += attn + [f"m{layer}"]
            else:
                for node in residual:
                    self._add_attention_edges(node, layer, attn)
                residual += attn
                for node in residual:
                    self._add(node, f"m{layer}", self.mlp_index(layer))
                residual.append(f"m{layer}")
        for node in residual:
            self._add(node, "logits", self.n_backward - 1)

    def qkv_index(self, layer: int, i: int, head: int) -> int:
        return layer * (3 * self.cfg["n_heads"] + 1) + i * self.cfg["n_heads"] + head

    def mlp_index(self, layer: int) -> int:
        return layer * (3 * self.cfg["n_heads"] + 1) + 3 * self.cfg["n_heads"]

    def _add_attention_edges(self, node: str, layer: int, attn: list[str]) -> None:
        for h, child in enumerate(attn):
            for i, letter in enumerate("qkv"):
                self._add(node, f"{child}<{letter}>", self.qkv_index(layer, i, h))

    def _add(self, parent: str, child: str, backward: int) -> None:
        index = (self.fwd[parent], backward)
        self.edges[f"{parent}->{child}"] = index
        self.real[index] = True

    # circuits ---------------------------------------------------------------------------------
    def apply_topn(self, n: int, absolute: bool) -> None:
        self.nodes_in_graph[:] = False
        self.in_graph[:] = False
        scores = self.scores.abs() if absolute else self.scores.clone()
        scores[~self.real] = -math.inf
        order = torch.argsort(scores.flatten(), descending=True, stable=True)
        self.in_graph.view(-1)[order[:n]] = True
        out = self.in_graph.any(1)
        inn = (self.in_graph.any(0).double() @ self.f2b.double().T) > 0
        inn[0] = True
        self.nodes_in_graph |= out & inn
        self.prune()

    def prune(self) -> None:
        while True:
            old_nodes, old_edges = self.nodes_in_graph.clone(), self.in_graph.clone()
            out = self.in_graph.any(1)
            inn = (self.in_graph.any(0).double() @ self.f2b.double().T) > 0
            inn[0] = True
            self.nodes_in_graph[:] = out & inn
            backward = (self.nodes_in_graph.double() @ self.f2b.double()) > 0
            backward[-1] = True
            self.in_graph &= self.nodes_in_graph[:, None] & backward[None, :]
            if torch.equal(old_nodes, self.nodes_in_graph) and torch.equal(old_edges, self.in_graph):
                return

    def circuit_names(self) -> set[str]:
        return {name for name, index in self.edges.items() if bool(self.in_graph[index])}


def load_json(path: str) -> MibGraph:
    data = json.loads(open(path).read())
    assert all(k in data for k in ("cfg", "nodes", "edges")), "Bad input JSON format - Missing keys"
    graph = MibGraph(data["cfg"])
    for name, node in data["nodes"].items():
        if name != "logits":
            graph.nodes_in_graph[graph.fwd[name]] = node["in_graph"]
    for name, info in data["edges"].items():
        graph.scores[graph.edges[name]] = info["score"]
        graph.in_graph[graph.edges[name]] = info["in_graph"]
    return graph


def load_pt(path: str) -> MibGraph:
    data = torch.load(path, weights_only=False)
    required = ["cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph"]
    assert all(k in data for k in required), f"missing {set(required) - set(data)}"
    graph = MibGraph(data["cfg"])
    graph.in_graph[:] = data["edges_in_graph"]
    graph.scores[:] = data["edges_scores"].double()
    graph.nodes_in_graph[:] = data["nodes_in_graph"]
    return graph


def load_circuit(path: str) -> MibGraph:
    return load_json(path) if path.endswith(".json") else load_pt(path)


# evaluation: GPT-2 by hand ----------------------------------------------------------------------
def _senders_and_logits(hf, tokens: torch.Tensor, graph: MibGraph, diff: torch.Tensor | None, absent: torch.Tensor):
    """Run GPT-2 on tokens [B, T]; with ``diff`` (corrupted senders [B, F, T, D]) every receiver adds
    Σ_absent (corrupted - current) of its upstream senders. Returns (senders [B, F, T, D], last logits [B, V])."""
    tr = hf.transformer
    cfg = hf.config
    heads, d = cfg.n_head, cfg.n_embd
    e = d // heads
    b, t = tokens.shape
    senders = torch.zeros(b, graph.n_forward, t, d, dtype=torch.float64)
    senders[:, 0] = tr.wte.weight[tokens]
    x = senders[:, 0] + tr.wpe.weight[torch.arange(t)][None]
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    def update(backward: int) -> torch.Tensor:
        if diff is None:
            return torch.zeros(b, t, d, dtype=torch.float64)
        w = absent[:, backward].double()  # [F] which upstream senders are absent from this receiver
        return torch.einsum("f,bftd->btd", w, diff - senders)

    for layer, block in enumerate(tr.h):
        w_qkv, b_qkv = block.attn.c_attn.weight, block.attn.c_attn.bias  # [D, 3D], [3D]
        results = []
        for h in range(heads):
            qkv = []
            for i in range(3):
                inp = block.ln_1(x + update(graph.qkv_index(layer, i, h)))
                cols = slice(i * d + h * e, i * d + (h + 1) * e)
                qkv.append(inp @ w_qkv[:, cols] + b_qkv[cols])  # [B, T, E]
            scores = qkv[0] @ qkv[1].transpose(1, 2) / math.sqrt(e)
            scores = scores.masked_fill(~causal, -math.inf)
            z = torch.softmax(scores, -1) @ qkv[2]
            result = z @ block.attn.c_proj.weight[h * e : (h + 1) * e]  # [B, T, D] hook_result
            senders[:, 1 + layer * (heads + 1) + h] = result
            results.append(result)
        x = x + sum(results) + block.attn.c_proj.bias
        mlp_in = x + update(graph.mlp_index(layer))
        out = block.mlp(block.ln_2(mlp_in))
        senders[:, 1 + layer * (heads + 1) + heads] = out
        x = x + out
    final = x + update(graph.n_backward - 1)
    logits = hf.lm_head(tr.ln_f(final))[:, -1]
    return senders, logits


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor) -> torch.Tensor:
    """MIB's ``logit_diff(mean=False, loss=False)`` at the last position: [B]."""
    return logits.gather(1, answer[:, None])[:, 0] - logits.gather(1, distractor[:, None])[:, 0]


def evaluate_graph(hf, graph: MibGraph, clean, corrupted, answer, distractor) -> torch.Tensor:
    """Per-item metric of the circuit: edges not in the graph get their corrupted value ([B])."""
    graph.prune()
    absent = graph.real & ~graph.in_graph
    with torch.no_grad():
        corrupted_senders, _ = _senders_and_logits(hf, corrupted, graph, None, absent)
        _, logits = _senders_and_logits(hf, clean, graph, corrupted_senders, absent)
    return logit_diff(logits, answer, distractor)


def _areas(faithfulness: list[float]) -> tuple[float, float]:
    under = from_1 = 0.0
    for i in range(len(faithfulness) - 1):
        width = FRACTIONS[i + 1] - FRACTIONS[i]
        from_1 += width * (abs(1.0 - faithfulness[i]) + abs(1.0 - faithfulness[i + 1])) / 2
        under += width * (faithfulness[i] + faithfulness[i + 1]) / 2
    return under, from_1


def _baselines(hf, graph: MibGraph, data) -> tuple[float, float]:
    clean, corrupted, answer, distractor = data
    with torch.no_grad():
        _, logits = _senders_and_logits(hf, clean, graph, None, graph.real)
    baseline = float(logit_diff(logits, answer, distractor).mean())
    empty = MibGraph(graph.cfg)
    empty.apply_topn(0, True)
    return baseline, float(evaluate_graph(hf, empty, *data).mean())


def area_under_curve(hf, graph: MibGraph, data, absolute: bool) -> dict:
    """MIB's ``evaluate_area_under_curve`` on one batch of data = (clean, corrupted, answer, distractor)."""
    baseline, corrupted = _baselines(hf, graph, data)
    faithfulness, counts, circuits = [], [], []
    for pct in FRACTIONS:
        graph.apply_topn(int(pct * len(graph.edges)), absolute)
        counts.append(int(graph.in_graph.sum()))
        circuits.append(graph.circuit_names())
        score = float(evaluate_graph(hf, graph, *data).mean())
        faithfulness.append((score - corrupted) / (baseline - corrupted))
    under, from_1 = _areas(faithfulness)
    return {"weighted_edge_counts": counts, "area_under": under, "area_from_1": from_1,
            "faithfulnesses": faithfulness, "circuits": circuits}


def multifile_curve(hf, folder: str, data) -> dict:
    """MIB's ``evaluate_area_under_curve_multifile``: up to 9 circuit files, sorted by edge count, then
    (every edge, f = 1)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith((".json", ".pt")))[:9]
    graphs = [load_circuit(os.path.join(folder, f)) for f in files]
    baseline, corrupted = _baselines(hf, graphs[0], data)
    points = []
    for graph in graphs:
        count = int(graph.in_graph.sum())
        score = float(evaluate_graph(hf, graph, *data).mean())
        points.append((count, (score - corrupted) / (baseline - corrupted)))
    points.sort()
    counts = [c for c, _ in points] + [len(graphs[0].edges)]
    faithfulness = [f for _, f in points] + [1.0]
    under, from_1 = _areas(faithfulness)
    return {"weighted_edge_counts": counts, "area_under": under, "area_from_1": from_1, "faithfulnesses": faithfulness}
