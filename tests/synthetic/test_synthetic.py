"""The planted multi-layer generator: its reported truth is the structure it planted."""

from __future__ import annotations

import math
import types

import pytest
import torch
from omegaconf import OmegaConf

from saeot.hooks import hook_name
from saeot.matching.sae_match import SAEMatch
from saeot.matching.semantic_ot import SemanticOT
from saeot.saes import training
from saeot.synthetic import (
    KINDS,
    activation_agreement,
    latents_to_true_by_decoder,
    SCENARIOS,
    SyntheticConfig,
    SyntheticSAEs,
    affected_kinds,
    aggregate_seeds,
    explained_variance,
    express_in_latents,
    make_world,
    mean_ci95,
    oracle_saes,
    parse_angle,
    parse_scenario,
    trained_saes,
)
from saeot.synthetic import benchmark

SMALL = dict(n_features=128, d_model=32, n_tokens=8192, chunk_size=2048)


def _cat(it):
    return torch.cat(list(it))


def _fires(world, hook, split="profile"):
    return _cat(world.true_activations(hook, split)) > 0


@pytest.fixture(scope="module")
def everything():
    """All scenarios at once, three layers (so (0, last) is a composite pair)."""
    return make_world(SyntheticConfig(scenarios=SCENARIOS, n_layers=3, **SMALL))


def test_oracle_truth_is_the_permutation_it_applied():
    world = make_world(SyntheticConfig(scenarios=("birth_death", "split_merge", "rescale"), n_layers=3, **SMALL))
    saes = oracle_saes(world, perturb=0.0, seed=3)
    assert isinstance(saes, SyntheticSAEs) and set(saes) == set(world.hooks)
    for hook in world.hooks:
        perm = saes.latent_to_true[hook]
        assert sorted(perm.tolist()) == list(range(world.n_true(hook)))
        assert (perm != torch.arange(len(perm))).float().mean() > 0.9  # index identity is not the answer
        assert torch.allclose(saes[hook].W_dec.detach(), world.directions[hook][perm], atol=1e-6)
    for a, b in world.pairs:
        truth = saes.truth[(a, b)]
        ta, tb = saes.latent_to_true[a], saes.latent_to_true[b]
        true_partner = world.truth[(a, b)][ta]
        assert torch.equal(truth >= 0, true_partner >= 0)
        ok = truth >= 0
        # B's latent truth[i] decodes exactly the true B direction of A latent i's true partner
        assert torch.allclose(
            saes[b].W_dec.detach()[truth[ok]], world.directions[b][true_partner[ok]], atol=1e-6
        )
        assert torch.equal(tb[truth[ok]], true_partner[ok])
        # the descendant sets are the world's, re-indexed
        assert torch.equal(saes.truth_sets[(a, b)], world.truth_sets[(a, b)][ta][:, tb])
        assert torch.equal(saes.born[(a, b)], world.born[(a, b)][tb])
        assert saes.kinds[(a, b)] == tuple(world.kinds[(a, b)][int(f)] for f in ta)


def test_identity_decoders_track_the_truth():
    world = make_world(SyntheticConfig(**SMALL))
    saes = oracle_saes(world)
    (a, b), = world.pairs
    truth = saes.truth[(a, b)]
    assert (truth >= 0).all() and set(world.kinds[(a, b)]) == {"persists"}
    wa = torch.nn.functional.normalize(saes[a].W_dec.detach(), dim=1)
    wb = torch.nn.functional.normalize(saes[b].W_dec.detach(), dim=1)
    cos = wa @ wb.T
    assert cos[torch.arange(len(truth)), truth].min() > 0.9
    assert (cos.argmax(dim=1) == truth).float().mean() > 0.95


