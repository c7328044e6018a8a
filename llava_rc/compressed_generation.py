"""Compression around the stock ``forward(labels)`` and ``generate()``: the transformers plumbing and cache rules.

``CompressedGenerationMixin`` goes in front of a stock class (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ...) and replaces one step: where the projected image features are merged into
the text sequence. What is compressed, and how, is planned by ``planning.CompressionPlanner`` (the vision tower once,
the method per image geometry, the rebuilt batch); this module only hands the result to the stock code.

``generate()`` does this as a pre-pass and hands the rebuilt ids, mask and merged embeddings to the stock
``generate()``: shrinking the sequence inside ``forward()`` would leave generate's mask and positions at the old
length (silently wrong). The caller's ``input_ids`` are put back in front of the new tokens afterwards.
``forward(labels=...)`` runs the same pre-pass for fine-tuning and returns the rebuilt labels and mask.
"""

from dataclasses import dataclass

import torch
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple

from .planning import (
    NEWLINE,
    NEWLINE_SOURCE,
    PADDING_SOURCE,
    SYNTHETIC_SOURCE,
    CompressedBatch,
    CompressionPlanner,
    CompressionReport,
    CropSignals,
    ImageLayout,
    host_to_device,
)

logger = logging.get_logger(__name__)

# Processor outputs that only the compression pre-pass reads.
GUIDANCE_INPUTS = ("guidance_mask", "guidance_input_ids", "guidance_attention_mask")
# Set on every cache filled from a compressed prompt (by generate() or forward()): it no longer lines up with the
# caller's ids, so generate() refuses to continue from it.
COMPRESSED_CACHE_FLAG = "llava_rc_compressed_prompt"


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



class CompressedGenerationMixin(CompressionPlanner):
    """Compression for a LLaVA-family ``...ForConditionalGeneration``: put it first in the bases.

    ``generate(..., compression={...})`` and ``forward(..., compression={...})`` override the settings for one
    call; nothing is stored on the model.
    """

    # ---- forward --------------------------------------------------------------------------------------------
    @can_return_tuple
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
        compression: dict | str | None = None,
        guidance_mask: torch.Tensor | None = None,
        guidance_input_ids: torch.Tensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        Stock forward, except that with ``pixel_values`` and compression on, the image tokens are compressed first
        and the returned logits, ``labels`` and ``attention_mask`` are at the compressed length (positions are
        recounted over the rebuilt mask; the batch keeps the caller's padding side: right when a row ends with
        padding, else left). So are ``hidden_states`` and ``attentions`` (``output_hidden_states``,
        ``output_attentions``): one position per token the language model read. ``return_dict=False`` returns
        the output as a tuple, as stock does. Without ``pixel_values``, or with method ``"none"``, this is exactly
        the stock call (nothing parsed when ``compression`` is None or a method name alone: graph-safe for
        ``torch.compile(fullgraph=True)``; other settings are validated on every path, as by ``generate()``). With
        ``use_cache=True`` the returned cache of a compressed call holds the compressed prompt: decode from it with
        the returned ``attention_mask``; ``generate(past_key_values=...)`` refuses it (see ``generate()``).

        compression (`dict` or `str`, *optional*): settings for this call, updating ``config.compression``: keys
            given replace the config's settings of the same method, naming another method starts from its defaults,
            e.g. ``{"budget": 64}`` or ``{"method": "cls_attention", "budget": 64}``; a method name alone means
            ``{"method": name}``.
        guidance_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 on the question's
            tokens, for text-guided methods (the processor makes it); defaults to every text token of the prompt.
        guidance_input_ids, guidance_attention_mask (`torch.Tensor` of shape `(batch_size, guidance_length)`,
            *optional*): the question tokenized for the CLIP text tower (``guidance="clip"``; the processor makes
            them). An all-zero mask row means the prompt has no question.
        """
        method = self._compression_method(compression)  # validates any setting beyond a method name
        if pixel_values is None or method == "none":
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
        settings = self.compression_settings(compression)
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
            image_sizes=image_sizes,
        )
        packed = batch.packed
        outputs = super().forward(
            input_ids=None,
            attention_mask=packed.attention_mask,
            position_ids=self._position_ids(packed),
            past_key_values=past_key_values,
            inputs_embeds=batch.inputs_embeds,
            labels=packed.labels,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        if outputs.past_key_values is not None:
            setattr(outputs.past_key_values, COMPRESSED_CACHE_FLAG, True)
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
    def generate(self, inputs: torch.Tensor | None = None, compression: dict | str | None = None, **kwargs):
        r"""Stock ``generate()`` with the image tokens compressed once, before the prefill.

        The returned sequences start with the caller's own ``input_ids``, so ``out[:, input_ids.shape[1]:]`` is
        exactly the new text. With ``return_dict_in_generate=True`` the output also carries ``compression``: a
        `CompressionReport`, or None when nothing was compressed (no images, or method ``"none"``). Streamers see
        the compressed prompt first. Absolute ``max_length``/``min_length`` keep their meaning relative to the
        caller's prompt.

        The returned ``past_key_values`` of a compressed call hold the compressed prompt, not ``out.sequences``:
        passing them back to continue is refused with a ValueError, as is any cache filled from a compressed prompt
        (``forward(use_cache=True)`` with compression on). Continue with ``generate(input_ids=out.sequences,
        pixel_values=..., attention_mask=...)`` without the cache (the prompt is compressed again).

        compression (`dict` or `str`, *optional*): settings for this call, updating ``config.compression`` (keys
            given replace the config's settings of the same method; naming another method starts from its defaults;
            a method name alone means ``{"method": name}``).
        """
        if getattr(kwargs.get("past_key_values"), COMPRESSED_CACHE_FLAG, False):
            raise ValueError(
                "past_key_values were filled from a compressed prompt (by generate() or forward() with compression "
                "on): they no longer line up with the caller's input_ids. Continue without the cache: "
                "generate(input_ids=out.sequences, pixel_values=..., attention_mask=...) compresses the images again"
            )
        settings = self.compression_settings(compression)  # parsed once per call, never per decoding step
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None or settings.method == "none":
            for name in GUIDANCE_INPUTS:
                kwargs.pop(name, None)
            if settings.method == "none":
                # forward() sees the per-call settings too, so a "none" override stays off in the prefill (and for
                # inputs the model refuses to compress, such as OneVision's videos).
                kwargs["compression"] = {"method": "none"}
            outputs = super().generate(input_ids, **kwargs)
            if not isinstance(outputs, torch.Tensor):
                outputs.compression = None
            return outputs
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("compression needs input_ids (to find the image placeholders) and no inputs_embeds")
        if kwargs.get("assistant_model") is not None:
            raise ValueError("assisted decoding is not supported with compression (it cannot start from embeddings)")

        kwargs.pop("pixel_values")
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
            image_sizes=kwargs.pop("image_sizes", None),
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
        if getattr(outputs, "past_key_values", None) is not None:
            setattr(outputs.past_key_values, COMPRESSED_CACHE_FLAG, True)
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


# The planning names are re-exported: model files and user code import them from here.
__all__ = [
    "COMPRESSED_CACHE_FLAG",
    "GUIDANCE_INPUTS",
    "NEWLINE",
    "NEWLINE_SOURCE",
    "PADDING_SOURCE",
    "SYNTHETIC_SOURCE",
    "CompressedBatch",
    "CompressedGenerationMixin",
    "CompressionReport",
    "CropSignals",
    "ImageLayout",
    "LlavaRCCausalLMOutputWithPast",
    "host_to_device",
]
