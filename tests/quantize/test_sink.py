"""The writers' shard split (qtool.quantize.sink): the same shards as huggingface_hub's split."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_split_shards_is_huggingface_hubs_split():
    """Exact sizes: the same shards as huggingface_hub's split; a boundary within the unknown range: None."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from qtool.quantize.sink import EntrySpec, split_shards

    gen = torch.Generator().manual_seed(1)
    sizes = [int(x) for x in torch.randint(1, 400, (60,), generator=gen)] + [900, 5, 1200, 7]
    sd = {f"t{i:03d}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    specs = [EntrySpec(k, "U8", (v.numel(),), v.numel(), v.numel()) for k, v in sd.items()]
    for limit in (1, 100, 399, 400, 1000, 1199, 5000, 10**9):
        ours = split_shards(specs, limit)
        theirs = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
        names = list(sd)
        assert [[names[i] for i in shard] for shard in ours] == [list(f) for f in theirs.filename_to_tensors.values()]
    fuzzy = [EntrySpec("a", "U8", (50,), 50, 50), EntrySpec("b", "U8", None, 40, 60), EntrySpec("c", "U8", (5,), 5, 5)]
    assert split_shards(fuzzy, 200) == [[0, 1, 2]]
    assert split_shards(fuzzy, 89) == [[0], [1, 2]]  # 50 + 40 > 89: b starts a shard whatever its length
    assert split_shards(fuzzy, 100) is None  # 50 + (40..60) may or may not exceed 100