@pytest.mark.parametrize("angle", [math.pi / 2, math.pi / 3])
def test_rotation_is_the_reported_q(angle):
    world = make_world(SyntheticConfig(scenarios=("rotation",), drift=0.0, rotation_angle=angle, **SMALL))
    (a, b), = world.pairs
    q = world.rotations[(a, b)]
    assert torch.allclose(q @ q.T, torch.eye(q.shape[0]), atol=1e-5)
    da, db, truth = world.directions[a], world.directions[b], world.truth[(a, b)]
    assert torch.allclose(db[truth], da @ q.T, atol=1e-5)
    cos = (da * db[truth]).sum(-1)
    assert torch.allclose(cos, torch.full_like(cos, math.cos(angle)), atol=1e-4)
    if angle == math.pi / 2:  # decoder cosine finds (almost) nothing
        assert ((da @ db.T).argmax(dim=1) == truth).float().mean() < 0.2
    # the hidden states rotate with the dictionary (shared tokens, no drift, no noise terms in c)
    ca, cb = _cat(world.true_activations(a)), _cat(world.true_activations(b))
    assert torch.allclose(cb[:, truth], ca, atol=1e-6)


def test_rescale_changes_magnitudes_not_truth():
    cfg = SyntheticConfig(scenarios=("rescale",), rescale_growth=3.0, **SMALL)
    world = make_world(cfg)
    (a, b), = world.pairs
    ratio = world.scales[b][world.truth[(a, b)]] / world.scales[a]
    lo, hi = cfg.rescale_range
    assert ratio.min() >= 3.0 * lo - 1e-5 and ratio.max() <= 3.0 * hi + 1e-5
    assert ratio.std() > 0.1  # per-feature, not only layer-wide
    rms = [float(_cat(world.hidden_states(h)).pow(2).mean().sqrt()) for h in (a, b)]
    assert 2.0 < rms[1] / rms[0] < 4.5


def test_deterministic_in_seed_and_independent_of_batch_size():
    cfg = SyntheticConfig(scenarios=SCENARIOS, **SMALL)
    w1, w2 = make_world(cfg), make_world(cfg)
    w3 = make_world(SyntheticConfig(scenarios=SCENARIOS, **{**SMALL, "seed": 1}))
    hook = w1.hooks[1]
    for key in w1.pairs:
        assert torch.equal(w1.truth[key], w2.truth[key])
    assert torch.equal(w1.directions[hook], w2.directions[hook])
    h1 = _cat(w1.hidden_states(hook, "heldout", batch_size=1000))
    assert torch.equal(h1, _cat(w2.hidden_states(hook, "heldout", batch_size=4096)))
    assert not torch.equal(h1, _cat(w3.hidden_states(hook, "heldout", batch_size=1000)))
    assert not torch.equal(h1, _cat(w1.hidden_states(hook, "profile", batch_size=1000)))
    o1, o2, o3 = oracle_saes(w1, seed=0), oracle_saes(w2, seed=0), oracle_saes(w1, seed=1)
    assert torch.equal(o1.latent_to_true[hook], o2.latent_to_true[hook])
    assert torch.equal(o1[hook].W_enc, o2[hook].W_enc)
    assert not torch.equal(o1.latent_to_true[hook], o3.latent_to_true[hook])


def test_hidden_states_are_streamed_and_follow_the_model():
    threads = torch.get_num_threads()
    world = make_world(SyntheticConfig(noise=0.1, bias=1.0, **SMALL))
    hook = world.hooks[0]
    it = world.hidden_states(hook, batch_size=1000)
    assert isinstance(it, types.GeneratorType)  # a stream, not a matrix
    sizes = [x.shape for x in it]
    assert sizes[0] == (1000, world.d_model) and sum(s[0] for s in sizes) == world.config.n_tokens
    assert all(s[0] <= 1000 for s in sizes)
    h, c, ids = (torch.cat(x) for x in zip(*world.stream(hook, batch_size=3000)))
    resid = h - c @ world.directions[hook] - world.bias[hook]
    assert abs(float(resid.std()) / world.noise_std[hook] - 1) < 0.05
    assert world.bias[hook].norm() > 0.5
    assert torch.equal(ids, torch.arange(world.config.n_tokens))
    batch = next(world.iter_batches(batch_size=64))
    assert batch["hidden"][hook].shape == (64, 1, world.d_model) and batch["mask"].all()
    assert torch.get_num_threads() == threads  # the generator's single-thread setting is restored


