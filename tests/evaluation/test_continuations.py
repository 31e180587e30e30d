"""Stacked substituted continuations (functional evaluation): the numbers of one-by-one runs."""

import torch

from saeot.evaluation.functional import next_token_ce, run_from_hook
from saeot.evaluation.functional._continuations import Continuations

H1 = "blocks.1.hook_resid_post"


def _batch(tiny_lm):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (3, 20), generator=g)
    tokens[:, 0] = 256  # BOS
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    hooks = [H1, "blocks.0.hook_mlp_out"]
    _, cache = tiny_lm.model.run_with_cache(tokens, names_filter=hooks)
    return tokens, mask, {h: cache[h].float() for h in hooks}


def test_stacked_continuations_equal_one_by_one_and_share_duplicates(tiny_lm):
    tokens, mask, hidden = _batch(tiny_lm)
    model = tiny_lm.model
    g = torch.Generator().manual_seed(1)
    h_hats = [hidden[H1] + 0.3 * torch.randn(hidden[H1].shape, generator=g) for _ in range(5)]
    h_hats.append(h_hats[2].clone())  # an exact duplicate: one forward for both
    got: dict[int, tuple] = {}
    cont = Continuations(model, tokens, mask, hidden, max_contexts=12)  # 4 requests a stack
    for i, h in enumerate(h_hats):
        cont.submit(H1, h, lambda h_sub, ce, i=i: got.__setitem__(i, (h_sub, ce)))
    cont.flush()
    assert sorted(got) == list(range(6)) and cont.n_requests == 6 and cont.n_forwards == 2
    for i, h in enumerate(h_hats):
        h_sub = torch.where(mask[..., None], h, hidden[H1])
        ce = next_token_ce(run_from_hook(model, H1, h_sub, tokens), tokens)
        assert torch.equal(got[i][0], h_sub)
        assert torch.allclose(got[i][1], ce, atol=1e-5, rtol=0)
        assert torch.equal(got[i][0][:, 0], hidden[H1][:, 0])  # BOS keeps its clean state
    assert torch.equal(got[2][1], got[5][1])


def test_non_residual_hooks_and_run_now(tiny_lm):
    tokens, mask, hidden = _batch(tiny_lm)
    model = tiny_lm.model
    hook = "blocks.0.hook_mlp_out"
    cont = Continuations(model, tokens, mask, hidden)
    h_sub, ce = cont.run_now(hook, torch.zeros(tiny_lm.d_model))
    ref = next_token_ce(run_from_hook(model, hook, h_sub, tokens), tokens)
    assert torch.equal(ce, ref) and float(h_sub[:, 1:].abs().max()) == 0.0
    clean = next_token_ce(model(tokens), tokens)
    _, ce_clean = cont.run_now(H1, hidden[H1])  # substituting the clean state changes nothing
    assert torch.allclose(ce_clean, clean, atol=1e-5)
