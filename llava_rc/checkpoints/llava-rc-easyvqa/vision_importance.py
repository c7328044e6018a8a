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


def received_attention(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, per_head: bool = True, num_sinks: int = 0
) -> torch.Tensor:
    """(P, T) float32 mean attention each token of a crop receives from all T tokens of its crop.

    queries, keys: (P, T, A) the attention layer's q/k projections (A = num_heads * head_dim), all tokens of each
    crop. per_head=True: a softmax per head over the keys, then the mean over heads and queries; per_head=False:
    one softmax over all heads concatenated, scaled by sqrt(A) (RC's joint statistic), then the mean over queries.
    num_sinks: S most-received tokens per crop taken out of the statistic (as keys and queries) and scored 0
    (module docstring).
    """
    logits = attention_logits(queries.float(), keys.float(), num_heads, per_head)  # (P, H, T, T) query x key
    scores = logits.softmax(dim=-1).mean(dim=(1, 2))  # (P, T)
    if num_sinks <= 0:
        return scores
    num_tokens = scores.shape[-1]
    if num_sinks >= num_tokens:
        raise ValueError(f"attention_sinks={num_sinks} must be less than the {num_tokens} tokens of a crop")
    sinks = scores.topk(num_sinks, dim=-1).indices  # (P, S)
    is_sink = torch.zeros_like(scores, dtype=torch.bool).scatter(1, sinks, True)  # (P, T)
    logits = logits.masked_fill(is_sink[:, None, None, :], float("-inf"))  # no query attends to a sink
    attention = logits.softmax(dim=-1).mean(dim=1)  # (P, T, T) query x key, mean over heads
    content_queries = (~is_sink).float()  # (P, T) sinks' own queries are left out as well
    scores = torch.einsum("pq,pqk->pk", content_queries, attention) / (num_tokens - num_sinks)  # (P, T)
    return scores.masked_fill(is_sink, 0.0)


def attention_logits(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, per_head: bool) -> torch.Tensor:
    """(P, H, T, T) scaled dot products (H = num_heads per head, 1 joint); queries, keys (P, T, A) float32."""
    num_crops, num_tokens, width = keys.shape
    if not per_head:
        return (queries @ keys.transpose(-1, -2)).unsqueeze(1) / math.sqrt(width)  # (P, 1, T, T)
    head_dim = width // num_heads
    queries = queries.view(num_crops, num_tokens, num_heads, head_dim).transpose(1, 2)  # (P, H, T, d)
    keys = keys.view(num_crops, num_tokens, num_heads, head_dim).transpose(1, 2)  # (P, H, T, d)
    return queries @ keys.transpose(-1, -2) / math.sqrt(head_dim)  # (P, H, T, T)