def test_birth_death_truth_and_existence(everything):
    world = everything
    for a, b in world.pairs[:2]:
        truth, kinds, sets = world.truth[(a, b)], world.kinds[(a, b)], world.truth_sets[(a, b)]
        dies = torch.tensor([k == "dies" for k in kinds])
        assert int(dies.sum()) == round(world.config.birth_death_fraction * world.config.n_features)
        assert (truth[dies] == -1).all() and (truth[~dies] >= 0).all()
        assert not sets[dies].any()
        born = world.born[(a, b)]
        assert int(born.sum()) == int(dies.sum()) and not sets[:, born].any()
        # no B feature reads what a dying feature read; a born feature's concept is new
        la, lb = world._layers[world.layer_of(a)], world._layers[world.layer_of(b)]

        def signature(lay, f):
            return (*lay.src[f].tolist(), int(lay.gate[f]), bool(lay.gate_on[f]))

        at_b = {signature(lb, f) for f in range(lb.n)}
        assert not {signature(la, f) for f in dies.nonzero().flatten().tolist()} & at_b
        assert not set(lb.src[born, 0].tolist()) & set(la.src.flatten().tolist())
        fa, fb = _fires(world, a), _fires(world, b)
        assert fa[:, dies].any(0).all() and fb[:, born].any(0).all()  # they do fire at their own layer


def test_split_children_have_disjoint_contexts_and_merges_join():
    cfg = SyntheticConfig(scenarios=("split_merge",), **SMALL)
    world = make_world(cfg)
    (a, b), = world.pairs
    fa, fb = _fires(world, a), _fires(world, b)
    splits, merges = world.splits[(a, b)], world.merges[(a, b)]
    truth, sets = world.truth[(a, b)], world.truth_sets[(a, b)]
    assert len(splits) == round(cfg.split_merge_fraction * cfg.n_features) and len(merges) > 0
    for parent, canon, other in splits.tolist():
        assert int(truth[parent]) == canon
        assert sets[parent].nonzero().flatten().tolist() == sorted([canon, other])
        assert not (fb[:, canon] & fb[:, other]).any()  # disjoint contexts
        assert torch.equal(fb[:, canon] | fb[:, other], fa[:, parent])
        share = fb[:, canon].sum() / fa[:, parent].sum()
        assert share > 0.5  # the canonical child carries most of the parent's firings
        g = int(world.gate_feature[b][canon])
        assert g >= 0 and not bool(world.gate_on[b][canon]) and bool(world.gate_on[b][other])
        assert (fb[fb[:, other], g]).all() and not (fb[fb[:, canon], g]).any()
    assert {world.kinds[(a, b)][p] for p in splits[:, 0].tolist()} == {"splits"}
    for pa, pb, child in merges.tolist():
        assert int(truth[pa]) == int(truth[pb]) == child
        assert torch.equal(fb[:, child], fa[:, pa] | fa[:, pb])


def test_near_duplicates_share_direction_not_context():
    cfg = SyntheticConfig(scenarios=("near_duplicates",), **SMALL)
    world = make_world(cfg)
    (a, b), = world.pairs
    lo, hi = cfg.near_duplicate_cos
    for hook in (a, b):
        pairs, ctx = world.near_duplicate_pairs[hook], world.near_duplicate_contexts[hook]
        assert len(pairs) == round(cfg.near_duplicate_fraction * cfg.n_features / 2)
        d = world.directions[hook]
        cos = (d[pairs[:, 0]] * d[pairs[:, 1]]).sum(-1)
        assert cos.min() >= lo - 1e-5 and cos.max() <= hi + 1e-5
        f = _fires(world, hook)
        for (i, j), (pi, pj) in zip(pairs.tolist(), ctx.tolist()):
            own = f[f[:, i], pi].float().mean()
            other = f[f[:, i], pj].float().mean()
            assert own > 0.85 and other < 0.3
    # across layers the pair is exchangeable for decoders, but the truth keeps identity
    pa, pb = world.near_duplicate_pairs[a], world.near_duplicate_pairs[b]
    assert torch.equal(world.truth[(a, b)][pa], pb)
    da, db = world.directions[a], world.directions[b]
    same = (da[pa[:, 0]] * db[pb[:, 0]]).sum(-1)
    swapped = (da[pa[:, 0]] * db[pb[:, 1]]).sum(-1)
    assert swapped.min() > 0.85 and (swapped > same).any()
    assert set(world.kinds[(a, b)][i] for i in pa.flatten().tolist()) == {"near_duplicate"}
    # the oracle's latents still tell the twins apart (their encoders read the context)
    saes = oracle_saes(world)
    inv = torch.argsort(saes.latent_to_true[a])
    acts = _cat(saes[a].encode(x).detach() for x in world.hidden_states(a))[:, inv] > 0
    f = _fires(world, a)
    i, j = pa[:, 0], pa[:, 1]
    hit = (acts[:, i] & f[:, i]).sum(0) / f[:, i].sum(0)
    twin = (acts[:, i] & f[:, j] & ~f[:, i]).sum(0) / (f[:, j] & ~f[:, i]).sum(0)
    assert hit.mean() > 0.75 and twin.mean() < 0.2


