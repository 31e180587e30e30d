"""The run's pictures: every label readable, none under the colour bar."""

from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch

from saeot.plots import flow_figure, plot_flow
from saeot.types import MatchResult

H = [f"blocks.{i}.hook_resid_post" for i in range(3)]
N = 30


def _results(n_pairs: int) -> list[MatchResult]:
    g = torch.Generator().manual_seed(0)
    return [MatchResult(hook_a=H[a], hook_b=H[a + 1], matcher="semantic_ot", feature_b=torch.randperm(N, generator=g),
                        distance=torch.rand(N, generator=g, dtype=torch.float64),
                        margin=torch.zeros(N, dtype=torch.float64), matched=torch.rand(N, generator=g) > 0.2)
            for a in range(n_pairs)]


#: every feature's top token: the widest label _top_token writes (12 characters, quoted)
SAMPLES = {h: SimpleNamespace(n_fire=torch.arange(N, 0, -1), token_ids=torch.full((N, 4), 7)) for h in H}
CODEC = SimpleNamespace(decode=lambda ids: "W" * 16)


@pytest.mark.parametrize("n_pairs", [1, 2])
def test_flow_labels_lie_inside_the_flow_axes_clear_of_the_colour_bar(n_pairs, tmp_path):
    fig = flow_figure(_results(n_pairs), samples=SAMPLES, codec=CODEC)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax, cax = fig.axes[0], fig.axes[-1]
        assert cax.get_ylabel() == "semantic_ot distance"
        box, bar = ax.get_window_extent(renderer), cax.get_tightbbox(renderer)
        labels = [t for t in ax.texts if t.get_text()]
        assert len(labels) == 24 * (n_pairs + 1) and all("'WWWWWWWWWWWW'" in t.get_text() for t in labels)
        for t in labels:
            ext = t.get_window_extent(renderer)
            assert fig.bbox.x0 <= ext.x0 and ext.x1 <= fig.bbox.x1 and fig.bbox.y0 <= ext.y0 and ext.y1 <= fig.bbox.y1
            assert box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1, t.get_text()
            assert not ext.overlaps(bar), t.get_text()
    finally:
        plt.close(fig)
    path = plot_flow(_results(n_pairs), tmp_path / "flow.png", samples=SAMPLES, codec=CODEC)
    assert path.stat().st_size > 1000
