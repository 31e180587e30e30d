import pytest
import torch

from saeot.data.datamodule import HiddenStateDataModule, pack_contexts, shard_indices
from saeot.hooks import hook_layer, stop_layer
from saeot.data.text import EmptyCorpusError, StdlibDocstrings, TextFiles


def test_stdlib_docstrings_are_real_text():
    docs = list(StdlibDocstrings(max_docs=20))
    assert len(docs) == 20
    assert all(len(d) >= 80 for d in docs)
    assert docs == list(StdlibDocstrings(max_docs=20))  # deterministic order


def test_pack_contexts_starts_with_bos_and_keeps_order():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    ctx = pack_contexts(iter(["abcdef", "ghij"]), enc, context_len=4, bos_token_id=0, max_contexts=None)
    assert ctx.tolist() == [[0, 97, 98, 99], [0, 100, 101, 102], [0, 103, 104, 105]]


@pytest.mark.parametrize("n,world", [(10, 1), (10, 2), (11, 3), (5, 8)])
def test_ddp_shards_cover_every_context_exactly_once(n, world):
    seen = torch.cat([shard_indices(n, r, world) for r in range(world)])
    assert sorted(seen.tolist()) == list(range(n))


def test_datamodule_shards_are_disjoint_and_cover(tiny_dm):
    tiny_dm.setup()
    for split in ("profile", "heldout"):
        ids = []
        for rank in range(2):
            for batch in tiny_dm.dataloader(split, rank=rank, world_size=2):
                ids.extend(batch["context_index"].tolist())
        assert sorted(ids) == sorted(tiny_dm.splits[split].tolist())
    assert not set(tiny_dm.splits["profile"].tolist()) & set(tiny_dm.splits["heldout"].tolist())


def test_batches_carry_hidden_states_of_the_model(tiny_dm, tiny_lm):
    batch = next(tiny_dm.iter_batches("profile"))
    tokens = batch["tokens"]
    _, cache = tiny_lm.model.run_with_cache(tokens)
    for h in tiny_dm.hooks:
        assert batch["hidden"][h].shape == (*tokens.shape, tiny_lm.model.cfg.d_model)
        assert torch.allclose(batch["hidden"][h], cache[h], atol=1e-5)
    assert not batch["mask"][:, 0].any() and batch["mask"][:, 1:].all()


def test_stop_at_layer_is_the_last_needed_block():
    assert stop_layer(["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]) == 4
    assert stop_layer(["blocks.2.hook_resid_pre"]) == 2
    assert hook_layer("blocks.12.hook_resid_post") == 12
    with pytest.raises(ValueError, match="hook name"):
        hook_layer("embed")


def test_empty_corpus_is_a_clear_error(tiny_lm, tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    dm = HiddenStateDataModule(tiny_lm, TextFiles(str(tmp_path / "*.txt")), ["blocks.0.hook_resid_post"], context_len=32)
    with pytest.raises(EmptyCorpusError, match="data"):
        dm.setup()
    with pytest.raises(EmptyCorpusError, match="data.text.paths"):
        list(TextFiles(str(tmp_path / "*.nothing")))