def test_token_alignment_and_disjoint_tokens():
    shared = make_world(SyntheticConfig(**SMALL))
    disjoint = make_world(SyntheticConfig(scenarios=("disjoint_tokens",), **SMALL))
    assert shared.shared_tokens and not disjoint.shared_tokens
    for world, aligned in ((shared, True), (disjoint, False)):
        a, b = world.hooks
        ids_a, ids_b = _cat(world.token_ids(a)), _cat(world.token_ids(b))
        fa, fb = _fires(world, a), _fires(world, b)
        same_firing = (fa == fb[:, world.truth[(a, b)]]).all(0).float().mean()
        assert torch.equal(ids_a, ids_b) == aligned
        assert (same_firing == 1.0) if aligned else (same_firing < 0.1)
    with pytest.raises(ValueError, match="disjoint_tokens"):
        next(disjoint.iter_batches())
    h = next(shared.iter_batches(batch_size=8))["hidden"]
    assert set(h) == set(shared.hooks)


def test_oracle_saes_reconstruct_at_low_noise():
    world = make_world(SyntheticConfig(n_features=128, d_model=64, noise=0.01, n_tokens=8192, scenarios=("rotation",)))
    for arch, floor in (("jumprelu", 0.9), ("topk", 0.85)):
        saes = oracle_saes(world, architecture=arch)
        for hook in world.hooks:
            assert explained_variance(saes[hook], world, hook) > floor, (arch, hook)
    # calibrated thresholds (the default) do at least as well as a fixed fraction
    fixed, calibrated = oracle_saes(world, threshold_frac=0.65), oracle_saes(world)
    hook = world.hooks[1]
    assert explained_variance(calibrated[hook], world, hook) >= explained_variance(fixed[hook], world, hook) - 0.005
    assert not torch.equal(fixed[hook].threshold, calibrated[hook].threshold)


def test_composite_truth_chains_adjacent_pairs(everything):
    world = everything
    h0, h1, h2 = world.hooks
    assert (h0, h2) in world.pairs
    t01, t12, t02 = world.truth[(h0, h1)], world.truth[(h1, h2)], world.truth[(h0, h2)]
    assert torch.equal(t02, torch.where(t01 >= 0, t12[t01.clamp_min(0)], torch.full_like(t01, -1)))
    s02 = (world.truth_sets[(h0, h1)].float() @ world.truth_sets[(h1, h2)].float()) > 0
    assert torch.equal(world.truth_sets[(h0, h2)], s02)
    assert set(world.kinds[(h0, h2)]) <= set(KINDS)
    assert torch.allclose(world.rotations[(h0, h2)], world.rotations[(h1, h2)] @ world.rotations[(h0, h1)])
    masks = oracle_saes(world).kind_masks(h0, h2)
    assert sum(int(m.sum()) for m in masks.values()) == world.n_true(h0)


