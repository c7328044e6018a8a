"""LLaVA and LLaVA-NeXT whose visual tokens are compressed before the language model reads them.

``LlavaRCForConditionalGeneration`` (LLaVA-1.5) and ``LlavaNextRCForConditionalGeneration`` (LLaVA-NeXT, anyres)
inherit everything from the stock transformers classes and share the compression machinery of
``compressed_generation.CompressedGenerationMixin`` (the pre-pass, ``forward(labels)``, ``generate()``, the
report). What differs is how an image becomes visual tokens, given here as the mixin's hooks:

- LLaVA-1.5: one crop per image, its N = (image_size / patch_size)^2 patches in raster order.
- LLaVA-NeXT: a base view (the whole image resized, N patches) plus the crops of the best-fitting grid pinpoint;
  the crops form one high-resolution patch grid, unpadded to the image's aspect ratio, each grid row closed by a
  learned newline token. The stock ``pack_image_features`` decides the order: it is run once on crop-token
  indices instead of features, so the layout is the stock one by construction.

LLaVA-NeXT compression (the budget semantics; see also the README):

- A budget counts an image's visual tokens *without* newline tokens: its base view (N) plus its unpadded
  high-resolution grid (rows x cols), M = N + rows * cols, which differs per image. An int budget B keeps
  ``min(B, M)`` tokens; a ratio r keeps ``floor(r * M)`` (at least one): one global selection per image over both
  views. G-Prune is the exception, as its paper runs it: one graph per view and the ratio applied to each graph
  (``floor(r * N) + floor(r * rows * cols)``; an int budget is split over the views by size).
- Newline tokens are never scored, merged or counted by a budget, and always kept (``rows`` of them per image):
  the language model reads the grid's rows through them. The output is in reading order: the base view's kept
  tokens, then each grid row's kept (or merged) tokens closed by its newline; tokens that stand for no single
  patch (RC's extra token) come last. So an image sends ``budget + rows`` tokens to the language model.
- [CLS] attention (``cls_attention``, PruMerge(+), RC): each crop has its own [CLS]; a token's attention is the one
  from its own crop's [CLS], softmax over that crop's [CLS] and all its N patches (including those the unpadding
  later drops), i.e. normalised per crop. Every crop then spreads the same unit of attention mass, so scores are
  comparable across crops and one global ranking (or one LOF, RC) per image can spend the budget on the crops
  that hold the content instead of forcing a share onto every crop, background crops included.
- RC on anyres: the visual keep count is the LOF outlier count of the image's concatenated per-crop attention
  (one global LOF over base view + grid); text recovery ranks all non-kept tokens of the image by their question
  similarity (one LOF); merge centres are LOF outliers of the remaining tokens of the whole image, and a centre
  absorbs the most similar remaining tokens from any crop (keys come from the same layer, so key cosines compare
  across crops). Why global: RC's outlier statistics are meant to find the few salient tokens of an image; per
  crop, every crop would contribute outliers of its own background, and a 2880-token image would keep several
  times the tokens of the same content at 576.
- PruMerge+ lays its uniform lattice on each view; TRSM ranks the whole image by question similarity.
"""

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .compressed_generation import (
    NEWLINE,
    CompressedGenerationMixin,
    CompressionReport,
    ImageLayout,
    LlavaRCCausalLMOutputWithPast,
)
from .configuration_llava_rc import LlavaNextRCConfig, LlavaRCConfig


