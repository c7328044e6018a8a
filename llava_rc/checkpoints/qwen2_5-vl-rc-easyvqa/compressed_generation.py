"""Compression around the stock ``forward(labels)`` and ``generate()``: the transformers plumbing and cache rules.

``CompressedGenerationMixin`` goes in front of a stock class (``LlavaForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ..., behind the family's hooks) and replaces one step: where the image
features enter the text sequence. What is compressed, and how, is planned by ``planning.CompressionPlanner`` (the
vision tower once, the method per image geometry, the rebuilt batch); this module only hands the result to the stock
code, the same way for every family (the family names its stock inputs and what the stock call reads).

``generate()`` does this as a pre-pass and hands the rebuilt ids, mask and the family's language-model input (merged
embeddings; Qwen: 3-D positions and ``mm_encoder_outputs``) to the stock ``generate()``: shrinking the sequence inside ``forward()`` would leave generate's mask and positions at the old
length (silently wrong). The caller's ``input_ids`` are put back in front of the new tokens afterwards.
``forward(labels=...)`` runs the same pre-pass for fine-tuning and returns the rebuilt labels and mask.
"""

from dataclasses import dataclass

import torch
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
from transformers.utils import logging

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
    """Compression around the stock ``forward()`` / ``generate()`` of a ``...ForConditionalGeneration``: put it first
    in the bases (after the family's hooks).

    ``generate(..., compression={...})`` and ``forward(..., compression={...})`` override the settings for one
    call; nothing is stored on the model. The rules here (validation order, the stock path, the cache flag, the
    continuation rule, restoring the caller's ids) are the same for every family; a family says only which stock
    arguments are its image, video and embedding inputs (the class attributes below) and answers the plumbing hooks
    ``_encode_inputs``, ``_language_model_inputs`` and ``_after_compressed_call``. Its ``forward`` states the stock
    signature (plus ``compression`` and the guidance inputs) and calls ``_compressed_forward``.
    """

    # Stock arguments besides pixel_values that the encode reads (``compress_inputs`` keywords, through
    # ``_encode_inputs``): with compression on they go to the pre-pass instead of the stock call.
    _image_inputs: tuple[str, ...] = ()
    # Stock video arguments, the pixels first: refused with compression on (forward() then drops them).
    _video_inputs: tuple[str, ...] = ()
    # Stock arguments that hand the language model precomputed input: refused with compression on (it builds that
    # input itself).
    _embedding_inputs: tuple[str, ...] = ("inputs_embeds",)
    # What a continuation must pass again, named in the error that refuses a compressed cache.
    _continuation_inputs: tuple[str, ...] = ("pixel_values",)

    # ---- plumbing hooks -------------------------------------------------------------------------------------
    def _encode_inputs(self, image_inputs: dict) -> dict:
        """The stock image arguments (``_image_inputs`` by name) -> keyword arguments of ``compress_inputs``."""
        return image_inputs

    def _language_model_inputs(self, batch: CompressedBatch, generating: bool) -> dict:
        """What the stock ``forward()`` (generating False) or ``generate()`` reads besides the rebuilt mask and labels.

        Default: the merged embeddings; ``generate()`` also gets the rebuilt ids for its bookkeeping (and counts the
        positions itself over the mask), ``forward()`` the positions of ``_position_ids``. The caller's position ids
        are replaced (with a warning) by forward() always, by generate() where this returns position ids.
        """
        if generating:
            return {"input_ids": batch.packed.input_ids, "inputs_embeds": batch.inputs_embeds}
        return {"input_ids": None, "inputs_embeds": batch.inputs_embeds, "position_ids": self._position_ids(batch.packed)}

    def _after_compressed_call(self, batch: CompressedBatch) -> None:
        """Runs after the stock call of a compressed prompt (Qwen: ``rope_deltas`` of the compressed rows)."""

    # ---- forward --------------------------------------------------------------------------------------------
    def _refuse_video(self, method: str | None, inputs: dict) -> None:
        if self._video_inputs and inputs.get(self._video_inputs[0]) is not None and method != "none":
            raise ValueError(
                f"compression method {method!r} compresses images, not videos: pass compression={{'method': 'none'}} "
                f"for a call with {self._video_inputs[0]}"
            )

    def _refuse_embeddings(self, input_ids, inputs: dict, hint: str = "") -> None:
        if input_ids is None or any(inputs.get(name) is not None for name in self._embedding_inputs):
            raise ValueError(
                f"compression needs input_ids (to find the image placeholders) and no "
                f"{' or '.join(self._embedding_inputs)}{hint}"
            )

    def _compressed_forward(self, compression, inputs: dict, guidance: dict):
        """The shared ``forward()``: ``inputs`` holds the stock forward's arguments by name (extra keyword arguments
        included), ``guidance`` the three guidance inputs. Returns a ``ModelOutput`` (the family's ``forward`` is
        wrapped in ``can_return_tuple``).

        Without ``pixel_values``, or with method ``"none"``, this is the stock call with the caller's arguments.
        Otherwise the images are compressed first (``compress_inputs``) and the stock forward reads the rebuilt
        batch: logits, ``labels``, ``attention_mask``, ``hidden_states`` and ``attentions`` come back at the
        compressed length; given ``position_ids`` are replaced (with a warning); a non-empty cache, video inputs and
        precomputed embeddings are refused; a cache filled here is flagged so that ``generate()`` refuses to
        continue it.
        """
        method = self._compression_method(compression)  # validates any setting beyond a method name
        self._refuse_video(method, inputs)
        if inputs.get("pixel_values") is None or method == "none":
            return super().forward(**inputs)
        settings = self.compression_settings(compression)
        input_ids = inputs.pop("input_ids")
        self._refuse_embeddings(input_ids, inputs, "; pass input_ids, or compression={'method': 'none'}")
        past_key_values = inputs.get("past_key_values")
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError(
                "pixel_values with a non-empty past_key_values: compression rebuilds the whole prompt, so images "
                "must come with the first forward of a sequence"
            )
        for name in (*self._embedding_inputs, *self._video_inputs):
            inputs.pop(name, None)
        if inputs.pop("position_ids", None) is not None:
            logger.warning_once("position_ids are recomputed over the compressed sequence; the given ones are unused")
        labels = inputs.pop("labels", None)
        batch = self.compress_inputs(
            input_ids,
            inputs.pop("pixel_values"),
            attention_mask=inputs.pop("attention_mask", None),
            labels=labels,
            settings=settings,
            **guidance,
            **self._encode_inputs({name: inputs.pop(name, None) for name in self._image_inputs}),
        )
        packed = batch.packed
        outputs = super().forward(
            attention_mask=packed.attention_mask,
            labels=packed.labels,
            return_dict=True,
            **self._language_model_inputs(batch, generating=False),
            **inputs,
        )
        self._after_compressed_call(batch)
        if outputs.past_key_values is not None:  # it holds the compressed prompt: generate() refuses to continue it
            setattr(outputs.past_key_values, COMPRESSED_CACHE_FLAG, True)
        return LlavaRCCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=getattr(outputs, "image_hidden_states", None),
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
        pixel_values=..., attention_mask=...)`` (plus the family's other image inputs) without the cache (the prompt
        is compressed again).

        compression (`dict` or `str`, *optional*): settings for this call, updating ``config.compression`` (keys
            given replace the config's settings of the same method; naming another method starts from its defaults;
            a method name alone means ``{"method": name}``).
        """
        if getattr(kwargs.get("past_key_values"), COMPRESSED_CACHE_FLAG, False):
            again = ", ".join(f"{name}=..." for name in self._continuation_inputs)
            raise ValueError(
                "past_key_values were filled from a compressed prompt (by generate() or forward() with compression "
                "on): they no longer line up with the caller's input_ids. Continue without the cache: "
                f"generate(input_ids=out.sequences, {again}, attention_mask=...) compresses the images again"
            )
        settings = self.compression_settings(compression)  # parsed once per call, never per decoding step
        self._refuse_video(settings.method, kwargs)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None or settings.method == "none":
            for name in GUIDANCE_INPUTS:
                kwargs.pop(name, None)
            if settings.method == "none":
                # forward() sees the per-call settings too, so a "none" override stays off in the prefill (and for
                # inputs the model refuses to compress, such as videos).
                kwargs["compression"] = {"method": "none"}
            outputs = super().generate(input_ids, **kwargs)
            if not isinstance(outputs, torch.Tensor):
                outputs.compression = None
            return outputs
        self._refuse_embeddings(input_ids, kwargs)
        if kwargs.get("assistant_model") is not None:
            raise ValueError("assisted decoding is not supported with compression")

        kwargs.pop("pixel_values")
        attention_mask = kwargs.pop("attention_mask", None)
        batch = self.compress_inputs(
            input_ids,
            pixel_values,
            attention_mask=attention_mask,
            settings=settings,
            pad_left=True,
            **{name: kwargs.pop(name, None) for name in GUIDANCE_INPUTS},
            **self._encode_inputs({name: kwargs.pop(name, None) for name in self._image_inputs}),
        )
        packed = batch.packed
        handoff = self._language_model_inputs(batch, generating=True)
        if "position_ids" in handoff and kwargs.pop("position_ids", None) is not None:
            logger.warning_once("position_ids are recomputed over the compressed sequence; the given ones are unused")
        self._shift_absolute_lengths(kwargs, packed.input_ids.shape[1] - input_ids.shape[1])
        outputs = super().generate(attention_mask=packed.attention_mask, **handoff, **kwargs)
        self._after_compressed_call(batch)
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