def test_trained_saes_truth_by_decoder_cosine():
    world = make_world(SyntheticConfig(n_features=32, d_model=16, n_tokens=4096, chunk_size=1024, firing_min_prob=0.02))
    saes = trained_saes(world, steps=150, batch_size=256)
    (a, b), = world.pairs
    for hook in world.hooks:
        assert saes[hook].cfg.architecture() == "topk"
        mapped = saes.latent_to_true[hook] >= 0
        assert mapped.float().mean() > 0.5
        assert (saes.latent_cos[hook][mapped] >= 0.7).all()
    truth, ta, tb = saes.truth[(a, b)], saes.latent_to_true[a], saes.latent_to_true[b]
    ok = truth >= 0
    assert ok.any()
    assert torch.equal(tb[truth[ok]], world.truth[(a, b)][ta[ok]])
    assert set(saes.kinds[(a, b)]) <= {*KINDS, "unmapped"}
    # a latent stands for a feature only if it also fires with it: its activations correlate
    for hook in world.hooks:
        l2t = saes.latent_to_true[hook]
        agree = activation_agreement(saes[hook], world, hook, l2t, "train", 4096)
        assert (agree[l2t >= 0] >= 0.5).all() and torch.isnan(agree[l2t < 0]).all()
    by_decoder, _ = latents_to_true_by_decoder(saes[a].W_dec, world.directions[a])
    strict = trained_saes(world, steps=150, batch_size=256, min_act_corr=0.99)
    loose = trained_saes(world, steps=150, batch_size=256, min_act_corr=-1.0)
    assert torch.equal(loose.latent_to_true[a], by_decoder)  # no activation test: the decoder decides alone
    assert (strict.latent_to_true[a] >= 0).sum() < (loose.latent_to_true[a] >= 0).sum()


def test_activation_agreement_is_the_pearson_correlation():
    world = make_world(SyntheticConfig(n_features=16, d_model=8, n_tokens=2048, chunk_size=512))
    saes = oracle_saes(world, perturb=0.05)
    hook = world.hooks[0]
    l2t = saes.latent_to_true[hook].clone()
    l2t[3] = -1
    got = activation_agreement(saes[hook], world, hook, l2t, "train", 1024)
    h = torch.cat(list(world.hidden_states(hook, "train", n_tokens=1024)))
    c = torch.cat(list(world.true_activations(hook, "train", n_tokens=1024)))
    acts = saes[hook].encode(h).detach()
    for j in (0, 5, 9):
        want = torch.corrcoef(torch.stack([acts[:, j], c[:, l2t[j]]]))[0, 1]
        assert float(got[j]) == pytest.approx(float(want), abs=1e-4)
    assert torch.isnan(got[3])


def test_bad_settings_fail_early():
    with pytest.raises(ValueError, match="synthetic.scenarios"):
        SyntheticConfig(scenarios=("identity", "shear"))
    with pytest.raises(ValueError, match="n_features"):
        make_world(SyntheticConfig(
            n_features=16, d_model=8, scenarios=("birth_death", "split_merge"),
            birth_death_fraction=0.5, split_merge_fraction=0.3,
        ))
    with pytest.raises(ValueError, match="architecture"):
        oracle_saes(make_world(SyntheticConfig(n_features=16, d_model=8, n_tokens=64)), architecture="gated")


def test_latent_truth_prefers_the_closest_duplicate_and_skips_unmapped():
    world = make_world(SyntheticConfig(n_features=8, d_model=8, n_tokens=64))
    (a, b), = world.pairs
    # A: latent 0 -> true 3, latent 1 unmapped; B: latents 0 and 2 both stand for true 3
    l2t = {a: torch.tensor([3, -1]), b: torch.tensor([3, 5, 3])}
    cos = {a: torch.tensor([1.0, float("nan")]), b: torch.tensor([0.8, 0.9, 0.95])}
    out = express_in_latents(world, {}, l2t, cos)
    assert out.truth[(a, b)].tolist() == [2, -1]
    assert out.truth_sets[(a, b)].tolist() == [[True, False, True], [False, False, False]]
    assert out.kinds[(a, b)] == ("persists", "unmapped")


def test_hooks_are_residual_stream_hook_names():
    world = make_world(SyntheticConfig(n_features=8, d_model=8, n_tokens=64, n_layers=3))
    assert world.hooks == [hook_name(i) for i in range(3)] == [f"blocks.{i}.hook_resid_post" for i in range(3)]


