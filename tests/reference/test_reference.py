import pytest
import torch

from saeot.reference import Learned, Ridge, Standardize, project_samples
from saeot.types import FeatureSamples


def _aligned(n=800, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g) * torch.linspace(3, 0.5, d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    a = z + 5.0
    b = 7.0 * (z @ q) - 2.0  # rotated, rescaled and shifted copy of the same tokens
    return {"blocks.0.hook_resid_post": a, "blocks.1.hook_resid_post": b}, q


def test_standardize_removes_shift_and_scale():
    states, _ = _aligned()
    s = Standardize().fit(states)
    for h, x in states.items():
        y = s.transform(h, x)
        assert y.mean(0).abs().max() < 1e-4
        assert abs(float((y ** 2).sum(1).mean()) - y.shape[1]) < 1e-2


def test_ridge_undoes_a_rotation_between_layers():
    states, _ = _aligned()
    r = Ridge(dim=12, lam=1e-6).fit(states)
    err = r.alignment_error(states)
    assert list(err.values())[0] < 1e-3
    # standardize alone cannot undo the rotation
    assert list(Standardize().fit(states).alignment_error(states).values())[0] > 0.5


def test_learned_space_aligns_and_does_not_collapse():
    states, _ = _aligned(n=512)
    sp = Learned(dim=8, epochs=3, batch_size=128, lr=1e-3).fit(states)
    assert len(sp.loss_history) > 0
    err = list(sp.alignment_error(states).values())[0]
    assert err < 0.05
    y = sp.transform("blocks.0.hook_resid_post", states["blocks.0.hook_resid_post"])
    assert y.std(0).min() > 0.1  # no collapsed dimension


def test_reference_space_round_trips(tmp_path):
    states, _ = _aligned()
    r = Ridge(dim=6).fit(states)
    r.save(tmp_path / "ref.safetensors")
    r2 = Ridge().load(tmp_path / "ref.safetensors")
    x = states["blocks.1.hook_resid_post"][:5]
    assert torch.allclose(r.transform("blocks.1.hook_resid_post", x), r2.transform("blocks.1.hook_resid_post", x))
    with pytest.raises(ValueError, match="ridge"):
        Standardize().load(tmp_path / "ref.safetensors")


@pytest.mark.parametrize("hidden", [None, 16])
def test_learned_space_round_trips(tmp_path, hidden):
    """A saved learned space (linear or MLP maps) reloads into the same maps."""
    states, _ = _aligned(n=256)
    sp = Learned(dim=6, hidden=hidden, epochs=1, batch_size=128).fit(states)
    sp.save(tmp_path / "learned.safetensors")
    sp2 = Learned().load(tmp_path / "learned.safetensors")
    x = states["blocks.1.hook_resid_post"][:7]
    y = sp.transform("blocks.1.hook_resid_post", x)
    assert y.shape == (7, 6) and sp2.dim == 6
    assert torch.allclose(y, sp2.transform("blocks.1.hook_resid_post", x))


def test_unaligned_states_are_rejected():
    with pytest.raises(ValueError, match="same tokens"):
        Ridge().fit({"a": torch.randn(10, 3), "b": torch.randn(11, 3)})


def test_project_samples_maps_points_and_keeps_weights():
    states, _ = _aligned()
    r = Ridge(dim=5).fit(states)
    F, K, d = 4, 3, 12
    fs = FeatureSamples("blocks.0.hook_resid_post", torch.randn(F, K, d), torch.full((F, K), 1 / 3),
                        torch.ones(F), torch.ones(F), torch.ones(F), 10, torch.zeros(F, K, dtype=torch.long),
                        torch.zeros(F, K, 2, dtype=torch.long), torch.ones(F, K))
    p = project_samples(r, fs)
    assert p.points.shape == (F, K, 5)
    assert torch.equal(p.weights, fs.weights)
    assert torch.allclose(p.points[1, 2], r.transform(fs.hook, fs.points[1, 2]))
