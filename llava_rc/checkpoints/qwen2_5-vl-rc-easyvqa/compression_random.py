"""Keep a random subset of the patches: the content-blind baseline every method must beat.

The subset depends only on ``seed`` and the number of patches, so every image of a call keeps the same positions
and batching does not change what an image keeps. No merging.
"""

from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, resolve_budget, select_plan
from .compression_common import check_range, validate_budget


@dataclass(frozen=True)
class RandomConfig(MethodConfig):
    """Settings of ``"random"``.

    budget: tokens kept per image, an int count or a float ratio of the patches.
    seed: chooses the subset, an int in [0, 2**64 - 1] (the range of ``torch.Generator.manual_seed``).
    """

    method = "random"

    budget: int | float = 0.25
    seed: int = 0

    def __post_init__(self):
        validate_budget(self.budget, allow_none=False)
        check_range("seed", self.seed, low=0, high=2**64 - 1, integer=True)


@torch.no_grad()
def compress_random(inputs: CompressionInputs, config: RandomConfig) -> TokenPlan:
    """Plan keeping ``budget`` patches drawn uniformly at random (the same positions for every image).

    inputs.features: (I, N, C). Returns a selection plan with K = resolve_budget(budget, N), in raster order.
    """
    num_images, num_patches = inputs.features.shape[:2]
    scores = seeded_scores(config.seed, num_patches).to(inputs.features.device)  # (N,)
    keep = resolve_budget(config.budget, num_patches)
    return select_plan(scores.expand(num_images, num_patches), keep)


@torch.compiler.assume_constant_result
def seeded_scores(seed: int, num_patches: int) -> torch.Tensor:
    """(N,) float32 uniform scores from a CPU generator seeded with ``seed``.

    A function of its two ints only: ``torch.compile`` evaluates it once when tracing and keeps the result as a
    constant, since a generator cannot be created inside a graph.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(num_patches, generator=generator)
