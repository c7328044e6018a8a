"""Per-token importance inside a vision tower without [CLS]: the mean attention each token receives.

CLIP towers (LLaVA-1.5, LLaVA-NeXT) score a patch by the attention the [CLS] query pays it. SigLIP (LLaVA-OneVision)
has no [CLS] (and OneVision's checkpoints drop the attention-pooling head), so a patch is scored by the attention it
*receives*: the softmax attention of every query token of its crop to it, averaged over the queries (and heads), as
VisionZip and VisPruner do for SigLIP models. Either score is a distribution over the crop's tokens (it sums to one
over the crop), so scores of different crops stay comparable, as with per-crop [CLS] attention.

Attention sinks: a tower without [CLS] often routes most of every query's attention to a few tokens regardless of
what they show (high-norm "register" tokens in background patches). ``num_sinks`` S > 0 names the S most-attended
tokens of each crop sinks and takes them out of the statistic, as keys (out of every query's softmax, which is
renormalised over the other tokens) and as queries, and gives them score 0: the scores of the other tokens are then
exactly the statistic of the crop without its sinks, the attention that content tokens exchange. The default
S = 0 is the peers' statistic. Measured in ``benchmarks/attention_sinks.py``.
"""

import math

import torch

IMPORTANCE_SCORES = ("cls_attention", "received_attention")


def importance_score_kind(requested: str | None, num_prefix_tokens: int) -> str:
    """The score a model uses: ``requested`` (``config.importance_score``), or by default [CLS] attention when
    the tower has a [CLS] (``num_prefix_tokens`` 1), else the mean received attention."""
    if requested is None:
        return "cls_attention" if num_prefix_tokens else "received_attention"
    if requested not in IMPORTANCE_SCORES:
        raise ValueError(f"importance_score must be one of {list(IMPORTANCE_SCORES)} or None, got {requested!r}")
    if requested == "cls_attention" and not num_prefix_tokens:
        raise ValueError(
            "importance_score='cls_attention' needs a vision tower with a [CLS] token; this model's tower has none "
            "(SigLIP): use 'received_attention' or None"
        )
    return requested


# Queries per chunk of the received-attention statistic: the attention is materialised (P, H, chunk, T) at a time,
# never (P, H, T, T) (OneVision's 729-token crops: 32 times less; Qwen's multi-thousand-patch images: the difference
# between fitting and not).
QUERY_CHUNK = 128


def received_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    num_heads: int,
    per_head: bool = True,
    num_sinks: int = 0,
    query_chunk: int = QUERY_CHUNK,
) -> torch.Tensor:
    """(P, T) float32 mean attention each token of a crop receives from all T tokens of its crop.

    queries, keys: (P, T, A) the attention layer's q/k projections (A = num_heads * head_dim), all tokens of each
    crop. per_head=True: a softmax per head over the keys, then the mean over heads and queries; per_head=False:
    one softmax over all heads concatenated, scaled by sqrt(A) (RC's joint statistic), then the mean over queries.
    num_sinks: S most-received tokens per crop taken out of the statistic (as keys and queries) and scored 0
    (module docstring). query_chunk: queries whose attention rows are held at once, so memory is
    O(P x H x query_chunk x T) rather than O(P x H x T x T); the result equals the unchunked statistic up to float
    summation order.
    """
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive int, got {query_chunk!r}")
    queries, keys = queries.float(), keys.float()
    num_tokens = keys.shape[1]
    heads = num_heads if per_head else 1

    def summed_rows(is_sink: torch.Tensor | None) -> torch.Tensor:
        """(P, T) attention received, summed over heads and (content) queries, one chunk of queries at a time."""
        total = keys.new_zeros(keys.shape[0], num_tokens)  # (P, T)
        for start in range(0, num_tokens, query_chunk):
            stop = min(start + query_chunk, num_tokens)
            logits = attention_logits(queries[:, start:stop], keys, num_heads, per_head)  # (P, H, c, T)
            if is_sink is not None:
                logits = logits.masked_fill(is_sink[:, None, None, :], float("-inf"))  # no query attends to a sink
            attention = logits.softmax(dim=-1).sum(dim=1)  # (P, c, T) summed over heads
            if is_sink is not None:
                attention = attention * (~is_sink[:, start:stop]).float().unsqueeze(-1)  # sinks' queries left out
            total = total + attention.sum(dim=1)  # (P, T)
        return total

    scores = summed_rows(None) / (heads * num_tokens)  # (P, T)
    if num_sinks <= 0:
        return scores
    if num_sinks >= num_tokens:
        raise ValueError(f"attention_sinks={num_sinks} must be less than the {num_tokens} tokens of a crop")
    sinks = scores.topk(num_sinks, dim=-1).indices  # (P, S)
    is_sink = torch.zeros_like(scores, dtype=torch.bool).scatter(1, sinks, True)  # (P, T)
    scores = summed_rows(is_sink) / (heads * (num_tokens - num_sinks))  # (P, T)
    return scores.masked_fill(is_sink, 0.0)


def attention_logits(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, per_head: bool) -> torch.Tensor:
    """(P, H, Q, T) scaled dot products (H = num_heads per head, 1 joint); queries (P, Q, A), keys (P, T, A)
    float32."""
    num_crops, num_tokens, width = keys.shape
    num_queries = queries.shape[1]
    if not per_head:
        return (queries @ keys.transpose(-1, -2)).unsqueeze(1) / math.sqrt(width)  # (P, 1, Q, T)
    head_dim = width // num_heads
    queries = queries.reshape(num_crops, num_queries, num_heads, head_dim).transpose(1, 2)  # (P, H, Q, d)
    keys = keys.reshape(num_crops, num_tokens, num_heads, head_dim).transpose(1, 2)  # (P, H, T, d)
    return queries @ keys.transpose(-1, -2) / math.sqrt(head_dim)  # (P, H, Q, T)
