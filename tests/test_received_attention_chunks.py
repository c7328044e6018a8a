"""The received-attention statistic is computed in query chunks: the same scores as the full (P, H, T, T) attention,
with memory bounded by the chunk."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llava_rc.vision_importance import received_attention


def full_attention_reference(queries, keys, num_heads, per_head=True, num_sinks=0):
    """The statistic as it was computed before chunking: the whole (P, H, T, T) attention at once."""
    queries, keys = queries.float(), keys.float()
    crops, tokens, width = keys.shape
    if per_head:
        head_dim = width // num_heads
        q = queries.view(crops, tokens, num_heads, head_dim).transpose(1, 2)
        k = keys.view(crops, tokens, num_heads, head_dim).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    else:
        logits = (queries @ keys.transpose(-1, -2)).unsqueeze(1) / math.sqrt(width)
    scores = logits.softmax(dim=-1).mean(dim=(1, 2))
    if num_sinks <= 0:
        return scores
    sinks = scores.topk(num_sinks, dim=-1).indices
    is_sink = torch.zeros_like(scores, dtype=torch.bool).scatter(1, sinks, True)
    attention = logits.masked_fill(is_sink[:, None, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)
    content = (~is_sink).float()
    scores = torch.einsum("pq,pqk->pk", content, attention) / (tokens - num_sinks)
    return scores.masked_fill(is_sink, 0.0)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("num_sinks", [0, 3])
def test_chunked_scores_equal_the_full_attention_on_onevision_sized_crops(per_head, num_sinks):
    torch.manual_seed(0)
    crops, tokens, heads, head_dim = 2, 729, 4, 8  # SigLIP's 27 x 27 crop
    queries = torch.randn(crops, tokens, heads * head_dim) * 2
    keys = torch.randn(crops, tokens, heads * head_dim) * 2
    expected = full_attention_reference(queries, keys, heads, per_head, num_sinks)
    for chunk in (1, 100, 128, tokens, 4096):
        scores = received_attention(queries, keys, heads, per_head=per_head, num_sinks=num_sinks, query_chunk=chunk)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-9)
        # Same ranking, hence the same kept tokens for every method reading it.
        assert torch.equal(scores.topk(73).indices.sort().values, expected.topk(73).indices.sort().values)


def test_memory_is_bounded_by_the_chunk_not_the_square():
    torch.manual_seed(0)
    crops, tokens, heads, head_dim, chunk = 2, 729, 4, 8, 64
    queries = torch.randn(crops, tokens, heads * head_dim)
    keys = torch.randn(crops, tokens, heads * head_dim)
    with LargestTensor() as chunked:
        received_attention(queries, keys, heads, num_sinks=2, query_chunk=chunk)
    with LargestTensor() as full:
        full_attention_reference(queries, keys, heads, num_sinks=2)
    assert chunked.largest <= crops * heads * chunk * tokens
    assert full.largest >= crops * heads * tokens * tokens  # what the chunking avoids


def test_query_chunk_must_be_positive():
    with pytest.raises(ValueError, match="query_chunk must be a positive int, got 0"):
        received_attention(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), 2, query_chunk=0)
