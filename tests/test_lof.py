"""The torch Local Outlier Factor against scikit-learn's (a test-only dependency)."""

import warnings

import numpy as np
import pytest
import torch

from llava_rc.compression_common import stable_topk_indices
from llava_rc.compression_lof import lof_outlier_count, lof_outlier_fraction, lof_outlier_mask

sklearn_neighbors = pytest.importorskip("sklearn.neighbors")

# Integers whose base-3 digits are all 0 or 1 contain no three terms in arithmetic progression, so values drawn
# from them have many exact ties and duplicates but never the two-sided tie (x - d and x + d) at which sklearn's
# neighbour choice depends on its kd-tree layout (see the module docstring).
PROGRESSION_FREE = np.array([int(np.base_repr(i, 2), 3) for i in range(64)], dtype=np.float32)


def sklearn_outliers(values: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Outlier flags of LocalOutlierFactor(n_neighbors, contamination="auto").fit_predict; none for one value."""
    if len(values) < 2:
        return np.zeros(len(values), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_neighbors > n_samples and duplicate-value warnings
        detector = sklearn_neighbors.LocalOutlierFactor(n_neighbors=n_neighbors, contamination="auto")
        return detector.fit_predict(values.reshape(-1, 1)) == -1


def random_vector(rng: np.random.Generator, kind: str, length: int) -> np.ndarray:
    if kind == "normal":
        values = rng.normal(size=length)
    elif kind == "cauchy":
        values = rng.standard_cauchy(size=length)
    elif kind == "small_exponential":
        values = rng.exponential(size=length) * 1e-3
    elif kind == "integers":
        values = PROGRESSION_FREE[rng.integers(0, rng.integers(1, 24), size=length)]
    elif kind == "constant":
        values = np.full(length, rng.normal())
    elif kind == "min_duplicated":  # RC's text scores: the visually kept ones set to the minimum
        values = rng.normal(size=length)
        values[rng.permutation(length)[: rng.integers(0, length + 1)]] = values.min()
    else:
        raise AssertionError(kind)
    return values.astype(np.float32)


KINDS = ["normal", "cauchy", "small_exponential", "integers", "constant", "min_duplicated"]


@pytest.mark.slow
@pytest.mark.parametrize("n_neighbors", [20, 10, 3])
def test_matches_sklearn_on_random_batches(n_neighbors):
    """>= 1000 vectors in all (over the three k), lengths 1..600, batched with different valid lengths."""
    rng = np.random.default_rng(n_neighbors)
    checked = 0
    for batch in range(80):
        batch_size = int(rng.integers(1, 9))
        long_batch = batch % 8 == 0
        lengths = rng.integers(1, 601 if long_batch else 80, size=batch_size)
        lengths[0] = rng.choice([1, 2, n_neighbors, n_neighbors + 1, lengths[0]])  # tiny n next to k
        width = int(lengths.max())
        values = np.full((batch_size, width), 1e3, dtype=np.float32)  # padding must not matter
        valid = np.zeros((batch_size, width), dtype=bool)
        expected = []
        for row, length in enumerate(lengths):
            vector = random_vector(rng, KINDS[(batch + row) % len(KINDS)], int(length))
            values[row, :length], valid[row, :length] = vector, True
            expected.append(sklearn_outliers(vector, n_neighbors))
        mask = lof_outlier_mask(torch.from_numpy(values), torch.from_numpy(valid), n_neighbors)
        fraction = lof_outlier_fraction(torch.from_numpy(values), torch.from_numpy(valid), n_neighbors)
        for row, length in enumerate(lengths):
            assert mask[row, length:].sum() == 0
            np.testing.assert_array_equal(mask[row, :length].numpy(), expected[row])
            assert fraction[row].item() == np.float32(expected[row].sum()) / np.float32(length)
            checked += 1
    assert checked >= 334


def test_fraction_dtype_device_and_no_valid_mask():
    values = torch.randn(3, 50, dtype=torch.bfloat16)
    fraction = lof_outlier_fraction(values, None, 20)
    assert fraction.dtype == torch.float32 and fraction.shape == (3,)
    expected = [sklearn_outliers(row.float().numpy(), 20).mean() for row in values]
    np.testing.assert_allclose(fraction.numpy(), expected, rtol=0, atol=1e-7)


def test_edge_cases():
    one = torch.tensor([[0.3]])
    assert lof_outlier_count(one, None, 20).tolist() == [0]
    empty_row = torch.zeros(2, 5)
    valid = torch.tensor([[False] * 5, [True, True, False, False, False]])
    assert lof_outlier_fraction(empty_row, valid, 20).tolist() == [0.0, 0.0]
    assert lof_outlier_count(torch.zeros(1, 40), None, 20).tolist() == [0]  # constant: all lrd equal
    # Two far values among many duplicates: their neighbours' lrd is ~1e10 (the epsilon), a huge LOF.
    values = torch.tensor([[0.0] * 30 + [1.0, 5.0]])
    expected = sklearn_outliers(values[0].numpy(), 20)
    assert expected[-2:].all()
    np.testing.assert_array_equal(lof_outlier_mask(values, None, 20)[0].numpy(), expected)
    with pytest.raises(ValueError, match="n_neighbors"):
        lof_outlier_mask(values, None, 0)


def test_two_sided_tie_breaks_towards_lower_index():
    """With k = 1, the value 1 has the equidistant neighbours 0 and 2; the one at the lower index is taken."""
    values = torch.tensor([[2.0, 1.0, 0.0, -0.5]])
    # Neighbour 2 (index 0): every lrd ratio is 1, no outlier.
    assert lof_outlier_mask(values, None, 1).tolist() == [[False, False, False, False]]
    # Reversed, neighbour 0 comes first: lrd(0) = 2 * lrd(1), so 1 is an outlier.
    assert lof_outlier_mask(values.flip(-1), None, 1).tolist() == [[False, False, True, False]]


def dense_lof_outlier_mask(values: torch.Tensor, valid: torch.Tensor | None, n_neighbors: int) -> torch.Tensor:
    """The previous implementation, kept as the reference: the (I, N, N) distance matrix and a stable top-k of
    each row (equidistant neighbours in ascending sample index), then the same float32 LOF statistics."""
    x = values.float()  # (I, N)
    num_rows, num_values = x.shape
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    if num_values < 2:
        return torch.zeros_like(valid)
    num_valid = valid.sum(dim=-1)  # (I,)
    row_neighbors = (num_valid - 1).clamp(min=1, max=n_neighbors)  # (I,)
    width = min(n_neighbors, num_values - 1)
    distances = (x.unsqueeze(-1) - x.unsqueeze(-2)).abs()  # (I, N, N)
    itself = torch.eye(num_values, dtype=torch.bool)
    distances = distances.masked_fill(itself | ~valid.unsqueeze(-2), float("inf"))
    near_index = stable_topk_indices(distances, width, largest=False)  # (I, N, W)
    near_distances = distances.gather(-1, near_index)  # (I, N, W)
    in_neighborhood = torch.arange(width) < row_neighbors.view(-1, 1, 1)  # (I, 1, W)
    near_distances = near_distances.where(in_neighborhood & near_distances.isfinite(), 0.0)
    k_distance = near_distances.gather(-1, (row_neighbors - 1).view(-1, 1, 1).expand(-1, num_values, 1)).squeeze(-1)
    neighbor_k_distance = k_distance.gather(1, near_index.flatten(1)).view(num_rows, num_values, width)
    reach = torch.maximum(near_distances, neighbor_k_distance).where(in_neighborhood, 0.0)  # (I, N, W)
    row_neighbors = row_neighbors.view(-1, 1).float()  # (I, 1)
    density = 1.0 / (reach.sum(dim=-1) / row_neighbors + 1e-10)  # (I, N)
    neighbor_density = density.gather(1, near_index.flatten(1)).view(num_rows, num_values, width)  # (I, N, W)
    ratios = (neighbor_density / density.unsqueeze(-1)).where(in_neighborhood, 0.0)
    scores = ratios.sum(dim=-1) / row_neighbors
    return valid & (scores > 1.5) & (num_valid >= 2).unsqueeze(-1)


def mixed_row(rng: np.random.Generator, kind: str, length: int) -> np.ndarray:
    """The sklearn test's distributions plus values on a short integer grid: arithmetic progressions, so
    two-sided ties (x - d and x + d) at the k-distance, with runs of copies longer than the 2k window."""
    if kind == "grid":
        step = rng.choice([1.0, 0.1, -0.5])
        return (rng.integers(0, rng.integers(1, 12), size=length) * step).astype(np.float32)
    if kind == "signed_zeros":
        return rng.choice(np.array([-0.0, 0.0, 1.0, -1.0, 2.0], dtype=np.float32), size=length)
    return random_vector(rng, kind, length)


@pytest.mark.parametrize(
    "batches, min_rows, min_flagged",
    [(100, 250, 100), pytest.param(700, 2000, 1000, marks=pytest.mark.slow)],  # the quick run: the first 100 batches
    ids=["quick", "full"],
)
def test_window_lof_equals_dense_reference(batches, min_rows, min_flagged):
    """>= 2,000 rows (full run): every decision equals the (I, N, N) reference's, bit for bit, including ties and
    masks."""
    rng = np.random.default_rng(2024)
    kinds = KINDS + ["grid", "grid", "signed_zeros"]
    rows = flagged = 0
    for batch in range(batches):
        n_neighbors = int(rng.choice([1, 2, 3, 5, 10, 20]))
        batch_size = int(rng.integers(1, 6))
        width = int(rng.choice([1, 2, 3, n_neighbors, n_neighbors + 1, rng.integers(4, 90), rng.integers(90, 300)]))
        values = np.stack([mixed_row(rng, kinds[rng.integers(len(kinds))], width) for _ in range(batch_size)])
        valid = rng.random((batch_size, width)) < rng.choice([1.0, 1.0, 0.7, 0.1])  # masked rows, few valid
        valid[rng.random(batch_size) < 0.05] = False  # rows with no valid value
        values, valid = torch.from_numpy(values), torch.from_numpy(valid)
        expected = dense_lof_outlier_mask(values, valid, n_neighbors)
        assert torch.equal(lof_outlier_mask(values, valid, n_neighbors), expected), (n_neighbors, values, valid)
        if batch % 7 == 0:  # and without a mask
            unmasked = dense_lof_outlier_mask(values, None, n_neighbors)
            assert torch.equal(lof_outlier_mask(values, None, n_neighbors), unmasked)
        rows += batch_size
        flagged += int(expected.sum())
    assert rows >= min_rows and flagged > min_flagged, (rows, flagged)


def test_window_lof_long_runs_of_copies_at_the_k_distance():
    """Both runs at the k-distance extend past the 2k window; which side the last slots go to follows the lowest
    sample indices of both runs (the left run's lowest indices sit at its far end)."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        length = int(rng.integers(30, 120))
        values = torch.from_numpy(rng.choice(np.array([0.0, 1.0, 2.0, 7.0], dtype=np.float32), size=(3, length)))
        for n_neighbors in [3, 10, 20]:
            expected = dense_lof_outlier_mask(values, None, n_neighbors)
            assert torch.equal(lof_outlier_mask(values, None, n_neighbors), expected)


def test_memory_grows_linearly_no_square_matrix():
    """No (N, N) tensor: at N = 4096 the largest allocation stays far below N * N floats (64 MiB)."""
    from torch.profiler import ProfilerActivity, profile

    values = torch.randn(1, 4096)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        lof_outlier_mask(values, None, 20)
    largest = max(event.cpu_memory_usage for event in profiler.events())
    assert largest < 4096 * 4096 * 4 // 16
