"""LLaVA whose visual tokens are compressed before the language model reads them.

``LlavaRCForConditionalGeneration`` inherits everything from ``LlavaForConditionalGeneration`` and replaces one
step: where the projected image features are merged into the text sequence. With compression on:

1. the vision tower runs once; the method's inputs ([CLS] query/keys recomputed from the stored hidden states with
   the attention layer's own norm and q/k projections, text guidance scores) are gathered;
2. the method (a pure function from ``compression_registry.METHODS``) returns a plan: which patches survive and
   which originals each output token absorbs;
3. each image's placeholder run is shortened to its kept count, the batch is re-padded, and labels, attention
   mask and position ids are rebuilt to match (``sequence_packing``).

``generate()`` does this as a pre-pass and hands the rebuilt ids, mask and merged embeddings to the stock
``generate()``: shrinking the sequence inside ``forward()`` would leave generate's mask and positions at the old
length (silently wrong). The caller's ``input_ids`` are put back in front of the new tokens afterwards.
``forward(labels=...)`` runs the same pre-pass for fine-tuning and returns the rebuilt labels and mask.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.utils import logging

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, apply_plan
from .compression_registry import method_function, parse_compression
from .configuration_llava_rc import LlavaRCConfig
from .sequence_packing import IGNORE_INDEX, PackedSequence, fill_image_slots, image_token_layout, pack_sequences

logger = logging.get_logger(__name__)

# Processor outputs that only the compression pre-pass reads.
GUIDANCE_INPUTS = ("guidance_mask", "guidance_input_ids", "guidance_attention_mask")


@dataclass
class CompressionReport:
    """What compression did to the images of one call (I images in reading order, K = the largest kept count).

    method: the method's settings as plain JSON.
    num_patches: N, the patch tokens each image had before compression.
    kept_counts: (I,) tokens the language model read for each image.
    source_index: (I, K) the original patch each output token stands for (-1 for synthetic tokens and padding).
    absorbed: (I, K, N) bool, which original patches contributed to each output token (merging methods), or the
        one-hot of ``source_index`` (selection methods).
    """

    method: dict
    num_patches: int
    kept_counts: torch.Tensor
    source_index: torch.Tensor
    absorbed: torch.Tensor


@dataclass
class LlavaRCCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    labels (`torch.LongTensor` of shape `(batch_size, compressed_length)`, *optional*):
        The labels realigned to the compressed sequence (image positions and padding are -100), for code that
        aligns logits with its own targets.
    attention_mask (`torch.LongTensor` of shape `(batch_size, compressed_length)`, *optional*):
        The attention mask of the compressed sequence.
    compression (`CompressionReport`, *optional*):
        Per-image kept counts and provenance.
    """

    labels: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None
    compression: CompressionReport | None = None


@dataclass
class CompressedBatch:
    """The language model's input after compression, plus what happened."""

    inputs_embeds: torch.Tensor
    packed: PackedSequence
    report: CompressionReport


class LlavaRCForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA that compresses each image's visual tokens according to ``config.compression``.

    ``generate(..., compression={...})`` and ``forward(..., compression={...})`` override the settings for one
    call; nothing is stored on the model.
    """

    config_class = LlavaRCConfig

    def __init__(self, config: LlavaRCConfig):
        super().__init__(config)
        # "clip" guidance (the RC paper): CLIP's text tower and both projections into the shared space.
        self.guidance_text_model = None
        if config.guidance_text_config is not None:
            text_config = CLIPTextConfig(**config.guidance_text_config)
            projection_dim = config.guidance_projection_dim
            self.guidance_text_model = CLIPTextModel(text_config)
            self.guidance_text_projection = nn.Linear(text_config.hidden_size, projection_dim, bias=False)
            self.guidance_visual_projection = nn.Linear(
                config.vision_config.hidden_size, projection_dim, bias=False
            )
            self.post_init()

    # ---- settings -------------------------------------------------------------------------------------------
    def compression_settings(self, compression: dict | MethodConfig | None = None) -> MethodConfig:
        """The validated settings for a call: the per-call override if given, else the config's."""
        return parse_compression(compression if compression is not None else self.config.compression)

    # ---- the pre-pass ---------------------------------------------------------------------------------------
    def _vision_feature_layer(self, vision_feature_layer) -> int:
        layer = vision_feature_layer if vision_feature_layer is not None else self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(
                f"compression supports a single vision_feature_layer (an int), got {layer!r}; "
                "use compression={'method': 'none'} for multi-layer features"
            )
        return layer

    def _attention_inputs(self, hidden_states: tuple, feature_layer: int, settings: MethodConfig):
        """[CLS] query (I, A) and keys (I, 1 + N, A) recomputed from the stored hidden states.

        Layer ``l`` of the encoder reads ``hidden_states[l]``; by default the attention layer is the one that reads
        the feature layer's output (for LLaVA's -2, the last layer), or the last layer when the features are the
        final output. The layer's own pre-norm and q/k projections are applied, so no hooks and no
        ``output_attentions`` are needed and SDPA/FlashAttention stay on.
        """
        tower = self.model.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise ValueError(
                f"{settings.method!r} reads [CLS] attention, which needs a CLIP-style vision tower with an encoder "
                f"of attention layers; got {type(tower).__name__}"
            )
        layers = encoder.layers
        num_layers = len(layers)
        requested = getattr(settings, "cls_attention_layer", None)
        if requested is None:
            layer_index = min(feature_layer % (num_layers + 1), num_layers - 1)
        elif -num_layers <= requested < num_layers:
            layer_index = requested % num_layers
        else:
            raise ValueError(
                f"cls_attention_layer={requested} is out of range for a vision tower with {num_layers} layers; "
                f"expected an int in [-{num_layers}, {num_layers - 1}]"
            )
        layer = layers[layer_index]
        normed = layer.layer_norm1(hidden_states[layer_index])  # (I, 1 + N, C)
        query = layer.self_attn.q_proj(normed[:, 0])  # (I, A)
        keys = layer.self_attn.k_proj(normed)  # (I, 1 + N, A)
        return query, keys, layer.self_attn.num_heads

    def _llm_question(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        guidance_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``"llm"`` guidance: the mean of the normalised input embeddings of each prompt's question tokens.

        The question is ``guidance_mask`` (B, L) when the processor gives one, else every real text token; with
        labels, only tokens whose label is ignored (the prompt, never the answer). Returns (B, D) float32 and
        has_text (B,) bool.
        """
        is_image = input_ids == self.config.image_token_id  # (B, L)
        if guidance_mask is None:
            question = ~is_image
            if attention_mask is not None:
                question &= attention_mask.bool()
            if labels is not None:
                question &= labels == IGNORE_INDEX
        else:
            question = guidance_mask.bool() & ~is_image
        embeds = self.get_input_embeddings()(input_ids).float()  # (B, L, D)
        embeds = torch.nn.functional.normalize(embeds, dim=-1) * question.unsqueeze(-1)
        question_sizes = question.sum(dim=1)  # (B,)
        return embeds.sum(dim=1) / question_sizes.clamp(min=1).unsqueeze(-1), question_sizes > 0

    def _clip_question(
        self, guidance_input_ids: torch.Tensor | None, guidance_attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``"clip"`` guidance: the CLIP text tower's projected embedding of each prompt's question, (B, P) float32.

        A row whose guidance mask is all zeros has no question (has_text False).
        """
        if self.guidance_text_model is None:
            raise ValueError(
                "guidance='clip' needs a CLIP text tower, which this model does not have (its config has no "
                "guidance_text_config); use guidance='llm'"
            )
        if guidance_input_ids is None:
            raise ValueError(
                "guidance='clip' needs guidance_input_ids (the question tokenized by the guidance tokenizer); "
                "use LlavaRCProcessor, which makes them"
            )
        if guidance_attention_mask is None:
            guidance_attention_mask = torch.ones_like(guidance_input_ids)
        if guidance_input_ids.shape[-1] == 0:  # every question empty: nothing to encode
            batch_size = guidance_input_ids.shape[0]
            width = self.guidance_text_projection.out_features
            no_text = torch.zeros(batch_size, dtype=torch.bool, device=guidance_input_ids.device)
            return torch.zeros(batch_size, width, device=guidance_input_ids.device), no_text
        pooled = self.guidance_text_model(
            input_ids=guidance_input_ids, attention_mask=guidance_attention_mask
        ).pooler_output  # (B, W) the EOS token's state
        return self.guidance_text_projection(pooled).float(), guidance_attention_mask.bool().any(dim=1)

    @staticmethod
    def _image_rows(is_image: torch.Tensor, num_images: int, tokens_per_image: int) -> torch.Tensor:
        """(I,) the batch row of each image: every placeholder scatters its row to its image (others to a spare)."""
        image_index, _ = image_token_layout(is_image, tokens_per_image)  # (B, L)
        rows = torch.arange(is_image.shape[0], device=is_image.device).unsqueeze(1).expand_as(image_index)
        target = torch.where(is_image, image_index, torch.full_like(image_index, num_images))
        image_row = torch.zeros(num_images + 1, dtype=torch.long, device=is_image.device)
        return image_row.scatter(0, target.flatten(), rows.flatten())[:num_images]

    def compress_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        settings: MethodConfig | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        guidance_mask: torch.Tensor | None = None,
        guidance_input_ids: torch.Tensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        pad_left: bool | None = None,
    ) -> CompressedBatch:
        """Encode the images once, compress them, and rebuild the batch around the kept tokens.

        input_ids: (B, L) with each image expanded to N placeholder tokens; pixel_values: (I, 3, H, W), the images
        in reading order; attention_mask, labels, guidance_mask: (B, L) or None; guidance_input_ids,
        guidance_attention_mask: (B, T) the question for the CLIP text tower, or None. pad_left: re-pad side; None
        keeps the caller's side (left when any row starts with padding).
        """
        settings = settings if settings is not None else self.compression_settings()
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"compression needs vision_feature_select_strategy='default' (patch tokens without [CLS]), "
                f"got {strategy!r}"
            )
        feature_layer = self._vision_feature_layer(vision_feature_layer)
        vision_config = self.config.vision_config
        image_token_id = self.config.image_token_id
        is_image = input_ids == image_token_id
        num_images = pixel_values.shape[0]
        grid = (vision_config.image_size // vision_config.patch_size,) * 2
        tokens_per_image = grid[0] * grid[1]
        # One host sync for validation: clear errors instead of silently misaligned tokens.
        num_placeholders, starts_with_padding = torch.stack(
            [
                is_image.sum(),
                (attention_mask[:, 0] == 0).any() if attention_mask is not None else is_image.new_zeros(()),
            ]
        ).tolist()
        if num_placeholders == 0:
            raise ValueError(
                f"pixel_values holds {num_images} image(s) but input_ids has no image token "
                f"(id {image_token_id}); put the processor's image placeholder in the prompt"
            )
        if num_placeholders != num_images * tokens_per_image:
            raise ValueError(
                f"input_ids has {num_placeholders} image tokens but pixel_values holds {num_images} image(s) of "
                f"{tokens_per_image} patches each (expected {num_images * tokens_per_image} image tokens)"
            )
        if pad_left is None:
            pad_left = bool(starts_with_padding)

        vision_tower = self.model.vision_tower
        vision_outputs = vision_tower(
            pixel_values.to(vision_tower.dtype), output_hidden_states=True, return_dict=True
        )
        hidden_states = vision_outputs.hidden_states
        features = hidden_states[feature_layer][:, 1:]  # (I, N, C) patch tokens without [CLS]

        function = method_function(settings)
        guidance = settings.guidance_source
        projected = None
        if settings.stage == "projected" or guidance == "llm":
            projected = self.model.multi_modal_projector(features)  # (I, N, D)
        with torch.no_grad():
            inputs = CompressionInputs(features=features.detach(), grid=grid)
            if settings.stage == "projected":
                inputs.features = projected.detach()
            if settings.needs_attention:
                query, keys, num_heads = self._attention_inputs(hidden_states, feature_layer, settings)
                inputs.cls_query, inputs.attention_keys, inputs.num_heads = query, keys, num_heads
            if guidance is not None:
                if guidance == "llm":
                    question, has_text = self._llm_question(input_ids, attention_mask, labels, guidance_mask)
                    patches = projected.detach()  # (I, N, D)
                else:
                    question, has_text = self._clip_question(guidance_input_ids, guidance_attention_mask)
                    # CLIP's own image-text space: the final layer's patch tokens, post-norm, visual projection.
                    final_patches = vision_tower.post_layernorm(hidden_states[-1][:, 1:])  # (I, N, C)
                    patches = self.guidance_visual_projection(final_patches)  # (I, N, P)
                image_row = self._image_rows(is_image, num_images, tokens_per_image).to(patches.device)
                inputs.text_scores = torch.nn.functional.cosine_similarity(
                    patches.float(), question.to(patches.device)[image_row].unsqueeze(1), dim=-1
                )  # (I, N)
                inputs.has_text = has_text.to(patches.device)[image_row]
                inputs.guidance_dim = patches.shape[-1]
            plan: TokenPlan = function(inputs, settings)

        if settings.stage == "projected":
            image_tokens = apply_plan(projected, plan)  # (I, K, D)
        else:
            image_tokens = self.model.multi_modal_projector(apply_plan(features, plan))  # (I, K, D)

        packed = pack_sequences(
            input_ids,
            attention_mask,
            labels,
            image_token_id=image_token_id,
            tokens_per_image=tokens_per_image,
            kept_counts=plan.counts,
            slots_per_image=image_tokens.shape[1],
            pad_token_id=self._pad_token_id(),
            pad_left=pad_left,
        )
        text_embeds = self.get_input_embeddings()(packed.input_ids)  # (B, L', D)
        inputs_embeds = fill_image_slots(text_embeds, image_tokens, packed.image_slot)
        report = CompressionReport(
            method=settings.to_dict(),
            num_patches=tokens_per_image,
            kept_counts=plan.counts,
            source_index=plan.source_index,
            absorbed=plan.absorbed_for(tokens_per_image),
        )
        return CompressedBatch(inputs_embeds=inputs_embeds, packed=packed, report=report)

    def _pad_token_id(self) -> int:
        for candidate in (
            self.generation_config.pad_token_id,
            getattr(self.config, "pad_token_id", None),
            getattr(self.config.text_config, "pad_token_id", None),
        ):
            if isinstance(candidate, int):
                return candidate
        return 0

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        compression: dict | None = None,
        guidance_mask: torch.Tensor | None = None,
        guidance_input_ids: torch.Tensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        r"""
        Stock LLaVA forward, except that with ``pixel_values`` and compression on, the image tokens are compressed
        first and the returned logits, ``labels`` and ``attention_mask`` are at the compressed length (positions are
        recounted over the rebuilt mask).

        compression (`dict`, *optional*): settings for this call only, e.g. ``{"method": "cls_attention",
            "budget": 64}``; defaults to ``config.compression``.
        guidance_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 on the question's
            tokens, for text-guided methods (the processor makes it); defaults to every text token of the prompt.
        guidance_input_ids, guidance_attention_mask (`torch.Tensor` of shape `(batch_size, guidance_length)`,
            *optional*): the question tokenized for the CLIP text tower (``guidance="clip"``; the processor makes
            them). An all-zero mask row means the prompt has no question.
        """
        settings = self.compression_settings(compression)
        if pixel_values is None or settings.method == "none":
            return super().forward(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                labels=labels,
                logits_to_keep=logits_to_keep,
                image_sizes=image_sizes,
                **kwargs,
            )
        if input_ids is None or inputs_embeds is not None:
            raise ValueError(
                "compression needs input_ids (to find the image placeholders) and no inputs_embeds; "
                "pass input_ids, or compression={'method': 'none'}"
            )
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError(
                "pixel_values with a non-empty past_key_values: compression rebuilds the whole prompt, so images "
                "must come with the first forward of a sequence"
            )
        if position_ids is not None:
            logger.warning_once("position_ids are recomputed over the compressed sequence; the given ones are unused")
        batch = self.compress_inputs(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            labels=labels,
            settings=settings,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            guidance_mask=guidance_mask,
            guidance_input_ids=guidance_input_ids,
            guidance_attention_mask=guidance_attention_mask,
        )
        packed = batch.packed
        outputs = super().forward(
            input_ids=None,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            past_key_values=past_key_values,
            inputs_embeds=batch.inputs_embeds,
            labels=packed.labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return LlavaRCCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            labels=packed.labels,
            attention_mask=packed.attention_mask,
            compression=batch.report,
        )

    # ---- generate -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, compression: dict | None = None, **kwargs):
        r"""Stock ``generate()`` with the image tokens compressed once, before the prefill.

        The returned sequences start with the caller's own ``input_ids``, so ``out[:, input_ids.shape[1]:]`` is
        exactly the new text. With ``return_dict_in_generate=True`` the output also carries ``compression``
        (a `CompressionReport`). Streamers see the compressed prompt first. Absolute ``max_length``/``min_length``
        keep their meaning relative to the caller's prompt.

        compression (`dict`, *optional*): settings for this call only; defaults to ``config.compression``.
        """
        settings = self.compression_settings(compression)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None or settings.method == "none":
            for name in GUIDANCE_INPUTS:
                kwargs.pop(name, None)
            if pixel_values is not None:
                # forward() sees the per-call settings too, so a "none" override stays off in the prefill.
                kwargs["compression"] = settings.to_dict()
            return super().generate(input_ids, **kwargs)
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("compression needs input_ids (to find the image placeholders) and no inputs_embeds")
        if kwargs.get("assistant_model") is not None:
            raise ValueError("assisted decoding is not supported with compression (it cannot start from embeddings)")

        kwargs.pop("pixel_values")
        kwargs.pop("image_sizes", None)
        attention_mask = kwargs.pop("attention_mask", None)
        batch = self.compress_inputs(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            settings=settings,
            vision_feature_layer=kwargs.pop("vision_feature_layer", None),
            vision_feature_select_strategy=kwargs.pop("vision_feature_select_strategy", None),
            guidance_mask=kwargs.pop("guidance_mask", None),
            guidance_input_ids=kwargs.pop("guidance_input_ids", None),
            guidance_attention_mask=kwargs.pop("guidance_attention_mask", None),
            pad_left=True,
        )
        packed = batch.packed
        self._shift_absolute_lengths(kwargs, packed.input_ids.shape[1] - input_ids.shape[1])
        outputs = super().generate(
            input_ids=packed.input_ids,
            inputs_embeds=batch.inputs_embeds,
            attention_mask=packed.attention_mask,
            **kwargs,
        )
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        copies = sequences.shape[0] // input_ids.shape[0]  # beams / num_return_sequences
        new_tokens = sequences[:, packed.input_ids.shape[1] :]
        restored = torch.cat([input_ids.to(sequences.device).repeat_interleave(copies, dim=0), new_tokens], dim=1)
        if isinstance(outputs, torch.Tensor):
            return restored
        outputs.sequences = restored
        outputs["compression"] = batch.report
        return outputs

    def _shift_absolute_lengths(self, kwargs: dict, delta: int) -> None:
        """Keep absolute ``max_length``/``min_length`` relative to the caller's prompt after it changed by delta."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        max_new_tokens = kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        if max_new_tokens is None:
            max_length = kwargs.get("max_length", generation_config.max_length)
            if max_length is not None:
                kwargs["max_length"] = max(1, max_length + delta)
        min_new_tokens = kwargs.get("min_new_tokens", generation_config.min_new_tokens)
        min_length = kwargs.get("min_length", generation_config.min_length)
        if min_new_tokens is None and min_length:
            kwargs["min_length"] = max(0, min_length + delta)


__all__ = ["LlavaRCForConditionalGeneration", "LlavaRCCausalLMOutputWithPast", "CompressionReport"]
