"""Qwen2.5-VL and Qwen3-VL whose visual tokens are compressed before the language model reads them.

``Qwen2_5_VLRCForConditionalGeneration`` and ``Qwen3VLRCForConditionalGeneration`` inherit everything from the stock
transformers classes and share the compression machinery (``planning``: settings, validation, text guidance, the
method call per image geometry, the batch rebuild, the report; ``compressed_generation``: ``forward()``,
``generate()``, the cache and continuation rules). ``QwenVLCompressionMixin`` answers the hooks; what differs from
the LLaVA line:

- encode: the stock ``get_image_features`` runs once; its output per image is already one token per language-model
  token (a 2 x 2 merge of ViT patches, raster order), so methods see those tokens and a budget counts them. There is
  no [CLS]: the importance of a token is the mean attention its four patches receive from all patches of the image
  at the last full-attention ViT block (Qwen2.5-VL: ``fullatt_block_indexes[-1]``, the last block in the released
  checkpoints, i.e. the attention that produces the features the merger reads; Qwen3-VL: every block attends over
  the whole image, the last one), recomputed from that block's input with its own norm, q/k projection and rotary
  embedding in query chunks (``vision_importance.received_attention``), summed per merge unit (so it sums to one per
  image), with Qwen2.5-VL's window permutation undone. Keys are the block's (pre-rotary) keys averaged per unit.
- layout: one raster view of (h / 2, w / 2) tokens per image, no newline tokens; a kept token is the stock token (a
  merged one the same weighted average of the stock tokens), and Qwen3-VL's DeepStack features follow the same plan.
- positions: 3-D M-RoPE. They are computed by the stock ``get_rope_index`` on the uncompressed sequence; every kept
  token keeps its (t, h, w) column (a merged token its anchor's, a token anchored at no patch the image's last),
  text keeps its original positions, so the language model reads each kept token where it was; the first of the
  four rows that ``generate()`` carries is a plain count over the shortened row (as stock builds it). ``generate()``
  hands those positions and the kept tokens (``mm_encoder_outputs``) to the stock ``generate()``, which continues
  every row at its last position + 1. ``model.model.rope_deltas`` is left as the compressed rows' (for decoding
  loops that do not pass positions).

Videos are not compressed: ``pixel_values_videos`` with compression on is refused; with method ``"none"`` the call is
the stock one. ``guidance="clip"`` is not available (no CLIP text space); ``"llm"`` guidance compares the question's
input embeddings with the image tokens, which live in the language model's space already.
"""

import inspect

import torch
import transformers
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .compressed_generation import CompressedGenerationMixin
from .compression_common import MethodConfig, TokenPlan
from .configuration_qwen_vl_rc import Qwen2_5_VLRCConfig, Qwen3VLRCConfig
from .planning import CompressedBatch, CropSignals, EncodedImages, ImageLayout, host_to_device
from .sequence_packing import PackedSequence
from .vision_importance import received_attention


