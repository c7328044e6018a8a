"""Roofline model of LLaVA inference: FLOPs and bytes moved per phase, and the best time the hardware allows.

Pure functions of a geometry (shapes only) and two measured ceilings (peak matmul FLOP/s and copy bandwidth).
Each phase runs in ``max(flops / peak_flops, bytes / peak_bandwidth)``; phases that run one after another (vision
tower, projector, language-model prefill) add up. A ratio is stock time / compressed time of the same scenario.

What is counted (``dtype_bytes`` per element):
- weights: read once per forward (every layer's linear weights; the LM head; not the embedding table, of which only
  the looked-up rows are read);
- activations: each layer's reads and writes of its hidden states and MLP intermediates (see ``_layer_activation``);
- KV cache: written once per prompt token in the prefill; read in full by every decode step;
- FLOPs: 2 per multiply-add of the linear layers, plus attention ``QK^T`` and ``AV`` (4 * width * context per
  query token and layer); causal prefill attention counts half the square (what SDPA/FlashAttention compute).

LLaVA-NeXT (anyres): the vision tower runs on every crop of an image (``LlavaShape.crops``: the base view plus the
grid crops, 5 at 672 x 672), the projector on every crop's patches, and the LM reads the unpadded grid plus one newline
token per grid row (``LlavaShape.patches`` counts them: 576 + 2304 + 48 = 2928 for LLaVA-1.6-7B at 672 x 672).

Small things are left out on purpose (norms' FLOPs, rotary embeddings, softmax, the compression step itself: its
ideal cost is negligible, so its measured time counts against the measured ratio).
"""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerShape:
    """One transformer stack. ``gated_mlp``: Llama's gate/up/down MLP (3 matrices) vs CLIP's fc1/fc2 (2)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    gated_mlp: bool
    vocab: int = 0  # LM head width (0: no head, e.g. a vision tower)

    @property
    def kv_width(self) -> int:
        """Width of each of K and V: kv_heads * head_dim."""
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        """Linear weights of one layer (q, k, v, o and the MLP); biases and norms are negligible."""
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_width
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attention + mlp

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies by: all layers plus the LM head."""
        return self.layers * self.layer_params + self.vocab * self.hidden


@dataclass(frozen=True)
class LlavaShape:
    """A LLaVA geometry: vision tower, projector (vision width -> text width, 2 linear layers), language model."""

    vision: TransformerShape
    image_tokens: int  # tokens the vision tower runs on per crop ([CLS] + patches)
    patches: int  # N, the image tokens the stock LLM reads per image (LLaVA-NeXT: base + unpadded grid + newlines)
    text: TransformerShape
    dtype_bytes: int
    crops: int = 1  # vision-tower crops per image (LLaVA-NeXT: base view + grid crops)

    @property
    def crop_patches(self) -> int:
        """Patch tokens of all crops of an image: what the stock projector runs on per image (no [CLS])."""
        return self.crops * (self.image_tokens - 1)

    @property
    def projector_params(self) -> int:
        return self.vision.hidden * self.text.hidden + self.text.hidden * self.text.hidden

    @property
    def weight_bytes(self) -> int:
        """Every weight the model holds, embedding table included (for memory, not for traffic)."""
        embeddings = self.text.vocab * self.text.hidden
        total = self.vision.matmul_params + self.projector_params + self.text.matmul_params + embeddings
        return total * self.dtype_bytes


@dataclass(frozen=True)
class Ceilings:
    """Measured peaks of one machine: matmul FLOP/s in the benchmark dtype and copy bandwidth (bytes/s)."""

    flops_per_second: float
    bytes_per_second: float


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def seconds(self, ceilings: Ceilings) -> float:
        """Roofline time: the slower of arithmetic and memory traffic."""
        return max(self.flops / ceilings.flops_per_second, self.bytes / ceilings.bytes_per_second)

    def bound(self, ceilings: Ceilings) -> str:
        compute = self.flops / ceilings.flops_per_second
        return "compute" if compute >= self.bytes / ceilings.bytes_per_second else "memory"


