"""Rebuild a batch of token sequences after each image's placeholder run has been shortened.

The LLaVA processor expands every ``<image>`` into a run of placeholder tokens: N for every image (LLaVA-1.5), or a
count of its own per image (LLaVA-NeXT anyres, where it depends on the image size). After compression image ``j``
keeps ``counts[j]`` tokens, so its run loses the rest and the batch is re-padded. Everything here is a pure tensor
function: no loops over rows or tokens, and at most one host sync (the new length), none when the caller knows the
new length on the host (``packed_width``: a fixed budget with every row's text length known).
"""

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PackedSequence:
    """The rebuilt batch. B rows, L' = the longest rebuilt row.

    input_ids: (B, L') ids with image placeholders kept for the kept tokens, ``pad_token_id`` in padding.
    attention_mask: (B, L') 1 on real tokens, 0 on padding.
    position_ids: (B, L') positions counted over real tokens only (padding gets 0), as generate() computes them.
    image_slot: (B, L') index into the flattened (I * K) compressed image tokens, -1 on text and padding.
    source_position: (B, L') the position each token had in the caller's sequence, -1 on padding.
    labels: (B, L') labels moved with their text tokens; image positions, padding and each row's first token are
        IGNORE_INDEX. None when no labels were given.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_slot: torch.Tensor
    source_position: torch.Tensor
    labels: torch.Tensor | None = None


def image_token_layout(
    is_image: torch.Tensor, tokens_per_image: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position, the image it belongs to and its offset inside that image's placeholder run.

    is_image: (B, L) bool. Images are numbered in reading order over the batch (row by row), which is the order of
    ``pixel_values``. tokens_per_image: the run length, one int for every image or (I,) long, one per image.
    Returns (image_index, offset), both (B, L) long, meaningful where ``is_image``.
    """
    ordinal = is_image.flatten().long().cumsum(0).view_as(is_image) - 1  # (B, L) running count of placeholders
    ordinal = ordinal.clamp(min=0)
    if isinstance(tokens_per_image, int):
        return ordinal // tokens_per_image, ordinal % tokens_per_image
    if tokens_per_image.numel() == 0:
        return torch.zeros_like(ordinal), ordinal
    run_ends = tokens_per_image.to(ordinal.device).cumsum(0)  # (I,) exclusive end of each image's run
    # The image of a placeholder is the number of runs that end at or before it.
    image_index = torch.searchsorted(run_ends, ordinal, right=True).clamp(max=run_ends.shape[0] - 1)  # (B, L)
    run_starts = run_ends - tokens_per_image.to(ordinal.device)  # (I,)
    return image_index, ordinal - run_starts[image_index]


