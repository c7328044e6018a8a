"""LLaVA and LLaVA-NeXT whose visual tokens are compressed before the language model reads them.

``LlavaRCForConditionalGeneration`` (LLaVA-1.5) and ``LlavaNextRCForConditionalGeneration`` (LLaVA-NeXT, anyres)
inherit everything from the stock transformers classes and share the compression machinery (``planning``: the
pre-pass and the report; ``compressed_generation``: ``forward(labels)``, ``generate()``) and the LLaVA line's encode
(``family_llava.LlavaFamilyMixin``: the tower over crops, importance, guidance). What differs is how an image
becomes visual tokens, given here as hooks:

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

from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .compressed_generation import NEWLINE, CompressionReport, ImageLayout, LlavaRCCausalLMOutputWithPast
from .family_llava import LlavaFamilyMixin
from .compression_common import apply_plan
from .configuration_llava_rc import LlavaNextRCConfig, LlavaOnevisionRCConfig, LlavaRCConfig
from .input_checks import check_pixel_values, flatten_crops


class LlavaRCForConditionalGeneration(LlavaFamilyMixin, LlavaForConditionalGeneration):
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
        check_pixel_values(pixel_values, self.config.vision_config, (("num_images",),))
        return pixel_values, [1] * pixel_values.shape[0]

    def _image_token_layouts(self, crops_per_image: list[int], image_sizes) -> list[ImageLayout]:
        """Image i reads the N patches of crop i in raster order."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        num_patches = side * side
        return [
            ImageLayout(torch.arange(image * num_patches, (image + 1) * num_patches), ((side, side),))
            for image in range(len(crops_per_image))
        ]


