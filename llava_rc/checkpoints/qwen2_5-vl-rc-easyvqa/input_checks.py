"""Input checks of the compression pre-pass: shapes and types, on the host, before any work.

Each error names the argument, the value or shape received and the one expected. No device reads.
"""

import torch


def check_input_shapes(
    input_ids, attention_mask, labels, guidance_mask, guidance_input_ids, guidance_attention_mask
) -> None:
    """Shape checks on the host (no device reads), before any work: each names the argument and its shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch_size, sequence_length) tensor, got {got}")
    batch_size, length = input_ids.shape
    if batch_size == 0 or length == 0:
        raise ValueError(
            f"input_ids of shape {tuple(input_ids.shape)} is empty; with pixel_values every image needs its "
            "placeholder tokens in input_ids"
        )
    for name, value in (("attention_mask", attention_mask), ("labels", labels), ("guidance_mask", guidance_mask)):
        if value is not None and tuple(value.shape) != (batch_size, length):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; expected {(batch_size, length)}, the shape of input_ids"
            )
    guidance = (("guidance_input_ids", guidance_input_ids), ("guidance_attention_mask", guidance_attention_mask))
    for name, value in guidance:
        if value is not None and (value.dim() != 2 or value.shape[0] != batch_size):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; expected ({batch_size}, guidance_length), one row per "
                "prompt of input_ids"
            )
    if (
        guidance_input_ids is not None
        and guidance_attention_mask is not None
        and guidance_attention_mask.shape != guidance_input_ids.shape
    ):
        raise ValueError(
            f"guidance_attention_mask has shape {tuple(guidance_attention_mask.shape)}; expected "
            f"{tuple(guidance_input_ids.shape)}, the shape of guidance_input_ids"
        )


def check_pixel_values(pixel_values, vision_config, leading: tuple[tuple[str, ...], ...]) -> None:
    """pixel_values must be a tensor of shape (*leading, channels, image_size, image_size) of ``vision_config``.

    leading: the names of the leading dims of each accepted layout, e.g. ``("num_images",)``.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    image_dims = (vision_config.num_channels, vision_config.image_size, vision_config.image_size)
    shape = tuple(pixel_values.shape)
    if all(len(shape) != len(dims) + 3 for dims in leading) or shape[-3:] != image_dims:
        expected = " or ".join(f"({', '.join(dims)}, {', '.join(map(str, image_dims))})" for dims in leading)
        raise ValueError(f"pixel_values has shape {shape}; expected {expected}")


def flatten_crops(pixel_values: torch.Tensor, crops_per_image: list[int], sizes: list) -> torch.Tensor:
    """Multi-crop images: (I, P_max, 3, H, W) padded crops, or (sum P_i, 3, H, W) -> (sum P_i, 3, H, W).

    crops_per_image: P_i, what each image's size needs; sizes: the images' (height, width), for the errors.
    """
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(crops_per_image):
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(sizes)}; expected one "
                "(height, width) per image"
            )
        if pixel_values.shape[1] < max(crops_per_image):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} crops per image but image_sizes {sizes} need "
                f"{crops_per_image} (base view + grid crops of the best-fitting image_grid_pinpoints)"
            )
        return torch.cat([images[:count] for images, count in zip(pixel_values, crops_per_image)])
    if pixel_values.shape[0] != sum(crops_per_image):
        raise ValueError(
            f"pixel_values of shape {tuple(pixel_values.shape)} does not fit image_sizes {sizes}: expected "
            f"(num_images, max_crops, 3, H, W) or ({sum(crops_per_image)}, 3, H, W) with crops {crops_per_image}"
        )
    return pixel_values