def test_trained_saes_train_through_the_one_training_path(monkeypatch):
    """trained_saes uses saeot.saes.training.train_sae (the path LocalTrainedSAEs uses), unscaled, seeded per layer."""
    calls = []
    real = training.train_sae

    def spy(acts, cfg, **kw):
        calls.append((acts.shape, cfg, kw))
        return real(acts, cfg, **kw)

    monkeypatch.setattr("saeot.synthetic.trained.train_sae", spy)
    world = make_world(SyntheticConfig(n_features=16, d_model=8, n_tokens=1024, chunk_size=512))
    saes = trained_saes(world, steps=5, batch_size=64)
    assert len(calls) == world.n_layers
    for (shape, cfg, kw), hook in zip(calls, world.hooks):
        assert shape == (320, 8) and cfg.architecture == "topk" and not cfg.normalize_inputs
        assert cfg.d_sae == world.n_true(hook) and kw["name"] == hook
    assert calls[0][2]["seed"] != calls[1][2]["seed"]
    assert all(saes[h].cfg.metadata.hook_name == h for h in world.hooks)
    again = trained_saes(world, steps=5, batch_size=64)
    assert all(torch.equal(saes[h].W_dec, again[h].W_dec) for h in world.hooks)


def test_benchmark_sae_registry_and_quiet_matchers():
    world = make_world(SyntheticConfig(n_features=16, d_model=8, n_tokens=256, chunk_size=256))
    scfg = OmegaConf.create({"sae": "oracle", "oracle_perturb": 0.0, "seed": 0})
    assert set(benchmark.SAE_BUILDERS) == {"oracle", "trained"}
    assert isinstance(benchmark.build_saes(scfg, world), SyntheticSAEs)
    with pytest.raises(ValueError, match=r"synthetic.sae='nope'.*oracle"):
        benchmark.build_saes(OmegaConf.merge(scfg, {"sae": "nope"}), world)
    assert SemanticOT(progress=True).cfg.progress and benchmark._quiet(SemanticOT(progress=True)).cfg.progress is False
    plain = SAEMatch()
    assert benchmark._quiet(plain) is plain


# ---------------------------------------------------------------- combined scenarios, angles, seeds, shared mean
def test_scenario_entries_combine_parts_and_set_the_angle():
    spec = parse_scenario("rotation+rescale+near_duplicates")
    assert spec.parts == ("rotation", "rescale", "near_duplicates") and spec.rotation_angle is None
    assert parse_scenario(["rotation", "split_merge"]).name == "rotation+split_merge"
    assert parse_scenario("disjoint_tokens+rotation@pi/8").rotation_angle == pytest.approx(math.pi / 8)
    assert parse_angle("3pi/8") == parse_angle("3*pi/8") == pytest.approx(3 * math.pi / 8)
    assert parse_angle("pi") == pytest.approx(math.pi) and parse_angle(0.25) == 0.25 and parse_angle("0.5") == 0.5
    for bad, msg in (("rotation+nope", "unknown"), ("rotation+", "empty"), ("rescale@pi/8", "no rotation"),
                     ("rotation+rotation", "twice"), ("rotation@half", "multiple of pi")):
        with pytest.raises(ValueError, match=msg):
            parse_scenario(bad)
    assert affected_kinds("rotation+split_merge+near_duplicates@pi/4") == ("splits", "merges", "near_duplicate")
    assert affected_kinds("rotation+rescale") == ()


def test_combined_world_truth_composes_its_parts():
    """rotation+rescale+split_merge+birth_death: every part's truth holds at once, with the single worlds' counts."""
    parts = ("rotation", "rescale", "split_merge", "birth_death")
    cfg = SyntheticConfig(scenarios=parts, drift=0.0, **SMALL)
    world = make_world(cfg)
    (a, b), = world.pairs
    truth, kinds = world.truth[(a, b)], world.kinds[(a, b)]
    count = {k: sum(x == k for x in kinds) for k in KINDS}
    single = {p: make_world(SyntheticConfig(scenarios=(p,), drift=0.0, **SMALL)) for p in parts}
    for part, ks in (("birth_death", ("dies",)), ("split_merge", ("splits", "merges"))):
        w = single[part]
        for k in ks:
            assert count[k] == sum(x == k for x in w.kinds[w.pairs[0]]) > 0, k
    # birth_death: the dying have no partner, as many are born
    dies = torch.tensor([k == "dies" for k in kinds])
    assert (truth[dies] == -1).all() and int(world.born[(a, b)].sum()) == int(dies.sum())
    # rotation: continuing features are the rotated A directions (drift 0), as in the rotation world
    q = world.rotations[(a, b)]
    keep = torch.tensor([k == "persists" for k in kinds])
    da, db = world.directions[a], world.directions[b]
    assert torch.allclose(db[truth[keep]], da[keep] @ q.T, atol=1e-5)
    assert not torch.allclose(q, torch.eye(q.shape[0]))
    # rescale: per-feature magnitude factors within growth x range
    ratio = world.scales[b][truth[keep]] / world.scales[a][keep]
    lo, hi = cfg.rescale_range
    assert ratio.min() >= cfg.rescale_growth * lo - 1e-5 and ratio.max() <= cfg.rescale_growth * hi + 1e-5
    # split_merge: children spread around the *rotated* parent; merges join the rotated parents
    cos_child = 1 / math.sqrt(1 + cfg.split_spread ** 2)
    for parent, canon, other in world.splits[(a, b)].tolist():
        for child in (canon, other):
            assert float(db[child] @ (q @ da[parent])) == pytest.approx(cos_child, abs=1e-4)
    for pa, pb, child in world.merges[(a, b)].tolist():
        want = torch.nn.functional.normalize(q @ da[pa] + q @ da[pb], dim=0)
        assert torch.allclose(db[child], want, atol=1e-5)