def pack_sequences(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    image_token_id: int,
    tokens_per_image: int | torch.Tensor,
    kept_counts: torch.Tensor,
    slots_per_image: int,
    pad_token_id: int,
    pad_left: bool,
    new_length: int | None = None,
) -> PackedSequence:
    """Drop each image's placeholders past its kept count, drop padding, and re-pad the batch.

    input_ids: (B, L); attention_mask: (B, L) or None (no padding); labels: (B, L) or None.
    tokens_per_image: each image's placeholder run length, an int for all or (I,) long (see ``image_token_layout``).
    kept_counts: (I,) tokens kept per image, I = the number of images in the batch.
    slots_per_image: K, the stride of the flattened (I * K) compressed image tokens.
    pad_left: re-pad on the left (generation) or on the right.
    new_length: L', the longest rebuilt row, when the caller knows it on the host (``packed_width``); None reads it
        from the device (a host sync). A wrong value misaligns the batch: pass only a width computed from the same
        inputs.
    """
    batch_size, length = input_ids.shape
    device = input_ids.device
    is_image = input_ids == image_token_id  # (B, L)
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_image)
    image_index, offset = image_token_layout(is_image, tokens_per_image)  # (B, L), (B, L)
    num_images = kept_counts.shape[0]
    image_keeps = offset < kept_counts[image_index.clamp(max=max(num_images - 1, 0))] if num_images else is_image
    keep = real & (~is_image | image_keeps)  # (B, L)

    new_lengths = keep.sum(dim=1)  # (B,)
    if new_length is None:
        new_length = int(new_lengths.max()) if batch_size else 0  # the one host sync: the rebuilt width
    destination = keep.long().cumsum(dim=1) - 1  # (B, L) column in the rebuilt row
    if pad_left:
        destination = destination + (new_length - new_lengths).unsqueeze(1)
    # Dropped tokens go to a spare column past the end, which is cut off afterwards.
    destination = torch.where(keep, destination, torch.full_like(destination, new_length))

    def scatter_rows(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((batch_size, new_length + 1), fill, dtype=values.dtype, device=device)  # (B, L' + 1)
        return out.scatter(1, destination, values)[:, :new_length]

    positions = torch.arange(length, device=device).expand(batch_size, length)  # (B, L)
    new_ids = scatter_rows(input_ids, pad_token_id)
    source_position = scatter_rows(positions, -1)
    new_mask = (source_position >= 0).long()
    slot = image_index * slots_per_image + offset
    image_slot = scatter_rows(torch.where(is_image & keep, slot, torch.full_like(slot, -1)), -1)
    position_ids = (new_mask.cumsum(dim=1) - 1).masked_fill(new_mask == 0, 0)
    new_labels = None
    if labels is not None:
        text_labels = labels.masked_fill(is_image, IGNORE_INDEX)
        new_labels = scatter_rows(text_labels, IGNORE_INDEX)
        # A row's first token has no context of its own (left padding would otherwise let it be "predicted" from a
        # pad position), so it is never a target: the loss then equals that of each row alone, unpadded.
        new_labels = new_labels.masked_fill(position_ids == 0, IGNORE_INDEX)
    return PackedSequence(
        input_ids=new_ids,
        attention_mask=new_mask.to(attention_mask.dtype if attention_mask is not None else torch.long),
        position_ids=position_ids,
        image_slot=image_slot,
        source_position=source_position,
        labels=new_labels,
    )


def packed_width(
    row_placeholders: list[int], row_text: list[int], run_lengths: list[int], kept_counts: list[int]
) -> int | None:
    """The rebuilt width L' that ``pack_sequences`` would read from the device, computed from host integers.

    row_placeholders: (B,) placeholder tokens of each row; row_text: (B,) real (unmasked) text tokens of each row;
    run_lengths, kept_counts: (I,) each image's placeholder run and kept tokens, images in reading order (row by
    row). Assumes every placeholder is a real token. Returns max over rows of text + the kept tokens of its
    images, or None when a row's placeholders do not end on an image boundary (then let the device decide).
    A loop over rows and images on host integers, not tensors.
    """
    width, image = 0, 0
    for placeholders, text in zip(row_placeholders, row_text):
        kept = 0
        while placeholders > 0:
            if image >= len(run_lengths) or run_lengths[image] > placeholders:
                return None
            placeholders -= run_lengths[image]
            kept += min(kept_counts[image], run_lengths[image])
            image += 1
        width = max(width, text + kept)
    return width


def fill_image_slots(
    text_embeds: torch.Tensor, image_tokens: torch.Tensor, image_slot: torch.Tensor
) -> torch.Tensor:
    """Put the compressed image tokens into their slots of the rebuilt sequence.

    text_embeds: (B, L', D) embeddings of the rebuilt ids; image_tokens: (I, K, D); image_slot: (B, L').
    """
    flat_tokens = image_tokens.reshape(-1, image_tokens.shape[-1]).to(text_embeds.device, text_embeds.dtype)
    if flat_tokens.shape[0] == 0:
        return text_embeds
    gathered = flat_tokens[image_slot.clamp(min=0)]  # (B, L', D)
    return torch.where((image_slot >= 0).unsqueeze(-1), gathered, text_embeds)
