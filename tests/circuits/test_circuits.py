"""Circuits: tasks, attribution patching, planted circuits, supernodes, graph JSON, the callback."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from helpers.neuronpedia import schema_errors

from saeot.circuits import (
    ERROR,
    CircuitGraph,
    DigitAdditionTask,
    IOITask,
    JsonlTask,
    NodeRef,
    PromptPair,
    PromptsTask,
    SVATask,
    attribute_edges,
    attribute_nodes,
    compress_graph,
    exact_node_effects,
    load_graph,
    save_graph,
    select_nodes,
)
from saeot.circuits.curves import curve_counts
from saeot.circuits.grouping import attribution_profiles, cosine_distances, random_partition_distances
from saeot.circuits.scoring import CircuitScore, coherence, feature_means, pearson, score_circuit
from saeot.circuits.supernodes import agglomerate, decoder_cosine_distances, semantic_distances
from saeot.circuits.tasks import TaskError, clean_accuracy
from saeot.models import ByteCodec, LanguageModel
from saeot.transport import ExactW2
from saeot.types import FeatureSamples

H0, H1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (tests/conftest.py)


# ----------------------------------------------------------------------------- helpers
class WordCodec:
    """Every whitespace-separated word (with its leading space) is one token."""

    bos_token_id = 0
    vocab_size = 10_000

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text):
        import re

        out = []
        for w in re.findall(r" ?[^ ]+", text):
            out.append(self.ids.setdefault(w, len(self.ids) + 1))
        return out

    def decode(self, ids):
        inv = {v: k for k, v in self.ids.items()}
        return "".join(inv.get(int(i), "") for i in ids)


def _sae(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: float = 0.0):
    from sae_lens import StandardSAE, StandardSAEConfig

    d, F = W_enc.shape
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=F))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.fill_(b_enc)
        sae.b_dec.zero_()
    sae.requires_grad_(False)
    return sae.eval()


def _random_saes(d: int, F: int, hooks, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {h: _sae(torch.randn(d, F, generator=g) / d ** 0.5, torch.randn(F, d, generator=g) / 3) for h in hooks}


def _byte_pairs(n: int, seed: int = 0) -> list[PromptPair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        s = "".join(rng.choice("abcdefgh") for _ in range(rng.choice([5, 6])))
        pairs.append(PromptPair(s + "x", s + "y", "p", "q"))
    return pairs


def _linear_readout_lm():
    """Random 2-layer model without normalisation: the logits are linear in blocks.1.hook_resid_post."""
    from saeot.models import load_tiny_random

    return load_tiny_random(n_layers=2, d_model=24, n_heads=2, d_head=12, d_mlp=48, n_ctx=32, seed=3,
                            normalization_type=None)


# Planted model: embeddings + unembedding only (blocks zeroed), so every hook sees the same
# hidden state. Token "A" writes 3 u0 (+ 1 u2, which nothing reads, + 0.3 u4); token "B" writes
# 3 u1. The answer "x" reads 2.5 u0 + 0.5 u4, "y" reads 2 u1. The SAE at both hooks has feature k
# reading/writing u_k, so features 0 and 1 carry the answer, feature 4 a little, feature 2 nothing.
D_PLANT, F_PLANT = 16, 12


def _planted():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(D_PLANT, D_PLANT, generator=g, dtype=torch.float64))
    Q = Q.float()
    cfg = HookedTransformerConfig(n_layers=2, d_model=D_PLANT, n_heads=2, d_head=8, d_mlp=32, n_ctx=32,
                                  d_vocab=257, act_fn="relu", normalization_type=None, device="cpu")
    model = HookedTransformer(cfg, move_to_device=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        rest = Q[:, 5:]
        model.W_E.copy_(torch.rand(257, rest.shape[1], generator=g) @ rest.T)  # generic tokens: other directions
        model.W_E[ord("A")] = 3 * Q[:, 0] + Q[:, 2] + 0.3 * Q[:, 4]
        model.W_E[ord("B")] = 3 * Q[:, 1]
        model.W_U[:, ord("x")] = 2.5 * Q[:, 0] + 0.5 * Q[:, 4]
        model.W_U[:, ord("y")] = 2 * Q[:, 1]
    model.eval().requires_grad_(False)
    lm = LanguageModel(model=model, codec=ByteCodec(), name="planted")
    # a small negative encoder bias keeps inactive features strictly below the ReLU kink
    saes = {h: _sae(Q[:, :F_PLANT].clone(), Q[:, :F_PLANT].T.clone(), b_enc=-1e-3) for h in (H0, H1)}
    rng = random.Random(1)
    pairs = []
    for i in range(12):  # half the prompts end in A (answer x), half in B (answer y)
        s = "".join(rng.choice("cdefgh") for _ in range(rng.choice([4, 5, 6])))
        pairs.append(PromptPair(s + "A", s + "B", "x", "y") if i % 2 == 0 else PromptPair(s + "B", s + "A", "y", "x"))
    return lm, saes, PromptsTask(pairs, name="planted")


def _planted_samples():
    """Feature distributions in a 3-d 'reference space': feature 0 has the same distribution at
    both hooks, so has feature 1 (far from 0); the others are spread at random. Samples of
    feature 0 sit on token 'A', of feature 1 on 'B'."""
    g = torch.Generator().manual_seed(5)
    K, r = 6, 3
    base = torch.randn(F_PLANT, K, r, generator=g) * 0.3 + torch.randn(F_PLANT, 1, r, generator=g) * 4
    out = {}
    for i, h in enumerate((H0, H1)):
        pts = base.clone()
        pts[2:] += torch.randn(F_PLANT - 2, 1, r, generator=g) * 3 * (i + 1)  # others differ per hook
        w = torch.full((F_PLANT, K), 1.0 / K)
        tok = torch.randint(97, 105, (F_PLANT, K), generator=g)
        tok[0], tok[1] = ord("A"), ord("B")
        out[h] = FeatureSamples(hook=h, points=pts, weights=w, n_fire=torch.full((F_PLANT,), K), act_sum=torch.ones(F_PLANT),
                                act_max=torch.ones(F_PLANT), n_tokens=100, token_ids=tok,
                                locations=torch.zeros(F_PLANT, K, 2, dtype=torch.long), activations=w.clone())
    return out


# ----------------------------------------------------------------------------- tasks
def test_task_builders_give_single_token_answers_and_equal_lengths():
    lm = SimpleNamespace(codec=WordCodec(), name="words")
    for task in (IOITask(n_prompts=40, seed=1), SVATask(n_prompts=40, seed=2)):
        data = task.build(lm)
        assert data.n == 40 and not data.dropped
        for p, c, k, a, w in zip(data.pairs, data.clean, data.corrupted, data.correct, data.wrong):
            assert len(c) == len(k) and c[0] == 0  # BOS first
            assert lm.codec.encode(p.correct) == [int(a)] and lm.codec.encode(p.wrong) == [int(w)]
            assert int(a) != int(w) and p.clean != p.corrupted
    ioi = IOITask(n_prompts=40, seed=1).pairs()
    for p in ioi:  # clean: the answer (IO) is named once, S twice; corrupted: the other way round
        io, s = p.correct.strip(), p.wrong.strip()
        assert (p.clean.split().count(io), p.clean.replace(",", " ").split().count(s)) == (1, 2)
        assert (p.corrupted.replace(",", " ").split().count(io), p.corrupted.split().count(s)) == (2, 1)
    sva = SVATask(n_prompts=40, seed=2).pairs()
    assert {p.correct for p in sva} == {" is", " are"}  # both numbers occur
    # byte tokenizer: one-digit sums are single tokens, IOI names are not
    byte_lm = SimpleNamespace(codec=ByteCodec(), name="bytes")
    d = DigitAdditionTask(n_prompts=30, seed=0, n_digits=1).build(byte_lm)
    assert d.n == 30 and all(len(c) == len(k) for c, k in zip(d.clean, d.corrupted))
    assert all(p.correct != p.wrong and len(p.correct) == 1 for p in d.pairs)
    assert all(int(p.clean.rsplit("\n", 1)[1].split("+")[0]) + int(p.clean.rsplit("+", 1)[1][:-1]) == int(p.correct)
               for p in d.pairs)
    with pytest.raises(TaskError, match="circuit=ioi"):
        IOITask(n_prompts=8).build(byte_lm)


def test_task_build_drops_and_reports_bad_pairs(tmp_path):
    lm = SimpleNamespace(codec=ByteCodec(), name="bytes")
    pairs = [PromptPair("ab", "abc", "x", "y"),  # lengths differ
             PromptPair("ab", "ac", "xx", "y"),  # multi-token answer
             PromptPair("ab", "ac", "x", "x"),  # same answer
             PromptPair("ab", "ac", "x", "y")]
    data = PromptsTask(pairs).build(lm)
    assert data.n == 1 and len(data.dropped) == 3
    reasons = " ".join(r for _, r in data.dropped)
    assert "tokens" in reasons and "same token" in reasons
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"clean": "ab", "corrupted": "ac", "correct": "x", "wrong": "y"}) + "\n\n"
                 + json.dumps({"clean": "ab", "corrupted": "ac", "correct": "x"}) + "\n")
    with pytest.raises(TaskError, match="line 3.*wrong"):
        JsonlTask(str(f)).pairs()
    with pytest.raises(TaskError, match="circuit.path"):
        JsonlTask(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- attribution
def test_attribution_equals_exact_patching_when_the_metric_is_linear_in_the_features():
    lm = _linear_readout_lm()
    saes = _random_saes(24, 48, [H0, H1], seed=1)
    data = PromptsTask(_byte_pairs(10)).build(lm)
    attr = attribute_nodes(lm, saes, [H1, H0], data, batch_size=4, progress=False)
    assert attr.hooks == [H0, H1]  # sorted into forward order
    top = [n for n in select_nodes(attr, "top_k", 40) if n.hook == H1][:10]
    assert len(top) >= 5 and any(n.is_error for n in select_nodes(attr, "top_k", 200) if n.hook == H1)
    exact = exact_node_effects(lm, saes, top, data, batch_size=4, progress=False)
    approx = torch.tensor([attr.effect(n) for n in top])
    assert torch.allclose(approx, exact, rtol=1e-3, atol=1e-4), (approx, exact)
    # the error node too (its effect is exact as well)
    err = NodeRef(H1, ERROR)
    assert math.isclose(attr.effect(err), float(exact_node_effects(lm, saes, [err], data, 4, False)[0]),
                        rel_tol=1e-3, abs_tol=1e-4)
    # the effects sum to the full change of the metric: m(clean) - m(corrupted) = sum over H1's nodes
    total = float(attr.effects[H1].sum())
    assert math.isclose(total, attr.metric_clean - attr.metric_corrupted, rel_tol=1e-3, abs_tol=1e-4)
    # through the nonlinear block 0 -> 1 the approximation is only first order, but it is correlated
    top0 = [n for n in select_nodes(attr, "top_k", 60) if n.hook == H0 and not n.is_error][:12]
    r = pearson(torch.tensor([attr.effect(n) for n in top0]), exact_node_effects(lm, saes, top0, data, 4, False))
    assert r > 0.5


def test_planted_circuit_is_recovered_with_its_edges_and_is_faithful():
    lm, saes, task = _planted()
    data = task.build(lm)
    assert clean_accuracy(lm, data)["accuracy"] == 1.0
    attr = attribute_nodes(lm, saes, [H0, H1], data, batch_size=5, progress=False)
    planted = {NodeRef(h, f) for h in (H0, H1) for f in (0, 1)}
    circuit = select_nodes(attr, "cumulative", fraction=0.95)
    assert set(circuit) == planted
    for n in planted:  # 3 * 2.5 for feature 0, (0 - 3) * (-2) for feature 1
        assert math.isclose(attr.effect(n), 7.5 if n.feature == 0 else 6.0, rel_tol=1e-3)
    assert math.isclose(attr.effect(NodeRef(H1, 4)), 0.15, rel_tol=1e-2)
    assert attr.effect(NodeRef(H1, 2)) == pytest.approx(0.0, abs=1e-6)  # changes, but nothing reads it
    assert attr.peak_rpos(NodeRef(H1, 0)) == 0  # it acts at the last token
    edges = attribute_edges(lm, saes, circuit, data, batch_size=5, progress=False)
    w = edges.weights
    # f0 -> f0 carries 3 * 1 * 2.5 on the prompts where f0 is active in the clean run (half of them)
    assert w[(NodeRef(H0, 0), NodeRef(H1, 0))] == pytest.approx(7.5 / 2, rel=1e-3)
    assert w[(NodeRef(H0, 1), NodeRef(H1, 1))] == pytest.approx(6.0 / 2, rel=1e-3)
    assert w[(NodeRef(H0, 0), NodeRef(H1, 1))] == pytest.approx(0.0, abs=1e-6)
    assert w[(NodeRef(H0, 1), NodeRef(H1, 0))] == pytest.approx(0.0, abs=1e-6)
    assert not any(a.hook == H1 for a, _ in w)  # edges go forward only
    means = feature_means(lm, saes, [H0, H1], data, 5, False, min_prompts=2)
    assert means.at(H1, 7)[0].shape == (7, F_PLANT) and means.at(H1, 99)[0].shape == (F_PLANT,)
    assert float(means.at(H1, 7)[0][-1, 0]) == pytest.approx(2.999 * sum(
        p.clean.endswith("A") for p, c in zip(data.pairs, data.clean) if len(c) == 7) / int((data.lengths() == 7).sum()))
    m_full = attr.metric_clean
    empty = score_circuit(lm, saes, [H0, H1], data, [], means, m_full, float("nan"), 5)
    good = score_circuit(lm, saes, [H0, H1], data, circuit, means, m_full, empty.metric, 5)
    decoy = score_circuit(lm, saes, [H0, H1], data, [NodeRef(h, f) for h in (H0, H1) for f in (2, 3, 5, 6)],
                          means, m_full, empty.metric, 5)
    everything = [NodeRef(h, f) for h in (H0, H1) for f in [*range(F_PLANT), ERROR]]
    full = score_circuit(lm, saes, [H0, H1], data, everything, means, m_full, empty.metric, 5)
    assert full.faithfulness == pytest.approx(1.0, abs=1e-4) and full.metric == pytest.approx(m_full, abs=1e-4)
    assert good.faithfulness > 0.9 and good.accuracy == 1.0
    assert abs(decoy.faithfulness) < 0.1
    # the same with global (position-free) means
    gmeans = feature_means(lm, saes, [H0, H1], data, 5, False, mode="global")
    assert gmeans.at(H1, 7)[0].shape == (F_PLANT,)
    g_empty = score_circuit(lm, saes, [H0, H1], data, [], gmeans, m_full, float("nan"), 5)
    assert score_circuit(lm, saes, [H0, H1], data, circuit, gmeans, m_full, g_empty.metric, 5).faithfulness > 0.9


# ----------------------------------------------------------------------------- supernodes
def test_semantic_clustering_merges_identical_distributions_and_keeps_different_apart():
    samples = _planted_samples()
    keys = [(h, f) for h in (H0, H1) for f in range(F_PLANT)]
    D = semantic_distances(samples, keys, solver=ExactW2())
    assert D.shape == (24, 24) and torch.allclose(D, D.T)
    i0, j0 = keys.index((H0, 0)), keys.index((H1, 0))
    i1, j1 = keys.index((H0, 1)), keys.index((H1, 1))
    assert D[i0, j0] < 1e-9 and D[i1, j1] < 1e-9 and D[i0, i1] > 1.0
    labels = agglomerate(D, threshold=1e-6)
    assert labels[i0] == labels[j0] and labels[i1] == labels[j1] and labels[i0] != labels[i1]
    assert len(set(labels.tolist())) == 24 - 2  # only those two pairs merge
    # a feature without samples stays alone even when asked for one cluster
    samples[H1].weights[5] = 0
    D2 = semantic_distances(samples, keys)
    assert math.isinf(float(D2[keys.index((H1, 5)), i0]))
    lab2 = agglomerate(D2, n_clusters=2)
    assert len(set(lab2.tolist())) == 2 and (lab2 == lab2[keys.index((H1, 5))]).sum() == 1
    # decoder cosine disagrees where decoders differ although the distributions are equal
    saes = {H0: _sae(torch.eye(4, 3), torch.eye(3, 4)), H1: _sae(torch.eye(4, 3), torch.eye(3, 4).flip(0))}
    dc = decoder_cosine_distances(saes, [(H0, 0), (H1, 0), (H1, 2)])
    assert dc[0, 1] == pytest.approx(1.0) and dc[0, 2] == pytest.approx(0.0)
    co = coherence(D, labels)
    assert co["within"] < 1e-9 < co["between"]


# ----------------------------------------------------------------------------- graph JSON
def test_schema_check_catches_what_neuronpedia_rejects():
    good = _external_graph()
    assert schema_errors(good) == []
    broken = _external_graph()
    broken["metadata"]["node_threshold"] = None  # what saeot used to write
    del broken["nodes"][0]["clerp"]
    broken["links"][0]["weight"] = "1.0"
    errs = schema_errors(broken)
    assert len(errs) == 3 and any("node_threshold" in e for e in errs)


def _external_graph() -> dict:
    """A graph as circuit-tracer writes it (feature ids offset by layer, embeddings, logits)."""
    nodes = [
        {"node_id": "E_65_3", "feature": 3, "layer": "E", "ctx_idx": 3, "feature_type": "embedding",
         "jsNodeId": "E_65-3", "clerp": "", "influence": 0.5},
        {"node_id": "0_0_3", "feature": 0, "layer": "0", "ctx_idx": 3, "feature_type": "cross layer transcoder",
         "jsNodeId": "0_0-0", "clerp": "", "influence": 0.4, "activation": 3.0},
        {"node_id": "1_0_3", "feature": 100, "layer": "1", "ctx_idx": 3, "feature_type": "cross layer transcoder",
         "jsNodeId": "1_0-0", "clerp": "", "influence": 0.4, "activation": 3.0},
        {"node_id": "0_1_3", "feature": 1, "layer": "0", "ctx_idx": 3, "feature_type": "cross layer transcoder",
         "jsNodeId": "0_1-0", "clerp": "", "influence": 0.3, "activation": 1.0},
        {"node_id": "1_1_3", "feature": 101, "layer": "1", "ctx_idx": 3, "feature_type": "cross layer transcoder",
         "jsNodeId": "1_1-0", "clerp": "", "influence": 0.3, "activation": 1.0},
        {"node_id": "0_1_2", "feature": -1, "layer": "1", "ctx_idx": 2, "feature_type": "mlp reconstruction error",
         "jsNodeId": "1_2-0", "clerp": "", "influence": 0.1},
        {"node_id": "3_120_3", "feature": 120, "layer": "3", "ctx_idx": 3, "feature_type": "logit",
         "jsNodeId": "L_120-3", "clerp": 'Output "x"', "influence": None, "token_prob": 0.9, "is_target_logit": True},
    ]
    links = [{"source": "E_65_3", "target": "0_0_3", "weight": 1.0}, {"source": "0_0_3", "target": "1_0_3", "weight": 2.0},
             {"source": "0_1_3", "target": "1_1_3", "weight": -1.0}, {"source": "1_0_3", "target": "3_120_3", "weight": 3.0},
             {"source": "1_1_3", "target": "3_120_3", "weight": 0.5}, {"source": "0_1_2", "target": "3_120_3", "weight": 0.1}]
    return {"metadata": {"slug": "ext", "scan": "toy", "prompt": "cdeA", "prompt_tokens": ["c", "d", "e", "A"],
                         "node_threshold": 0.8, "custom": {"keep": [1, 2]}},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def test_graph_json_round_trips_and_an_external_graph_gets_supernodes(tmp_path):
    raw = _external_graph()
    g = CircuitGraph.from_dict(raw)
    assert g.to_dict() == raw  # nothing lost, nothing added
    assert [n.kind for n in g.nodes] == ["embedding", "feature", "feature", "feature", "feature", "error", "logit"]
    assert g.node("1_0_3").feature_index == 0  # from the node id, not the layer-offset "feature"
    compressed, clus = compress_graph(g, samples=_planted_samples(), hook_for_layer="blocks.{layer}.hook_resid_post",
                                      n_supernodes=3, decode=ByteCodec().decode)
    assert clus.n_supernodes == 3
    groups = sorted(sorted(s.members) for s in compressed.supernodes)
    assert groups == [["0_0_3", "1_0_3"], ["0_1_3", "1_1_3"]]  # identical distributions merged across layers
    assert any("'A'" in s.label and s.label.startswith("L0-1") for s in compressed.supernodes)
    assert [u.members for u in compressed.units()][-1] == ["0_1_2"]  # the error node is a singleton unit
    path = save_graph(compressed, tmp_path / "g.json")
    assert schema_errors(json.loads(path.read_text())) == []
    back = load_graph(path)
    assert back.to_dict() == compressed.to_dict() == json.loads(path.read_text())
    assert back.metadata["custom"] == {"keep": [1, 2]} and back.node("3_120_3").extra["token_prob"] == 0.9
    assert json.loads(path.read_text())["qParams"]["supernodes"][0][0] == compressed.supernodes[0].label
    bad = _external_graph()
    bad["links"].append({"source": "nope", "target": "1_0_3", "weight": 1})
    with pytest.raises(ValueError, match="unknown node 'nope'"):
        CircuitGraph.from_dict(bad)


# ----------------------------------------------------------------------------- the callback
def test_callback_compresses_the_planted_circuit(tmp_path):
    from saeot.circuits.callback import CircuitCompression

    lm, saes, task = _planted()
    cb = CircuitCompression(task=task, batch_size=6, selection="cumulative", fraction=0.95, n_supernodes=2,
                            compression=None, keep_fraction=0.5, n_exact=6, progress=False)
    run = SimpleNamespace(lm=lm, saes=saes, projected=_planted_samples(), run_dir=tmp_path, hooks=[H0, H1],
                          logger=None)
    m = cb.on_matching_end(run)
    assert cb.key == "circuit"
    assert m["nodes"] == 4 and m["supernodes"] == 2 and m["compression_ratio"] == 2.0
    assert m["clean_accuracy"] == 1.0 and "warning" not in m
    assert m["attribution_check"]["pearson"] > 0.99
    assert m["faithfulness_full"] > 0.9
    # keeping 1 of 2 supernodes (f0 at both layers: the larger aggregated effect) keeps most of the metric
    assert m["supernodes_kept"] == 1 and m["nodes_kept"] == 2
    assert m["faithfulness_compressed"] > 0.4 and m["coherence_w2"]["within"] == pytest.approx(0.0, abs=1e-6)
    base = m["baseline_decoder_cosine"]
    assert base["supernodes"] == 2 and set(base) >= {"faithfulness_compressed", "task_accuracy_compressed",
                                                      "compression_ratio", "coherence_w2"}
    g = load_graph(tmp_path / "circuit.json")
    groups = sorted(sorted((g.node(x).layer, g.node(x).feature_index) for x in s.members) for s in g.supernodes)
    assert groups == [[("0", 0), ("1", 0)], [("0", 1), ("1", 1)]]  # same feature at both layers: one supernode
    assert g.node(g.supernodes[0].members[0]).clerp.startswith("L0 #")
    assert len(g.links) >= 4 and any(n.kind == "logit" for n in g.nodes)
    assert (tmp_path / "circuit.png").stat().st_size > 5000
    assert load_graph(tmp_path / "circuit_decoder_cosine.json").metadata["saeot"]["supernode_distance"] == "decoder_cosine"
    # curves: every grouping at every count (4 nodes: ratios 1..6 give 4, 3, 2, 1 supernodes)
    assert m["curve_counts"] == [4, 3, 2, 1]
    assert set(m["curves"]) == {"semantic_ot", "decoder_cosine", "attribution_profile", "random"}
    for pts in m["curves"].values():  # one point per count; ties may merge more than asked (semantic: two 0s)
        assert [p["target_supernodes"] for p in pts] == [4, 3, 2, 1]
        assert all(p["supernodes"] <= p["target_supernodes"] for p in pts) and pts[0]["supernodes"] == 4
        assert [p["compression_ratio"] for p in pts] == [pytest.approx(4 / p["supernodes"], rel=1e-5) for p in pts]
        assert pts[-1]["largest_supernode"] == 4 and pts[-1]["error_share_kept"] == 0.0  # no error node here
    at_one = {g: pts[0]["faithfulness"] for g, pts in m["curves"].items()}  # ratio 1: singletons for everyone
    assert len(set(at_one.values())) == 1
    for pts in m["curves"].values():  # singletons keep the top nodes themselves: no gain, no loss
        assert pts[0]["faithfulness_top_nodes"] == pts[0]["faithfulness"] and pts[0]["grouping_gain"] == 0.0
    for g, pts in m["curves"].items():
        assert m["curve_mean_grouping_gain"][g] == pytest.approx(sum(p["grouping_gain"] for p in pts) / len(pts), abs=1e-5)
    assert m["curves"]["semantic_ot"][2]["faithfulness"] == m["faithfulness_compressed"]  # same count, same circuit
    assert (tmp_path / "circuit_curves.png").stat().st_size > 5000


def test_callback_reports_a_task_the_model_cannot_do(tmp_path):
    from saeot.circuits.callback import CircuitCompression, LowAccuracyError
    from saeot.circuits.compression import CircuitCompressor, CircuitSettings

    lm, saes, _ = _planted()
    swapped = PromptsTask([PromptPair(p.clean, p.corrupted, p.wrong, p.correct) for p in _planted()[2].pairs()])
    compressor = CircuitCompressor(CircuitSettings(task=swapped, on_low_accuracy="skip", progress=False))
    m = compressor.run(lm, saes, _planted_samples(), tmp_path, hooks=[H0, H1])
    assert m["clean_accuracy"] == 0.0 and m["skipped"] and "min_clean_accuracy" in m["warning"]
    with pytest.raises(LowAccuracyError, match="clean accuracy"):
        CircuitCompressor(CircuitSettings(task=swapped, on_low_accuracy="raise", progress=False)).run(
            lm, saes, _planted_samples(), tmp_path, hooks=[H0, H1])
    with pytest.raises(ValueError, match="circuit=ioi"):
        CircuitCompression(task=None)
    # an unusable task fails when the trainer sets up, before any streaming pass
    cb = CircuitCompression(task=IOITask(n_prompts=4), progress=False)
    with pytest.raises(TaskError, match="circuit=ioi: all 4 prompt pairs were dropped"):
        cb.setup(SimpleNamespace(datamodule=SimpleNamespace(lm=lm)), None, "predict")


@pytest.mark.parametrize("override,named", [
    ("callbacks.circuit.keep_fraction=2.0", "callbacks.circuit.keep_fraction=2.0 must be in (0, 1]"),
    ("callbacks.circuit.n_exact=abc", "callbacks.circuit.n_exact='abc' must be of type int"),
    ("callbacks.circuit.selection=top", "callbacks.circuit.selection='top'; use top_k or cumulative"),
    ("callbacks.circuit.linkage=ward", "callbacks.circuit.linkage='ward'"),
    ("callbacks.circuit.groupings=[semantic_ot,nope]", "callbacks.circuit.groupings has ['nope']"),
    ("callbacks.circuit.curve_ratios=[0.5]", "callbacks.circuit.curve_counts / curve_ratios has [0.5]"),
    ("+callbacks.circuit.n_supernode=3", "callbacks.circuit.n_supernode is not a setting of the circuit callback"),
])
def test_a_wrong_circuit_setting_is_named_when_the_callback_is_built(override, named, compose_cfg):
    """The settings are checked once, when Hydra builds the callback (before the model is loaded):
    a wrong value or an unknown key is one ValueError naming the yaml key."""
    from saeot.pipeline.config import build

    cfg = compose_cfg("circuit=ioi", "callbacks=circuit", override)
    with pytest.raises(ValueError) as e:
        build(cfg.callbacks.circuit)
    assert str(e.value).splitlines()[0].startswith(named), str(e.value)


def test_hydra_wiring_builds_the_callback_with_its_task():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from saeot.circuits.callback import CircuitCompression
    from saeot.cli import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["circuit=sva", "callbacks=circuit", "circuit.n_prompts=8"])
        cb = instantiate(cfg.callbacks.circuit)
        task = cb.settings.task
        assert isinstance(cb, CircuitCompression) and isinstance(task, SVATask) and task.n_prompts == 8
        assert cb.settings.solver == instantiate(cfg.transport)
        bare = compose("train", overrides=["callbacks=circuit"])
        with pytest.raises(Exception, match="circuit=ioi"):
            instantiate(bare.callbacks.circuit)
    GlobalHydra.instance().clear()


def test_train_pipeline_with_the_circuit_callback(tmp_path, compose_cfg):
    """``train.py experiment=smoke circuit=digit_addition callbacks=circuit`` (one-digit sums are
    single byte tokens, so the task fits the tiny byte-level model)."""
    from saeot.pipeline import run_train

    cfg = compose_cfg(
        "experiment=smoke", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}", "circuit=digit_addition",
        "circuit.n_prompts=12", "callbacks=circuit", "callbacks.circuit.n_exact=3",
        "callbacks.circuit.max_nodes=8", "callbacks.circuit.progress=false")
    run_train(cfg, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    c = m["circuit"]
    assert c["task"] == "digit_addition" and c["n_prompts"] == 12 and 1 <= c["nodes"] <= 8
    assert c["hooks"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert c["supernodes"] == c["baseline_decoder_cosine"]["supernodes"] >= 1
    assert c["compression_ratio"] == pytest.approx(c["nodes"] / c["supernodes"], rel=1e-5)
    assert (c["clean_accuracy"] < 0.6) == ("warning" in c)  # a random model is reported, not hidden
    assert "matching" in m  # the rest of the run is unaffected
    g = load_graph(tmp_path / "circuit.json")
    assert len(g.circuit_nodes()) == c["nodes"] and (tmp_path / "circuit.png").is_file()
    for name in ("circuit.json", "circuit_decoder_cosine.json"):
        assert schema_errors(json.loads((tmp_path / name).read_text())) == [], name


@pytest.mark.slow
def test_smollm2_does_ioi():
    from saeot.models import load_smollm2_135m

    lm = load_smollm2_135m()
    data = IOITask(n_prompts=24, seed=0).build(lm)
    assert data.n == 24 and not data.dropped
    acc = clean_accuracy(lm, data, batch_size=12)
    assert acc["accuracy"] >= 0.9 and acc["logit_diff_clean"] > 1.0
    assert acc["corrupted_accuracy"] >= 0.8


# ----------------------------------------------------------------------------- groupings and curves
def test_attribution_profile_clustering_merges_nodes_with_identical_edge_profiles():
    a0, a1, a2, a3, a4 = (NodeRef(H0, i) for i in range(5))
    b0, b1 = NodeRef(H1, 0), NodeRef(H1, 1)
    nodes = [a0, a1, a2, a3, a4, b0, b1]
    edges = {(a0, b0): 2.0, (a1, b0): 4.0, (a2, b1): -1.0, (a3, b0): -2.0}
    effect = {a0: 1.0, a1: 2.0, a2: 0.5, a3: -1.0, b0: 3.0, b1: 1.0}  # a4: no edge, no effect
    P = attribution_profiles(nodes, nodes, edges, effect)
    assert P.shape == (7, 15) and P[5].tolist()[:2] == [2.0, 4.0] and P[0, 7 + 5] == 2.0 and P[0, 14] == 1.0
    D = cosine_distances(P)
    assert D[0, 1] == pytest.approx(0.0, abs=1e-12)  # a1 = 2 a0: same partners, same signs
    assert D[0, 3] == pytest.approx(2.0)  # the same partner with the opposite sign: as far as can be
    assert D[4].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # no profile: no direction
    labels = agglomerate(D, n_clusters=6)
    assert labels[0] == labels[1] and len(set(labels.tolist())) == 6


def test_curve_point_compares_whole_supernodes_with_the_same_number_of_top_nodes():
    """A big supernode is kept whole (more nodes); the point also scores the same number of
    nodes chosen one by one, so the grouping is judged at an equal node count."""
    from saeot.circuits.curves import curve_point, ranked_nodes

    a, b, c, d, e = (NodeRef(H0, i) for i in range(5))
    effect = {a: 4.0, b: 3.0, c: 0.5, d: -0.5, e: 0.1}
    total = sum(abs(v) for v in effect.values())
    calls = []

    def score(kept):  # faithfulness = share of |effect| kept (a stand-in for patching the model)
        calls.append(sorted(kept))
        f = sum(abs(effect[n]) for n in kept) / total
        return CircuitScore(metric=f, faithfulness=f, accuracy=1.0, n_nodes=len(kept))

    assert ranked_nodes([[c, a], [e, d, b]], effect) == [a, b, c, d, e]
    p = curve_point([[a, c, d, e], [b]], effect, 5, 0.5, score)  # budget 1 supernode: the big one (|4.1| > 3)
    assert p["nodes_kept"] == 4 and p["faithfulness"] == pytest.approx(5.1 / total)
    assert p["faithfulness_top_nodes"] == pytest.approx(8.0 / total)  # a, b, c, d
    assert p["grouping_gain"] == pytest.approx(-2.9 / total)
    assert calls == [sorted([a, c, d, e]), sorted([a, b, c, d])]
    q = curve_point([[a, b], [c, d, e]], effect, 5, 0.5, score)  # the two largest together: nothing lost
    assert q["nodes_kept"] == 2 and q["grouping_gain"] == 0.0


def test_random_grouping_is_seeded_and_curve_counts_cover_the_ratios():
    D = random_partition_distances(10, 3, seed=1)
    assert torch.equal(D, random_partition_distances(10, 3, seed=1))
    assert any(not torch.equal(D, random_partition_distances(10, 3, seed=s)) for s in (2, 3, 4))
    labels = agglomerate(D, n_clusters=3)
    assert sorted(set(labels.tolist())) == [0, 1, 2] and torch.equal(D, (torch.tensor(labels)[:, None]
                                                                         != torch.tensor(labels)[None, :]).double())
    assert random_partition_distances(4, 9, seed=0).sum() == 12  # more groups than items: singletons
    assert curve_counts(10, 2) == [10, 7, 5, 4, 3]  # ceil(10 / r), at least one feature supernode + 2 errors
    assert curve_counts(10, 2, counts=[1, 6, 50]) == [10, 6, 3]
    with pytest.raises(ValueError, match="curve_ratios"):
        curve_counts(10, 0, ratios=[0.5])


def test_capitals_jsonl_task_loads_through_circuit_jsonl():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from saeot.cli import CONF_DIR

    path = f"{CONF_DIR}/circuit/capitals.jsonl"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        task = instantiate(compose("train", overrides=["circuit=jsonl", f"circuit.path={path}"]).circuit)
    GlobalHydra.instance().clear()
    assert isinstance(task, JsonlTask)
    data = task.build(SimpleNamespace(codec=WordCodec(), name="words"))
    assert data.n == 40 and not data.dropped
    assert all(p.clean.startswith("The capital of ") and p.correct != p.wrong for p in data.pairs)


@pytest.mark.slow
def test_smollm2_knows_the_capitals_of_the_jsonl_task():
    from saeot.cli import CONF_DIR
    from saeot.models import load_smollm2_135m

    lm = load_smollm2_135m()
    data = JsonlTask(f"{CONF_DIR}/circuit/capitals.jsonl").build(lm)
    assert data.n == 40 and not data.dropped
    acc = clean_accuracy(lm, data, batch_size=20)
    assert acc["accuracy"] >= 0.9 and acc["corrupted_accuracy"] >= 0.9 and acc["logit_diff_clean"] > 1.0