@pytest.mark.parametrize("angle", ["pi/16", "pi/8", "pi/4", "pi/2"])
def test_benchmark_world_takes_the_entry_angle(angle):
    scfg = OmegaConf.create({"n_features": 64, "d_model": 16, "n_tokens": 512, "noise": 0.05, "seed": 1,
                             "rotation_angle": "pi/2", "world": {"drift": 0.0}})
    world = benchmark.build_world(scfg, f"rotation@{angle}")
    assert world.config.rotation_angle == pytest.approx(parse_angle(angle))
    (a, b), = world.pairs
    cos = (world.directions[a] * world.directions[b][world.truth[(a, b)]]).sum(-1)
    assert torch.allclose(cos, torch.full_like(cos, math.cos(parse_angle(angle))), atol=1e-4)
    # without @angle the entry takes synthetic.rotation_angle
    assert benchmark.build_world(scfg, "rotation").config.rotation_angle == pytest.approx(math.pi / 2)


def test_mean_ci95_is_the_student_t_interval():
    mean, ci = mean_ci95([0.8, 0.9, 1.0])
    # s = 0.1, t_{0.975, 2} = 4.302653
    assert mean == pytest.approx(0.9) and ci == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    mean, ci = mean_ci95([0.5, None, 0.7, 0.6, 0.6, 0.6])  # None is left out: 5 values
    assert mean == pytest.approx(0.6) and ci == pytest.approx(2.776445 * math.sqrt(0.005) / math.sqrt(5), rel=1e-5)
    assert mean_ci95([0.3]) == (0.3, None) and mean_ci95([None]) == (None, None)