class QwenVLCompressionMixin(CompressedGenerationMixin):
    """Compression for a Qwen-VL ``...ForConditionalGeneration`` (put it first in the bases): the planning hooks
    (``_encode_images``, ``_crop_signals``, ``_guidance_patches``, ``_language_model_batch``) and the plumbing ones
    (the stock input names, ``_language_model_inputs``, ``_after_compressed_call``, the stock ``forward`` signature).

    A model class supplies ``_importance_block`` (the ViT block whose attention ranks tokens), ``_window_index`` (the
    permutation of merge units the ViT runs on, or None) and ``_apply_rotary`` (the tower's rotary embedding of q/k).
    """

    def _init_guidance_modules(self, config) -> None:
        self.guidance_text_model = None  # no CLIP text tower: "clip" guidance is refused by the config

    # ---- the model's hooks ----------------------------------------------------------------------------------
    def _importance_block(self) -> int:
        raise NotImplementedError

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        return None

    def _apply_rotary(self, query, key, cos, sin):
        raise NotImplementedError

    # ---- planning hooks -------------------------------------------------------------------------------------
    def _merge_unit_importance(
        self, block_input: torch.Tensor, grid_thw: torch.Tensor, sizes: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Per LLM token (merge unit), every image concatenated in raster order: (importance per head (U,), joint (U,),
        keys (U, A), num_heads).

        block_input: (S, C) the importance block's input, S ViT patches in the order the ViT runs them (Qwen2.5-VL:
        window-permuted merge units of 4 consecutive patches); sizes: the S patches per image (t * h * w, host ints;
        an image has t = 1, the processor repeating a still image over the temporal patch, so an image is one
        attention segment).
        A loop over images (each attends only to itself, and images differ in size): the documented loop over image
        geometries.
        """
        from transformers.vision_utils import get_vision_position_ids  # transformers >= 5.23

        tower = self.model.visual
        block = tower.blocks[self._importance_block()]
        attention = block.attn
        num_heads = attention.num_heads
        seq_len = block_input.shape[0]
        unit = tower.spatial_merge_size**2
        normed = block.norm1(block_input)  # (S, C)
        query, key, _ = attention.qkv(normed).reshape(seq_len, 3, num_heads, -1).unbind(1)  # (S, H, d) each
        position_ids = get_vision_position_ids(grid_thw, tower.spatial_merge_size, kwargs={})
        cos, sin = tower.rotary_pos_emb(block_input, position_ids)  # (S, d) raster order
        window_index = self._window_index(grid_thw)
        if window_index is not None:
            cos, sin = (tower.permute_input_for_window_attn(x, window_index, seq_len=seq_len) for x in (cos, sin))
        rotated_query, rotated_key = self._apply_rotary(query, key, cos, sin)  # (S, H, d) each
        rotated_query = rotated_query.flatten(1)  # (S, A)
        rotated_key = rotated_key.flatten(1)  # (S, A)
        sinks = getattr(self.config, "attention_sinks", 0) or 0
        per_head, joint = [], []
        for image_query, image_key in zip(rotated_query.split(sizes), rotated_key.split(sizes)):
            image_query, image_key = image_query.unsqueeze(0), image_key.unsqueeze(0)  # (1, T, A)
            per_head.append(received_attention(image_query, image_key, num_heads, True, num_sinks=sinks)[0])
            joint.append(received_attention(image_query, image_key, num_heads, False, num_sinks=sinks)[0])
        per_head = torch.cat(per_head).view(-1, unit).sum(dim=-1)  # (U,) each unit's four patches together
        joint = torch.cat(joint).view(-1, unit).sum(dim=-1)  # (U,)
        keys = key.flatten(1).float().view(-1, unit, key.shape[1] * key.shape[2]).mean(dim=1)  # (U, A)
        if window_index is not None:
            raster = torch.argsort(window_index)  # (U,) window order -> raster order, as the stock ViT un-permutes
            per_head, joint, keys = per_head[raster], joint[raster], keys[raster]
        return per_head, joint, keys, num_heads

    def _encode_images(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        settings: MethodConfig,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> EncodedImages:
        """The stock ``get_image_features`` once: per image its LLM tokens (and DeepStack features), one 'crop' of
        h * w / 4 tokens read as one raster view. pixel_values: (S, patch values) as the stock processor makes them;
        image_grid_thw: (I, 3); mm_token_type_ids: (B, L) or None (then the image placeholders are the image tokens).
        """
        if "mm_encoder_outputs" not in inspect.signature(self.model.forward).parameters:
            raise ValueError(
                f"compression on Qwen-VL needs transformers >= 5.23 (generate's mm_encoder_outputs); this is "
                f"{transformers.__version__}. Upgrade transformers, or use compression={{'method': 'none'}}"
            )
        if settings.guidance_source == "clip":
            raise ValueError("guidance='clip' is not supported on Qwen-VL (no CLIP text tower); use guidance=None or 'auto'")
        if image_grid_thw is None:
            raise ValueError("compression needs image_grid_thw (the processor's (t, h, w) patch grid of every image)")
        merge = self.config.vision_config.spatial_merge_size
        grids = image_grid_thw.tolist()  # host ints: the geometry decides shapes
        patch_sizes = [t * h * w for t, h, w in grids]
        run_lengths = [size // merge**2 for size in patch_sizes]
        if pixel_values.shape[0] != sum(patch_sizes):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw {grids} describes "
                f"{sum(patch_sizes)}"
            )
        vision = self.model.get_image_features(
            pixel_values, image_grid_thw, output_hidden_states=settings.needs_attention, return_dict=True
        )
        tokens = torch.cat(vision.pooler_output)  # (U, D) every image's LLM tokens, raster order
        longest = max(run_lengths)
        # One image is one 'crop' of N_max slots; its layout reads its own n_i tokens as one raster view.
        layouts = [
            ImageLayout(token_index=torch.arange(count) + image * longest, views=((t * h // merge, w // merge),))
            for image, (count, (t, h, w)) in enumerate(zip(run_lengths, grids))
        ]
        return EncodedImages(
            layouts=layouts,
            crops_per_image=[1] * len(grids),
            non_finite=~tokens.isfinite().all(),
            description=f"image_grid_thw {grids} gives {run_lengths} tokens per image",
            device=tokens.device,
            state={
                "vision": vision,
                "image_grid_thw": image_grid_thw,
                "patch_sizes": patch_sizes,
                "mm_token_type_ids": mm_token_type_ids,
            },
        )

    def _crop_signals(self, encoded: EncodedImages, settings: MethodConfig) -> CropSignals:
        """(I, N_max, ...) per image, zero-padded: the stock tokens (``features``), the same with the DeepStack levels
        concatenated alongside (``projected``: what a plan keeps), and the merge-unit importance."""
        vision = encoded.state["vision"]
        run_lengths = [layout.token_index.shape[0] for layout in encoded.layouts]
        tokens = torch.cat(vision.pooler_output)  # (U, D)
        deepstack = getattr(vision, "deepstack_features", None) or []
        with_deepstack = torch.cat([tokens, *(torch.cat(level) for level in deepstack)], dim=-1)  # (U, D x (1+L))

        def per_image(values: torch.Tensor) -> torch.Tensor:
            """(U, ...) concatenated over images -> (I, N_max, ...) zero-padded, one 'crop' per image."""
            return nn.utils.rnn.pad_sequence(list(values.split(run_lengths)), batch_first=True)

        signals = CropSignals(features=per_image(tokens), projected=per_image(with_deepstack))
        if settings.needs_attention:
            with torch.no_grad():
                block_input = vision.hidden_states[self._importance_block()]  # (S, C) the block's input
                scores = self._merge_unit_importance(
                    block_input, encoded.state["image_grid_thw"], encoded.state["patch_sizes"]
                )
            signals.attention_per_head, signals.attention_joint = per_image(scores[0]), per_image(scores[1])
            signals.keys, signals.num_heads = per_image(scores[2]), scores[3]
        return signals

    def _guidance_patches(self, encoded: EncodedImages, signals: CropSignals, settings: MethodConfig) -> torch.Tensor:
        """"llm" guidance: the image tokens live in the language model's input space already."""
        return signals.features.detach()  # (I, N_max, D)

    def _language_model_batch(
        self,
        encoded: EncodedImages,
        packed: PackedSequence,
        image_tokens: torch.Tensor,
        plan: TokenPlan,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> dict:
        """3-D positions (stock ``get_rope_index`` on the uncompressed sequence, at the columns each kept token came
        from), ``rope_deltas``, and the kept tokens as the stock encoder output (``mm_encoder_outputs``)."""
        vision = encoded.state["vision"]
        run_lengths = [layout.token_index.shape[0] for layout in encoded.layouts]
        slots = image_tokens.shape[1]
        type_ids = encoded.state["mm_token_type_ids"]
        if type_ids is None:
            type_ids = (input_ids == self.config.image_token_id).int()
        original, _ = self.model.get_rope_index(
            input_ids, type_ids, encoded.state["image_grid_thw"], attention_mask=attention_mask
        )  # (3, B, L)
        slot = packed.image_slot  # (B, L') index into the flattened (I x K) kept tokens, -1 on text
        is_slot = slot >= 0
        flat_slot = slot.clamp(min=0)
        source = plan.source_index.to(slot.device).flatten()[flat_slot]  # (B, L') patch of the image, or < 0
        image_last = host_to_device([count - 1 for count in run_lengths], slot.device)[flat_slot // slots]
        source = torch.where(source >= 0, source, image_last)  # a token anchored at no patch: the image's last
        run_start = packed.source_position - flat_slot % slots  # (B, L') the kept run starts where the run did
        column = torch.where(is_slot, run_start + source, packed.source_position).clamp(min=0)  # (B, L')
        spatial = original.gather(2, column.unsqueeze(0).expand(3, -1, -1).to(original.device))  # (3, B, L')
        real_new = packed.attention_mask.bool().to(spatial.device)
        spatial = spatial.masked_fill(~real_new, 0)
        position_ids = torch.cat([packed.position_ids.unsqueeze(0).to(spatial.device), spatial])  # (4, B, L')
        rope_deltas = (spatial.amax(dim=(0, 2)) + 1 - real_new.sum(dim=1)).unsqueeze(1)  # (B, 1)

        width = vision.pooler_output[0].shape[-1]
        kept = image_tokens.flatten(0, 1)[slot[is_slot].to(image_tokens.device)]  # (sum kept, D x (1 + L))
        kept_tokens, *kept_levels = kept.split(width, dim=-1)  # in sequence order, image after image
        # Per image, as the stock encoder returns them: generate() splits them by rows for beams and return sequences.
        kept_counts = plan.counts.tolist()
        fields = {"pooler_output": kept_tokens.split(kept_counts)}
        if getattr(vision, "deepstack_features", None):
            fields["deepstack_features"] = [level.split(kept_counts) for level in kept_levels]
        return {
            "position_ids": position_ids,
            "rope_deltas": rope_deltas,
            "encoder_outputs": {"image": type(vision)(**fields)},
        }

    # ---- plumbing hooks -------------------------------------------------------------------------------------
    _image_inputs = ("image_grid_thw", "mm_token_type_ids")
    _video_inputs = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    _embedding_inputs = ("inputs_embeds", "mm_encoder_outputs")
    _continuation_inputs = ("pixel_values", "image_grid_thw")

    def _language_model_inputs(self, batch: CompressedBatch, generating: bool) -> dict:
        """The rebuilt ids, the 3-D positions and the kept tokens as ``mm_encoder_outputs`` (merged by the stock code,
        DeepStack included), for ``forward()`` and ``generate()`` alike."""
        return {
            "input_ids": batch.packed.input_ids,
            "position_ids": batch.position_ids,
            "mm_encoder_outputs": batch.encoder_outputs,
        }

    def _after_compressed_call(self, batch: CompressedBatch) -> None:
        """Decoding loops that pass no positions read ``model.model.rope_deltas``: the compressed rows'."""
        self.model.rope_deltas = batch.rope_deltas

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        compression: dict | None = None,
        guidance_mask: torch.Tensor | None = None,
        guidance_input_ids: torch.Tensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        Stock forward, except that with ``pixel_values`` and compression on, the image tokens are compressed first and
        the returned logits, ``labels`` and ``attention_mask`` are at the compressed length (3-D positions: each kept
        token keeps its stock position); see ``CompressedGenerationMixin._compressed_forward``. Without ``pixel_values``, or with
        method ``"none"``, this is exactly the stock call. ``pixel_values_videos`` need method ``"none"``.

        compression (`dict`, *optional*): settings for this call, updating ``config.compression``.
        guidance_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 on the question's
            tokens, for text-guided methods; defaults to every text token of the prompt.
        guidance_input_ids, guidance_attention_mask: unused on Qwen (``guidance="clip"`` is not supported).
        """
        return self._compressed_forward(
            compression,
            dict(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                second_per_grid_ts=second_per_grid_ts,
                logits_to_keep=logits_to_keep,
                mm_encoder_outputs=mm_encoder_outputs,
                **kwargs,
            ),
            dict(
                guidance_mask=guidance_mask,
                guidance_input_ids=guidance_input_ids,
                guidance_attention_mask=guidance_attention_mask,
            ),
        )


class Qwen2_5_VLRCForConditionalGeneration(QwenVLCompressionMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that compresses the visual tokens of every image (``config.compression``; per call
    ``compression=``). Importance is read at the last full-attention ViT block (``fullatt_block_indexes[-1]``)."""

    config_class = Qwen2_5_VLRCConfig

    def __init__(self, config: Qwen2_5_VLRCConfig):
        super().__init__(config)
        self._init_guidance_modules(config)

    def _importance_block(self) -> int:
        return self.config.vision_config.fullatt_block_indexes[-1]

    def _window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index  # transformers >= 5.23

        tower = self.model.visual
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=tower.spatial_merge_size,
            window_size=tower.window_size,
            patch_size=tower.patch_size,
            kwargs={},
        )
        return window_index

    def _apply_rotary(self, query, key, cos, sin):
        return modeling_qwen2_5_vl.apply_rotary_pos_emb_vision(query, key, cos, sin)


class Qwen3VLRCForConditionalGeneration(QwenVLCompressionMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL that compresses the visual tokens of every image; the DeepStack features follow the same plan.
    Importance is read at the last ViT block (every block attends over the whole image)."""

    config_class = Qwen3VLRCConfig

    def __init__(self, config: Qwen3VLRCConfig):
        super().__init__(config)
        self._init_guidance_modules(config)

    def _importance_block(self) -> int:
        return self.config.vision_config.depth - 1

    def _apply_rotary(self, query, key, cos, sin):
        return modeling_qwen3_vl.apply_rotary_pos_emb_vision(query, key, cos, sin)


__all__ = ["Qwen2_5_VLRCForConditionalGeneration", "Qwen3VLRCForConditionalGeneration"]
