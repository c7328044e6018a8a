"""The torch Local Outlier Factor against scikit-learn's (a test-only dependency)."""

import warnings

import numpy as np
import pytest
import torch

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