class LlavaNextRCForConditionalGeneration(LlavaFamilyMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT (anyres) that compresses each image's visual tokens according to ``config.compression``.

    Budget semantics, newline tokens and how [CLS]-based methods and RC read several crops: see the module
    docstring. ``generate(..., compression={...})`` and ``forward(..., compression={...})`` override the settings
    for one call.
    """

    config_class = LlavaNextRCConfig
    _continuation_inputs = ("pixel_values", "image_sizes")

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
        check_pixel_values(pixel_values, self.config.vision_config, (("num_images", "max_crops"), ("total_crops",)))
        sizes = self._image_sizes_list(image_sizes)
        crops_per_image = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in sizes
        ]
        crops = flatten_crops(pixel_values, crops_per_image, sizes)
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
            if count > 1 and num_newlines:  # a very wide image's unpadded grid can have no row: its base view alone
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
    "LlavaOnevisionRCForConditionalGeneration",
    "OnevisionImageGeometry",
    "LlavaRCCausalLMOutputWithPast",
    "LlavaRCForConditionalGeneration",
    "anyres_token_counts",
]


@dataclass(frozen=True)
class OnevisionImageGeometry:
    """What decides a LLaVA-OneVision image's tokens besides its pixels, in reading order.

    sizes: ((height, width), ...) of the original images; patched: for each image, True when it is read as base
    view + anyres grid (its row has one image), False when only its base view is (rows with several images, the
    stock ``batch_num_images`` rule); aspect_ratio: ``vision_aspect_ratio`` ("anyres_max_9"), the grid size above
    which the grid is bilinearly downsampled.
    """

    sizes: tuple[tuple[int, int], ...]
    patched: tuple[bool, ...]
    aspect_ratio: str


@dataclass
class OnevisionImageLayout(ImageLayout):
    """An ``ImageLayout`` whose non-newline ``token_index`` entries are the token's ordinal among the image's
    non-newline tokens (a downsampled token blends several patches, so no crop-token index describes it); the
    signals are put in reading order by the stock packing instead, from the image's crops and geometry."""

    first_crop: int = 0
    num_crops: int = 1
    size: tuple[int, int] = (0, 0)
    aspect_ratio: str = "anyres_max_9"


class LlavaOnevisionRCForConditionalGeneration(LlavaFamilyMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision (SigLIP tower without [CLS], Qwen2) that compresses each image's visual tokens.

    The image's tokens are those of the stock model: a single-image row reads the base view (N tokens, no newline)
    then the anyres grid unpadded to the image's aspect ratio, bilinearly downsampled when it exceeds
    ``vision_aspect_ratio`` ("anyres_max_9": about 9 crops), one newline per grid row; a row with several images
    reads each image's base view followed by one newline.

    - A budget counts the non-newline tokens M (base view + grid after downsampling, or the base view alone); newline
      tokens are never scored or counted and always kept, in place. Semantics otherwise as for LLaVA-NeXT
      (``modeling_llava_rc`` docstring): one selection per image over all its views, G-Prune per view.
    - Importance: SigLIP has no [CLS], so ``cls_attention``, PruMerge(+) and RC rank tokens by the mean attention each
      token receives from all tokens of its crop (``config.importance_score`` "received_attention"; RC's joint
      statistic uses one softmax over all heads), at the layer that reads the feature layer's output (the last
      layer for OneVision's -1), optionally without attention sinks (``config.attention_sinks``).
    - Downsampled grids: every per-crop signal (features, scores, keys, text similarities) is put in reading order by
      the stock ``pack_image_features`` itself, so a downsampled token's signals are the same bilinear blend as its
      features. A kept token is exactly the stock token (projected, then packed); a merged token is the projector
      of the merged vision features, a downsampled token's features being the blend of its patches' features.
    - Videos are not compressed: ``pixel_values_videos`` with compression on raise a ValueError; with
      ``compression={"method": "none"}`` the model is stock.
    """

    config_class = LlavaOnevisionRCConfig

    def __init__(self, config: LlavaOnevisionRCConfig):
        super().__init__(config)
        self._init_guidance_modules(config)

    # ---- the stock image inputs ----------------------------------------------------------------------------
    def image_geometry(self, image_sizes, batch_num_images=None, vision_aspect_ratio=None) -> OnevisionImageGeometry:
        """The geometry of the images from the stock inputs (``batch_num_images`` None: every image patched)."""
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes (I, 2), the (height, width) of each image; the "
                             "processor returns them")
        if isinstance(image_sizes, OnevisionImageGeometry):
            return image_sizes
        if isinstance(image_sizes, torch.Tensor) and isinstance(batch_num_images, torch.Tensor):
            # One host read for both (they sit on the device when the caller moved the processor's outputs there).
            host = torch.cat([image_sizes.flatten(), batch_num_images.flatten().to(image_sizes)]).tolist()
            num_sides = image_sizes.numel()
            image_sizes, batch_num_images = [host[i : i + 2] for i in range(0, num_sides, 2)], host[num_sides:]
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(size) for size in image_sizes]
        if batch_num_images is None:
            patched = [True] * len(sizes)
        else:
            counts = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else list(batch_num_images)
            if sum(counts) != len(sizes):
                raise ValueError(f"batch_num_images {counts} counts {sum(counts)} images, image_sizes {len(sizes)}")
            patched = [count == 1 for count in counts for _ in range(count)]
        return OnevisionImageGeometry(
            sizes=tuple(tuple(int(side) for side in size) for size in sizes),
            patched=tuple(patched),
            aspect_ratio=vision_aspect_ratio or self.config.vision_aspect_ratio,
        )

    def _image_crops(self, pixel_values: torch.Tensor, image_sizes) -> tuple[torch.Tensor, list[int]]:
        """pixel_values (I, P_max, 3, H, W) padded crops (or (sum P_i, 3, H, W)) -> (sum P_i, 3, H, W)."""
        check_pixel_values(pixel_values, self.config.vision_config, (("num_images", "max_crops"), ("total_crops",)))
        geometry = self.image_geometry(image_sizes)
        crops_per_image = [
            image_size_to_num_patches(
                image_size=list(size),
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            if patched
            else 1
            for size, patched in zip(geometry.sizes, geometry.patched)
        ]
        crops = flatten_crops(pixel_values, crops_per_image, list(geometry.sizes))
        return crops, crops_per_image

    def _image_token_layouts(self, crops_per_image: list[int], image_sizes) -> list[ImageLayout]:
        """The stock placeholder run of each image: the stock ``pack_image_features`` run on a constant 1-wide
        feature tells where the newline tokens are (the same code decides the grid, unpadding and downsampling)."""
        geometry = self.image_geometry(image_sizes)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        ones = [torch.ones(count, side * side, 1, dtype=torch.float64) for count in crops_per_image]  # (P_i, N, 1)
        newline = torch.tensor([float(NEWLINE)], dtype=torch.float64)
        packed, _ = self.model.pack_image_features(
            ones, [list(size) for size in geometry.sizes], image_newline=newline,
            vision_aspect_ratio=geometry.aspect_ratio,
        )
        starts = torch.tensor([0, *crops_per_image]).cumsum(0).tolist()
        layouts = []
        for image, (count, image_tokens) in enumerate(zip(crops_per_image, packed)):
            is_newline = image_tokens.squeeze(-1) == NEWLINE  # (T,)
            token_index = torch.full(is_newline.shape, NEWLINE, dtype=torch.long)
            token_index[~is_newline] = torch.arange(int((~is_newline).sum()))
            num_newlines = int(is_newline.sum())
            views = ((side, side),)
            if count > 1 and num_newlines:  # a very wide image's unpadded grid can have no row: its base view alone
                grid_tokens = token_index.shape[0] - num_newlines - side * side
                views = ((side, side), (num_newlines, grid_tokens // num_newlines))
            layouts.append(
                OnevisionImageLayout(
                    token_index, views, first_crop=starts[image], num_crops=count, size=geometry.sizes[image],
                    aspect_ratio=geometry.aspect_ratio,
                )
            )
        return layouts

    def _image_newline(self) -> torch.Tensor:
        return self.model.image_newline

    def _num_prefix_tokens(self) -> int:
        """SigLIP towers have no [CLS]; a CLIP tower would have one."""
        return 0 if "siglip" in self.config.vision_config.model_type else 1

    def _signal_packer(self, layouts: list[ImageLayout], device: torch.device):
        """The stock ``pack_image_features`` without newlines, run on any per-crop signal: linear (a reshape, the
        unpadding slice, the bilinear downsampling), so each token's signal is the blend its features are."""
        sizes = [list(layout.size) for layout in layouts]
        aspect_ratio = layouts[0].aspect_ratio

        def pack(per_crop: torch.Tensor | None) -> torch.Tensor | None:
            """(P, N, ...) per crop token -> (I_g, M, ...) per image token in reading order."""
            if per_crop is None:
                return None
            trailing = per_crop.shape[2:]
            flat = per_crop.reshape(*per_crop.shape[:2], -1)  # (P, N, F)
            images = [flat[layout.first_crop : layout.first_crop + layout.num_crops] for layout in layouts]
            packed, _ = self.model.pack_image_features(
                images, sizes, image_newline=None, vision_aspect_ratio=aspect_ratio
            )
            return torch.stack(packed).view(len(layouts), -1, *trailing)  # (I_g, M, ...)

        return pack

    def _plan_tokens(self, signals, plan, pack, settings) -> torch.Tensor:
        """A kept token is the stock token (projected, then packed); merged tokens: the projector of the merge."""
        if plan.is_selection and settings.stage != "projected":
            projected = signals.projected
            if projected is None:
                projected = self.model.multi_modal_projector(signals.features)  # (P, N, D)
            return apply_plan(pack(projected), plan)  # (I_g, K, D)
        return super()._plan_tokens(signals, plan, pack, settings)

    # ---- plumbing hooks: the stock OneVision inputs --------------------------------------------------------
    _image_inputs = (
        "vision_feature_layer", "vision_feature_select_strategy", "image_sizes", "batch_num_images", "vision_aspect_ratio"
    )
    _video_inputs = ("pixel_values_videos", "image_sizes_videos")
    _continuation_inputs = ("pixel_values", "image_sizes")

    def _encode_inputs(self, image_inputs: dict) -> dict:
        """``image_sizes``, ``batch_num_images`` and ``vision_aspect_ratio`` folded into one ``OnevisionImageGeometry``,
        the image argument the hooks receive (compression on only; off, the stock inputs go to the stock code)."""
        image_inputs = dict(image_inputs)
        image_inputs["image_sizes"] = self.image_geometry(
            image_inputs["image_sizes"], image_inputs.pop("batch_num_images"), image_inputs.pop("vision_aspect_ratio")
        )
        return image_inputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        compression: dict | str | None = None,
        guidance_mask: torch.Tensor | None = None,
        guidance_input_ids: torch.Tensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        Stock forward, except that with ``pixel_values`` and compression on, the image tokens are compressed first
        (see ``LlavaFamilyMixin.forward``). ``pixel_values_videos`` with compression on raise a ValueError.
        Without images, or with ``"none"``, nothing is parsed: the stock call.

        compression (`dict` or `str`, *optional*): settings for this call only; defaults to ``config.compression``.
        """
        return self._compressed_forward(
            compression,
            dict(
                input_ids=input_ids,
                pixel_values=pixel_values,
                image_sizes=image_sizes,
                pixel_values_videos=pixel_values_videos,
                image_sizes_videos=image_sizes_videos,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                vision_aspect_ratio=vision_aspect_ratio,
                batch_num_images=batch_num_images,
                labels=labels,
                logits_to_keep=logits_to_keep,
                **kwargs,
            ),
            dict(
                guidance_mask=guidance_mask,
                guidance_input_ids=guidance_input_ids,
                guidance_attention_mask=guidance_attention_mask,
            ),
        )
