"""stable_topk_indices: a top-k that returns exactly what a stable full sort would (it replaces the (I, N, N) sorts
of LOF and RC's merge)."""

import pytest
import torch

from llava_rc.compression_common import stable_topk_indices


def tie_heavy(shape, generator) -> torch.Tensor:
    """Values from a tiny set with signed zeros and infinities, so most comparisons are ties."""
    palette = torch.tensor([-float("inf"), -1.5, -0.0, 0.0, 0.25, 1.5, float("inf")])
    return palette[torch.randint(len(palette), shape, generator=generator)]


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["ties", "normal"])
def test_equals_stable_sort_prefix(largest, kind):
    generator = torch.Generator().manual_seed(0)
    for length in (1, 2, 7, 64, 577):
        shape = (3, 5, length)
        values = tie_heavy(shape, generator) if kind == "ties" else torch.randn(shape, generator=generator)
        for k in sorted({1, min(3, length), length}):
            expected = torch.sort(values, dim=-1, descending=largest, stable=True).indices[..., :k]
            assert torch.equal(stable_topk_indices(values, k, largest), expected), (length, k)


def test_other_dtypes_and_batch_invariance():
    values = torch.randn(4, 33, generator=torch.Generator().manual_seed(1)).round(decimals=1)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        cast = values.to(dtype)
        expected = torch.sort(cast.float(), dim=-1, descending=True, stable=True).indices[..., :5]
        assert torch.equal(stable_topk_indices(cast, 5, largest=True), expected)
    whole = stable_topk_indices(values, 6, largest=False)
    for row in range(values.shape[0]):
        assert torch.equal(stable_topk_indices(values[row : row + 1], 6, largest=False)[0], whole[row])