class LlavaRCForConditionalGeneration(CompressedGenerationMixin, LlavaForConditionalGeneration):
    """LLaVA that compresses each image's visual tokens according to ``config.compression``.

    ``generate(..., compression={...})`` and ``forward(..., compression={...})`` override the settings for one
    call; nothing is stored on the model.
    """

    config_class = LlavaRCConfig

    def __init__(self, config: LlavaRCConfig):
        super().__init__(config)
        self._init_guidance_modules(config)

    def _image_crops(self, pixel_values: torch.Tensor, image_sizes) -> tuple[torch.Tensor, list[int]]:
        """One crop per image: pixel_values (I, 3, H, W) as they are."""
        self._check_pixel_values(pixel_values, (("num_images",),))
        return pixel_values, [1] * pixel_values.shape[0]

    def _image_token_layouts(self, crops_per_image: list[int], image_sizes) -> list[ImageLayout]:
        """Image i reads the N patches of crop i in raster order."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        num_patches = side * side
        return [
            ImageLayout(torch.arange(image * num_patches, (image + 1) * num_patches), ((side, side),))
            for image in range(len(crops_per_image))
        ]


class LlavaNextRCForConditionalGeneration(CompressedGenerationMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT (anyres) that compresses each image's visual tokens according to ``config.compression``.

    Budget semantics, newline tokens and how [CLS]-based methods and RC read several crops: see the module
    docstring. ``generate(..., compression={...})`` and ``forward(..., compression={...})`` override the settings
    for one call.
    """

    config_class = LlavaNextRCConfig

    def __init__(self, config: LlavaNextRCConfig):
        super().__init__(config)
        self._init_guidance_modules(config)

    def _image_sizes_list(self, image_sizes) -> list[list[int]]:
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (I, 2), the (height, width) of each image; the processor "
                             "returns them")
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(size) for size in image_sizes]
        if any(len(size) != 2 for size in sizes):
            raise ValueError(f"image_sizes must be (num_images, 2) (height, width) pairs, got {sizes}")
        return sizes

    def _image_crops(self, pixel_values: torch.Tensor, image_sizes) -> tuple[torch.Tensor, list[int]]:
        """pixel_values (I, P_max, 3, H, W) padded crops (or (sum P_i, 3, H, W)) -> (sum P_i, 3, H, W)."""
        self._check_pixel_values(pixel_values, (("num_images", "max_crops"), ("total_crops",)))
        sizes = self._image_sizes_list(image_sizes)
        crops_per_image = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in sizes
        ]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(
                    f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(sizes)}; expected one "
                    "(height, width) per image"
                )
            if pixel_values.shape[1] < max(crops_per_image):
                raise ValueError(
                    f"pixel_values has {pixel_values.shape[1]} crops per image but image_sizes {sizes} need "
                    f"{crops_per_image} (base view + grid crops of the best-fitting image_grid_pinpoints)"
                )
            crops = torch.cat([images[:count] for images, count in zip(pixel_values, crops_per_image)])
        elif pixel_values.dim() == 4 and pixel_values.shape[0] == sum(crops_per_image):
            crops = pixel_values
        else:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} does not fit image_sizes {sizes}: expected "
                f"(num_images, max_crops, 3, H, W) or ({sum(crops_per_image)}, 3, H, W) with crops {crops_per_image}"
            )
        return crops, crops_per_image

    def _image_token_layouts(self, crops_per_image: list[int], image_sizes) -> list[ImageLayout]:
        """The stock placeholder order, from the stock ``pack_image_features`` run on crop-token indices.

        Each crop's N tokens are given as a 1-wide float64 "feature" holding their global index (exact for any
        realistic count), the newline as ``NEWLINE``; whatever the stock code does (grid reshape, unpadding,
        newline per row, base view first) it does to the indices.
        """
        vision_config = self.config.vision_config
        side = vision_config.image_size // vision_config.patch_size
        num_patches = side * side
        sizes = torch.tensor(self._image_sizes_list(image_sizes))  # (I, 2) on the CPU
        starts = torch.tensor([0, *crops_per_image]).cumsum(0).tolist()
        index_features = [
            torch.arange(start * num_patches, (start + count) * num_patches, dtype=torch.float64).view(count, -1, 1)
            for start, count in zip(starts, crops_per_image)
        ]  # per image (P_i, N, 1)
        newline = torch.tensor([float(NEWLINE)], dtype=torch.float64)
        packed, _ = self.model.pack_image_features(index_features, sizes, "default", image_newline=newline)
        layouts = []
        for count, image_tokens in zip(crops_per_image, packed):
            token_index = image_tokens.squeeze(-1).long()  # (T,)
            num_newlines = int((token_index == NEWLINE).sum())
            grid_tokens = token_index.shape[0] - num_newlines - num_patches
            views = ((side, side),)
            if count > 1:
                views = ((side, side), (num_newlines, grid_tokens // num_newlines))
            layouts.append(ImageLayout(token_index, views))
        return layouts

    def _image_newline(self) -> torch.Tensor:
        return self.model.image_newline


def anyres_token_counts(config, image_sizes) -> torch.Tensor:
    """(I, 3) long: the base-view, high-resolution-grid and newline tokens of each LLaVA-NeXT image.

    config: a ``LlavaNextConfig`` (or ``LlavaNextRCConfig``); image_sizes: (I, 2) (height, width) of the original
    images, a tensor or a list of pairs. The placeholder run of image i is ``counts[i].sum()`` tokens long; a budget
    counts ``counts[i, 0] + counts[i, 1]`` (the newline tokens are kept on top). Computed as the stock processor and
    model do (best-fitting grid pinpoint, unpadding to the aspect ratio), for ``vision_feature_select_strategy
    "default"`` (no [CLS] token). Example, LLaVA-1.6-7B (CLIP ViT-L/14-336) at 672 x 672: [576, 2304, 48].
    """
    vision_config = config.vision_config
    side = vision_config.image_size // vision_config.patch_size
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(size) for size in image_sizes]
    counts = []
    for height, width in sizes:
        best_height, best_width = select_best_resolution([height, width], config.image_grid_pinpoints)
        grid_height = best_height // vision_config.image_size * side
        grid_width = best_width // vision_config.image_size * side
        # The unpadding of the stock ``unpad_image``: drop the rows (or columns) that are letterbox padding.
        if width / height > grid_width / grid_height:
            new_height = int(round(height * (grid_width / width), 7))
            grid_height -= 2 * ((grid_height - new_height) // 2)
        else:
            new_width = int(round(width * (grid_height / height), 7))
            grid_width -= 2 * ((grid_width - new_width) // 2)
        counts.append([side * side, grid_height * grid_width, grid_height])
    return torch.tensor(counts, dtype=torch.long).view(-1, 3)


__all__ = [
    "CompressionReport",
    "LlavaNextRCForConditionalGeneration",
    "LlavaRCCausalLMOutputWithPast",
    "LlavaRCForConditionalGeneration",
    "anyres_token_counts",
]