def test_aggregate_seeds_adds_mean_ci_and_per_seed_values():
    def score(t1, nk):
        return {"top1_accuracy": t1, "nomatch_recall": None, "n_with_partner": 10,
                "top1_by_kind": {"persists": {"top1_accuracy": t1, "n": nk}}}

    per_seed = [{"s": {"m": score(x, 4), "na": None}} for x in (0.8, 0.9, 1.0)]
    agg = aggregate_seeds(per_seed)
    r = agg["s"]["m"]
    assert r["top1_accuracy"] == r["top1_accuracy_mean"] == pytest.approx(0.9)
    assert r["top1_accuracy_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert r["top1_accuracy_seeds"] == [0.8, 0.9, 1.0] and r["n_seeds"] == 3
    assert r["nomatch_recall"] is None and r["n_with_partner_ci95"] == 0.0
    assert r["top1_by_kind"]["persists"]["top1_accuracy_mean"] == pytest.approx(0.9)
    assert agg["s"]["na"] is None  # not applicable in every seed stays None


def _weighted_moments(world, hook, f):
    h = _cat(world.hidden_states(hook))
    w = _cat(world.true_activations(hook))[:, f]
    sel = w > 0
    w, h = w[sel] / w[sel].sum(), h[sel]
    mean = (w[:, None] * h).sum(0)
    return mean, float((w * (h - mean).pow(2).sum(1)).sum()), float(1 / w.pow(2).sum())


@pytest.mark.parametrize("offset", [0.0, 0.6])
def test_shared_mean_pairs_share_the_mean_not_the_distribution(offset):
    cfg = SyntheticConfig(scenarios=("shared_mean",), shared_mean_offset=offset, noise=0.01,
                          **{**SMALL, "n_tokens": 32768})
    world = make_world(cfg)
    (a, b), = world.pairs
    groups = world.shared_mean_groups[a]
    assert len(groups) == round(cfg.shared_mean_fraction * cfg.n_features / 2)
    assert torch.equal(world.truth[(a, b)][groups], world.shared_mean_groups[b])  # every member persists
    assert {world.kinds[(a, b)][f] for f in groups[:, :2].flatten().tolist()} == {"shared_mean"}
    for hook in (a, b):
        f = _fires(world, hook)
        errors = []
        for x, y, c1, c2 in world.shared_mean_groups[hook].tolist():
            # X fires with exactly one of its two contexts, at its own magnitude
            assert (f[f[:, x]][:, [c1, c2]].sum(1) == 1).all()
            mx, vx, nx = _weighted_moments(world, hook, x)
            my, vy, ny = _weighted_moments(world, hook, y)
            # the means agree up to the planted offset and the sampling error of the two means
            planted = offset * float(mx.norm())
            se = math.sqrt(vx / nx + vy / ny)
            assert abs(float((mx - my).norm()) - planted) < 4 * se
            errors.append(abs(float((mx - my).norm()) - planted) / float(mx.norm()))
            # the distributions differ: X's two modes sit half the contexts' distance from its mean
            s1, s2 = float(world.scales[hook][c1]), float(world.scales[hook][c2])
            bimodal = float((s1 * world.directions[hook][c1] - s2 * world.directions[hook][c2]).pow(2).sum()) / 4
            assert vx - vy == pytest.approx(bimodal, rel=0.35) and bimodal > 1.0
        assert sum(errors) / len(errors) < 0.1    # the offset is redrawn at every layer: it says nothing about which B member is which
    if offset:
        ya, yb = groups[:, 1], world.shared_mean_groups[b][:, 1]
        da, db = world.directions[a], world.directions[b]
        assert ((da[ya] * db[yb]).sum(-1) < 0.999).all()


def test_run_benchmark_over_seeds_writes_mean_and_ci(tmp_path):
    cfg = OmegaConf.create({
        "seed": 0,
        "reference": {"_target_": "saeot.reference.Standardize"},
        "matchers": {"mean_embedding": {"_target_": "saeot.matching.MeanEmbedding"},
                     "activation_correlation": {"_target_": "saeot.matching.ActivationCorrelation"}},
        "synthetic": {"seed": 0, "seeds": [3, 4], "scenarios": ["rotation+birth_death", "rotation@pi/8"],
                      "n_features": 32, "d_model": 16, "noise": 0.05, "n_tokens": 2048,
                      "samples_per_feature": 8, "sampling": "topk", "sae": "oracle", "oracle_perturb": 0.02,
                      "reference_tokens": 1024, "rotation_angle": "pi/2", "world": {},
                      "sweep_k": [], "sweep_noise": []},
    })
    metrics = benchmark.run_benchmark(cfg, tmp_path)
    r = metrics["synthetic"]["rotation+birth_death"]["mean_embedding"]
    per_seed = [metrics["synthetic_by_seed"][s]["rotation+birth_death"]["mean_embedding"]["top1_accuracy"]
                for s in ("3", "4")]
    assert r["top1_accuracy_seeds"] == per_seed
    assert r["top1_accuracy_mean"] == pytest.approx(sum(per_seed) / 2) and "top1_accuracy_ci95" in r
    assert r["affected_top1_accuracy_mean"] == pytest.approx(r["top1_accuracy_mean"])  # no affected kind: all
    assert metrics["synthetic_info"]["seeds"] == [3, 4]
    table = (tmp_path / "synthetic_table.md").read_text()
    assert "±" in table and "rotation@pi/8" in table and "2 seeds" in table
    with pytest.raises(ValueError, match="synthetic.scenarios"):
        benchmark.run_benchmark(OmegaConf.merge(cfg, {"synthetic": {"scenarios": ["rotation+bogus"]}}), tmp_path)