def _layer_activation(shape: TransformerShape, tokens: int) -> int:
    """Elements one layer reads and writes besides its weights, for ``tokens`` tokens (all sequences together).

    Hidden-width tensors: norm in/out (2), attention output (1), o-proj in/out (2), residual (3), second norm (2),
    MLP output (1), residual (3), q read+write (2) = 16; K and V written and read back (4 * kv_width); MLP
    intermediates: gated write gate+up, read both, write product, read it = 6 (plain: write, GELU read/write, read = 4).
    """
    mlp = (6 if shape.gated_mlp else 4) * shape.intermediate
    return tokens * (16 * shape.hidden + 4 * shape.kv_width + mlp)


def encoder_cost(shape: TransformerShape, tokens: int, sequences: int, dtype_bytes: int, causal: bool) -> Cost:
    """One forward of ``sequences`` sequences of ``tokens`` tokens each through the layers (no LM head)."""
    total_tokens = tokens * sequences
    linear = 2 * shape.layers * shape.layer_params * total_tokens
    square = tokens * tokens * (0.5 if causal else 1.0)  # causal kernels skip the upper triangle
    attention = 4 * shape.layers * shape.hidden * square * sequences
    weights = shape.layers * shape.layer_params
    activations = shape.layers * _layer_activation(shape, total_tokens)
    return Cost(flops=linear + attention, bytes=(weights + activations) * dtype_bytes)


def kv_cache_bytes(shape: TransformerShape, tokens: int, sequences: int, dtype_bytes: int) -> int:
    """Bytes of the KV cache holding ``tokens`` tokens for each of ``sequences`` sequences."""
    return 2 * shape.layers * shape.kv_width * tokens * sequences * dtype_bytes


def vision_cost(geometry: LlavaShape, images: int) -> Cost:
    """The vision tower on every crop of ``images`` images (same for stock and compressed)."""
    return encoder_cost(geometry.vision, geometry.image_tokens, images * geometry.crops, geometry.dtype_bytes,
                        causal=False)


def projector_cost(geometry: LlavaShape, tokens: int) -> Cost:
    """The 2-layer projector on ``tokens`` image tokens in all."""
    params = geometry.projector_params
    activations = tokens * (geometry.vision.hidden + 4 * geometry.text.hidden)
    return Cost(flops=2 * params * tokens, bytes=(params + activations) * geometry.dtype_bytes)


def prefill_cost(geometry: LlavaShape, prompt_tokens: int, batch: int) -> Cost:
    """The LM prefill of ``batch`` prompts of ``prompt_tokens`` tokens: layers, KV-cache writes, last-token logits."""
    text = geometry.text
    cost = encoder_cost(text, prompt_tokens, batch, geometry.dtype_bytes, causal=True)
    head = Cost(flops=2 * text.vocab * text.hidden * batch, bytes=text.vocab * text.hidden * geometry.dtype_bytes)
    kv = Cost(flops=0, bytes=kv_cache_bytes(text, prompt_tokens, batch, geometry.dtype_bytes))
    return cost + head + kv


def decode_step_cost(geometry: LlavaShape, context: int, batch: int) -> Cost:
    """One decode step of ``batch`` sequences whose KV cache holds ``context`` tokens each."""
    text = geometry.text
    flops = 2 * text.matmul_params * batch + 4 * text.layers * text.hidden * context * batch
    weights = text.matmul_params * geometry.dtype_bytes
    kv_read = kv_cache_bytes(text, context, batch, geometry.dtype_bytes)
    kv_write = kv_cache_bytes(text, 1, batch, geometry.dtype_bytes)
    activations = text.layers * _layer_activation(text, batch) * geometry.dtype_bytes
    return Cost(flops=flops, bytes=weights + kv_read + kv_write + activations)


@dataclass(frozen=True)
class Scenario:
    """What one request looks like to the LM: its text tokens and the image tokens it reads per image."""

    text_tokens: int
    image_tokens: int  # tokens the LM reads per image (N for stock, the kept count compressed)
    projected_tokens: int  # image tokens the projector runs on per image (N stock; N + K with "llm" guidance)
    images_per_prompt: int = 1

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.image_tokens * self.images_per_prompt


def ttft_seconds(geometry: LlavaShape, scenario: Scenario, batch: int, ceilings: Ceilings) -> float:
    """Best time to first token: vision tower, projector and LM prefill one after another."""
    images = batch * scenario.images_per_prompt
    phases = (
        vision_cost(geometry, images),
        projector_cost(geometry, scenario.projected_tokens * images),
        prefill_cost(geometry, scenario.prompt_tokens, batch),
    )
    return sum(phase.seconds(ceilings) for phase in phases)


def prefill_flops(geometry: LlavaShape, scenario: Scenario, batch: int = 1) -> dict[str, float]:
    """FLOPs up to the first token by phase: vision tower (all crops), projector, LM prefill, and their total."""
    images = batch * scenario.images_per_prompt
    flops = {
        "vision": vision_cost(geometry, images).flops,
        "projector": projector_cost(geometry, scenario.projected_tokens * images).flops,
        "lm": prefill_cost(geometry, scenario.prompt_tokens, batch).flops,
    }
    flops["total"] = sum(flops.values())
    return flops


def fastv_lm_flops(text: TransformerShape, tokens: int) -> float:
    """The LM estimate that FastV (arXiv 2403.06764) and many token-pruning papers use: per layer
    ``4 n d^2 + 2 n^2 d + 2 n d m`` for n tokens, width d, MLP width m (multiply-adds of q/k/v/o, the full attention
    square and a 2-matrix MLP; no LM head)."""
    n, d, m = tokens, text.hidden, text.intermediate
    return text.layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def decode_seconds(geometry: LlavaShape, scenario: Scenario, batch: int, new_tokens: int, ceilings: Ceilings) -> float:
    """Best time for ``new_tokens - 1`` decode steps after the prefill (the first token comes from the prefill)."""
    return sum(
        decode_step_cost(geometry, scenario.prompt_tokens + step, batch).seconds(ceilings)
        for step in range(1, new_tokens)
    )


def decode_tokens_per_second(
    geometry: LlavaShape, scenario: Scenario, batch: int, new_tokens: int, ceilings: Ceilings
) -> float:
    steps = max(new_tokens - 1, 1)
    return batch * steps / decode_seconds(geometry, scenario, batch, max(new_tokens, 2), ceilings)


def generate_seconds(geometry: LlavaShape, scenario: Scenario, batch: int, new_tokens: int, ceilings: Ceilings) -> float:
    return ttft_seconds(geometry, scenario, batch, ceilings) + decode_seconds(
        geometry, scenario, batch, new_tokens, ceilings
    )


def sample_bytes(geometry: LlavaShape, scenario: Scenario, new_tokens: int) -> int:
    """Memory one more request needs at its peak, beyond the weights.

    The largest of: the vision tower's transient (all hidden states kept, as LLaVA asks for them, plus one MLP
    intermediate), the prefill's (its KV cache plus one layer's transient: MLP intermediates and q/k/v), and the
    KV cache at the end of generation.
    """
    vision, text, size = geometry.vision, geometry.text, geometry.dtype_bytes
    images = scenario.images_per_prompt
    vision_peak = images * geometry.crops * geometry.image_tokens * ((vision.layers + 1) * vision.hidden + vision.intermediate) * size
    prompt = scenario.prompt_tokens
    layer_transient = prompt * ((3 if text.gated_mlp else 2) * text.intermediate + 2 * text.hidden + 2 * text.kv_width)
    prefill_peak = kv_cache_bytes(text, prompt, 1, size) + layer_transient * size
    decode_end = kv_cache_bytes(text, prompt + new_tokens, 1, size)
    return max(vision_peak, prefill_peak, decode_end)


def largest_batch(budget_bytes: float, fixed_bytes: float, per_sample_bytes: float) -> int:
    """Requests that fit ``budget_bytes`` when ``fixed_bytes`` (weights, workspace) are taken first."""
    if per_sample_bytes <= 0:
        raise ValueError(f"per_sample_bytes must be > 0, got {per_sample_bytes}")
    return max(0, math.floor((budget_bytes - fixed_bytes) / per_sample_bytes))


def ratio(stock: float, compressed: float) -> float:
    """Speed-up of compressed over stock for times (stock / compressed)."""
    return stock / compressed
