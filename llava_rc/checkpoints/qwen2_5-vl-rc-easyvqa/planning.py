"""Planning the compression of a batch: which tokens each image keeps, and the rebuilt batch around them.

``CompressionPlanner`` turns ids and pixels into the language model's input, with no transformers plumbing
(``compressed_generation`` hands its result to the stock ``forward()`` / ``generate()``). ``compress_inputs`` is the
same for every family:

1. the family encodes the images once (``_encode_images``: the tower over every crop, each image's layout);
2. one host sync validates the placeholders against the images (count, mask, finite features) and brings the row
   counts from which the rebuilt width follows on the host;
3. the family computes what a method may read per crop token (``_crop_signals``: features, importance, keys);
   text-guided methods add the cosine between each crop token (``_guidance_patches``) and its row's question;
4. per image geometry, one batched method call (a pure function from ``compression_registry.METHODS``) returns a
   plan: which tokens survive and which originals each output token absorbs (``_signal_packer`` puts each signal in
   reading order, ``_plan_tokens`` applies the plan); newline tokens, when the layout has them, are all kept and put
   back at the end of their rows (``_image_newline``);
5. each image's placeholder run is shortened to its kept count and the batch re-padded (``sequence_packing``),
   and the family lays the kept tokens out for its language model (``_language_model_batch``: merged embeddings by
   default; Qwen: 3-D positions and the stock encoder output); the report says what happened.

Images whose layouts have the same shape are compressed in one batched call; images of different shapes (anyres
images of different sizes, Qwen images of different grids) in one call per shape: the documented loop over image
geometries. The hooks a family supplies are listed in docs/design.md.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, apply_plan
from .compression_common import resolve_guidance
from .compression_registry import METHODS, method_function, update_compression
from .input_checks import check_input_shapes
from .sequence_packing import IGNORE_INDEX, PackedSequence, fill_image_slots, image_token_layout, pack_sequences
from .sequence_packing import packed_width

logger = logging.get_logger(__name__)

# Marks a row-end newline token in an image's layout.
# Marks a row-end newline token in an image's layout.
NEWLINE = -1
# ``CompressionReport.source_index`` codes for output slots that stand for no single patch.
PADDING_SOURCE = -1  # past the image's kept count
SYNTHETIC_SOURCE = -2  # a token merged from several patches with no anchor patch (RC's and PruMerge's extra token)
NEWLINE_SOURCE = -3  # a row-end newline token (LLaVA-NeXT)


def host_to_device(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host list (as long) or CPU tensor on ``device``, without a host sync on CUDA.

    ``torch.tensor(..., device="cuda")`` and ``.to("cuda")`` copy from pageable memory and then wait for the whole
    stream, so the GPU queue drains there; from pinned memory with ``non_blocking`` the copy is queued like a kernel
    (the caching host allocator keeps the pinned block until the copy has run).
    """
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class CompressionReport:
    """What compression did to the images of one call (I images in reading order, K = the largest kept count).

    method: the method's settings as plain JSON.
    num_patches: the largest patch count M of the images (LLaVA-1.5: N for every image), the width of ``absorbed``.
    kept_counts: (I,) tokens the language model read for each image (newline tokens included).
    source_index: (I, K) the original patch each output token stands for, in the order the language model reads
        them, or a negative code: ``PADDING_SOURCE`` (-1) past the image's kept count, ``SYNTHETIC_SOURCE`` (-2) for
        a merged token anchored at no patch (RC's and PruMerge's extra token), ``NEWLINE_SOURCE`` (-3) for a
        row-end newline token. Patches are numbered over the image's non-newline tokens in reading order
        (LLaVA-NeXT: base view, then the unpadded grid).
    absorbed: (I, K, M) bool, which original patches contributed to each output token (merging methods), or the
        one-hot of ``source_index`` (selection methods).
    patch_counts: (I,) non-newline tokens of each image before compression (what a budget counts).
    newline_counts: (I,) newline tokens of each image (all kept; 0 for LLaVA-1.5).
    """

    method: dict
    num_patches: int
    kept_counts: torch.Tensor
    source_index: torch.Tensor
    absorbed: torch.Tensor
    patch_counts: torch.Tensor | None = None
    newline_counts: torch.Tensor | None = None



@dataclass
class CompressedBatch:
    """The language model's input after compression, plus what happened.

    inputs_embeds: (B, L', D) the merged embeddings (LLaVA line), or None where the stock model merges the image
    tokens itself (Qwen: ``encoder_outputs``). position_ids: (4, B, L') Qwen's text row and (t, h, w) rows, or None
    (1-D positions from ``packed``); rope_deltas: (B, 1) the largest position + 1 - each row's real length, or None;
    encoder_outputs: ``{"image": <the stock output class>}`` holding the kept tokens in sequence order (Qwen's
    ``mm_encoder_outputs``), or None.
    """

    inputs_embeds: torch.Tensor | None
    packed: PackedSequence
    report: CompressionReport
    position_ids: torch.Tensor | None = None
    rope_deltas: torch.Tensor | None = None
    encoder_outputs: dict | None = None


@dataclass
class ImageLayout:
    """How one image's placeholder run is read from the crop tokens of the batch.

    token_index: (T,) long on the CPU, one entry per placeholder: the index of its token in the flattened (P * N)
        patch tokens of all crops of the batch, or ``NEWLINE``.
    views: ((rows, cols), ...) the raster-ordered views that the non-newline tokens form, in order.
    """

    token_index: torch.Tensor
    views: tuple[tuple[int, int], ...]

    @property
    def shape_key(self) -> tuple:
        """Equal for images whose layouts differ only in which crops they read (one batched method call)."""
        return self.views, tuple((self.token_index == NEWLINE).nonzero().flatten().tolist())


@dataclass
class CropSignals:
    """Per crop token, what methods may read: (P, N, ...) tensors, or None when the method does not need them."""

    features: torch.Tensor
    projected: torch.Tensor | None = None
    attention_per_head: torch.Tensor | None = None
    attention_joint: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    num_heads: int = 1
    text_scores: torch.Tensor | None = None
    guidance_dim: int = 1


@dataclass
class EncodedImages:
    """What a family's ``_encode_images`` hands to the shared planning: the images' layouts and what its signal and
    hand-over hooks read again (``state``: the tower's hidden states and feature layer on the LLaVA line; the stock
    encoder output and grids on Qwen).

    layouts: one ``ImageLayout`` per image, in reading order; crops_per_image: the crops (rows of the per-crop
    signals) of each image; non_finite: () bool on the device, True when the features a method reads hold NaN or
    inf (read in the one validation sync); description: the images as the caller gave them, for the error on a
    placeholder count mismatch ("pixel_values holds 2 image(s) of 16 patches each").
    """

    layouts: list[ImageLayout]
    crops_per_image: list[int]
    non_finite: torch.Tensor
    description: str
    device: torch.device
    state: dict


class CompressionPlanner:
    """The planning half of a compressed ``...ForConditionalGeneration``: settings, the family hooks, and
    ``compress_inputs`` (ids and pixels in, the rebuilt batch and its report out). ``CompressedGenerationMixin``
    builds forward/generate on it; ``family_llava.LlavaFamilyMixin`` and ``modeling_qwen_vl_rc.QwenVLCompressionMixin``
    answer the hooks."""

    # ---- family hooks ---------------------------------------------------------------------------------------
    def _encode_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, settings: MethodConfig,
                       **image_inputs) -> EncodedImages:
        """Run the vision tower once over the caller's images and lay out each image's placeholder run.
        image_inputs: the family's other image inputs by name (``_image_inputs`` of the plumbing)."""
        raise NotImplementedError

    def _crop_signals(self, encoded: EncodedImages, settings: MethodConfig) -> CropSignals:
        """Everything a method may read but the text scores, per crop token: (P, N, ...) tensors."""
        raise NotImplementedError

    def _guidance_patches(self, encoded: EncodedImages, signals: CropSignals, settings: MethodConfig) -> torch.Tensor:
        """(P, N, W) the crop tokens in the space of the question embedding (``_llm_question`` / ``_clip_question``)."""
        raise NotImplementedError

    def _plan_tokens(self, signals: CropSignals, plan: TokenPlan, pack, settings: MethodConfig) -> torch.Tensor:
        """(I_g, K, D) the language-model tokens of a plan; pack: the group's ``_signal_packer``. Default: the plan
        applied to ``signals.projected`` (tokens already in the language model's space): a gather, or the same
        weighted average for merged tokens."""
        return apply_plan(pack(signals.projected), plan)

    def _image_newline(self) -> torch.Tensor | None:
        """(D,) the embedding of a newline token, or None when layouts have none."""
        return None

    def _signal_packer(self, layouts: list[ImageLayout], device: torch.device):
        """A function from a per-crop-token signal (P, N, ...) to (I_g, M, ...): each image's non-newline tokens in
        reading order, for images of one layout shape. Default: gather by ``token_index``."""
        is_token = layouts[0].token_index != NEWLINE  # (T,) the same for every image of the group
        index = host_to_device(torch.stack([layout.token_index[is_token] for layout in layouts]), device)  # (I_g, M)

        def gather(per_crop: torch.Tensor | None) -> torch.Tensor | None:
            """(P, N, ...) per crop token -> (I_g, M, ...) per image token in reading order."""
            return None if per_crop is None else per_crop.flatten(0, 1)[index]

        return gather

    def _position_ids(self, packed: PackedSequence) -> torch.Tensor:
        """Position ids of the rebuilt sequence: the 1-D count over its mask (families with 3-D positions override)."""
        return packed.position_ids

    # ---- settings -------------------------------------------------------------------------------------------
    def compression_settings(self, compression: dict | str | MethodConfig | None = None) -> MethodConfig:
        """The validated settings for a call: ``config.compression`` updated by the per-call ``compression``.

        Keys given per call replace the config's settings of the same method and keep the rest; naming another
        method starts from that method's defaults (``compression_registry.update_compression``); a method name
        alone means ``{"method": name}``. ``guidance="auto"`` becomes ``"clip"`` where this model has CLIP's text
        tower, else None, with a warning (once) naming the setting; ``"llm"`` guidance warns (once) that it was
        measured not to aim at the question.
        """
        requested = update_compression(self.config.compression, compression)
        settings = resolve_guidance(requested, getattr(self, "guidance_text_model", None) is not None)
        if getattr(requested, "guidance", None) == "auto" and settings.guidance is None:
            logger.warning_once(
                f"compression {settings.method!r} with guidance='auto': this model has no CLIP text tower (its config "
                "has no guidance_text_config), so it runs without text guidance (guidance=None). The LLM's own "
                "embeddings (guidance='llm') do not aim at the question on LLaVA-1.5-style models (docs/methods.md); "
                "for the RC paper's guidance build the model with CLIP's text tower (llava-rc-upload --clip)."
            )
        elif settings.guidance_source == "llm":
            logger.warning_once(
                f"compression {settings.method!r} with guidance='llm': the cosine between the LLM's input embeddings "
                "of the question and the projected image tokens was measured not to aim at the question (on the shipped "
                "model it prefers background patches whatever is asked; docs/methods.md). Prefer guidance='clip' or "
                "None."
            )
        return settings

    def _compression_method(self, compression: dict | str | MethodConfig | None) -> str | None:
        """The method name a call uses. None (the config's, validated when the config was built), a known method
        name or ``{"method": <known name>}`` are read without parsing (cheap and traceable: forward's stock path,
        every decoding step, stays graph-safe); anything else is validated here, so an invalid setting is refused
        by every path, also where the method turns out to be ``"none"`` or no image is given."""
        if isinstance(compression, MethodConfig):
            return compression.method
        if compression is None:
            return (self.config.compression or {}).get("method")
        name = compression if isinstance(compression, str) else None
        if isinstance(compression, dict) and len(compression) == 1 and isinstance(compression.get("method"), str):
            name = compression["method"]
        if name in METHODS:
            return name
        return self.compression_settings(compression).method

    # ---- the pre-pass ---------------------------------------------------------------------------------------
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
                "guidance_text_config); use guidance=None (no text guidance) or 'auto', or build the model with "
                "CLIP's text tower (llava-rc-upload --clip)"
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
    def _image_rows(is_image: torch.Tensor, num_images: int, tokens_per_image) -> torch.Tensor:
        """(I,) the batch row of each image: every placeholder scatters its row to its image (others to a spare).

        tokens_per_image: the placeholder run length, an int or (I,) long.
        """
        image_index, _ = image_token_layout(is_image, tokens_per_image)  # (B, L)
        rows = torch.arange(is_image.shape[0], device=is_image.device).unsqueeze(1).expand_as(image_index)
        target = torch.where(is_image, image_index, torch.full_like(image_index, num_images))
        image_row = torch.zeros(num_images + 1, dtype=torch.long, device=is_image.device)
        return image_row.scatter(0, target.flatten(), rows.flatten())[:num_images]

    def _compress_group(
        self,
        signals: CropSignals,
        layouts: list[ImageLayout],
        has_text: torch.Tensor | None,
        settings: MethodConfig,
    ) -> tuple[torch.Tensor, TokenPlan, torch.Tensor]:
        """Compress images of one layout shape in one method call.

        layouts: the images' layouts (same ``shape_key``); has_text: (I_g,) or None.
        Returns (tokens (I_g, K, D) in reading order, the plan in that order with counts including newlines,
        absorbed (I_g, K, M)).
        """
        device = signals.features.device
        first = layouts[0]
        is_token = first.token_index != NEWLINE  # (T,) the same for every image of the group
        gather = self._signal_packer(layouts, device)
        views = first.views
        features = signals.projected if settings.stage == "projected" else signals.features
        inputs = CompressionInputs(
            features=gather(features).detach(),
            num_heads=signals.num_heads,
            grid=views[0] if len(views) == 1 else None,
            views=views if len(views) > 1 else None,
            attention_per_head=gather(signals.attention_per_head),
            attention_joint=gather(signals.attention_joint),
            keys=gather(signals.keys),
            text_scores=gather(signals.text_scores),
            guidance_dim=signals.guidance_dim,
            has_text=has_text,
        )
        with torch.no_grad():
            plan: TokenPlan = method_function(settings)(inputs, settings)
        num_patches = inputs.num_patches
        tokens = self._plan_tokens(signals, plan, gather, settings)  # (I_g, K, D)
        absorbed = plan.absorbed_for(num_patches)  # (I_g, K, M)
        if bool(is_token.all()):
            return tokens, plan, absorbed
        return self._with_newlines(tokens, plan, absorbed, first.token_index)

    def _with_newlines(
        self, tokens: torch.Tensor, plan: TokenPlan, absorbed: torch.Tensor, token_index: torch.Tensor
    ) -> tuple[torch.Tensor, TokenPlan, torch.Tensor]:
        """Add every newline token and put all output tokens in reading order.

        A kept or merged token sits where its source patch was; each newline ends its row; tokens that stand for no
        single patch (RC's extra token) come last. tokens: (I_g, K, D); token_index: (T,) the group's layout.
        """
        num_images, num_slots, width = tokens.shape
        device = tokens.device
        length = token_index.shape[0]
        is_token = token_index != NEWLINE
        reading_position = host_to_device(is_token.nonzero().flatten(), device)  # (M,) where each patch is read
        newline_position = host_to_device((~is_token).nonzero().flatten(), device)  # (R,) where each newline is read
        num_newlines = newline_position.shape[0]
        slot = torch.arange(num_slots, device=device).expand(num_images, num_slots)  # (I_g, K)
        source = plan.source_index  # (I_g, K)
        key = torch.where(source >= 0, reading_position[source.clamp(min=0)], length + slot)  # synthetic: after all
        key = torch.where(slot < plan.counts.unsqueeze(-1), key, length + num_slots + slot)  # padding: last
        key = torch.cat([key, newline_position.expand(num_images, num_newlines)], dim=1)  # (I_g, K + R)
        order = key.argsort(dim=1, stable=True)  # (I_g, K + R)

        newline = self._image_newline().to(tokens.device, tokens.dtype)
        tokens = torch.cat([tokens, newline.expand(num_images, num_newlines, width)], dim=1)  # (I_g, K + R, D)
        tokens = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, width))
        source = torch.cat([source, source.new_full((num_images, num_newlines), NEWLINE_SOURCE)], dim=1).gather(1, order)
        absorbed = torch.cat([absorbed, absorbed.new_zeros(num_images, num_newlines, absorbed.shape[-1])], dim=1)
        absorbed = absorbed.gather(1, order.unsqueeze(-1).expand(-1, -1, absorbed.shape[-1]))  # (I_g, K + R, M)
        return tokens, TokenPlan(source_index=source, counts=plan.counts + num_newlines), absorbed

    def _language_model_batch(
        self,
        encoded: EncodedImages,
        packed: PackedSequence,
        image_tokens: torch.Tensor,
        plan: TokenPlan,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> dict:
        """The family's language-model input around the rebuilt batch, as ``CompressedBatch`` fields.

        image_tokens: (I, K, D) the kept tokens of every image in reading order; plan: their sources and counts.
        Default: the merged embeddings (the rebuilt ids' embeddings with the image tokens in their slots).
        """
        text_embeds = self.get_input_embeddings()(packed.input_ids)  # (B, L', D)
        return {"inputs_embeds": fill_image_slots(text_embeds, image_tokens, packed.image_slot)}

    def compress_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        settings: MethodConfig | None = None,
        guidance_mask: torch.Tensor | None = None,
        guidance_input_ids: torch.Tensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        pad_left: bool | None = None,
        **image_inputs,
    ) -> CompressedBatch:
        """Encode the images once, compress them, and rebuild the batch around the kept tokens.

        input_ids: (B, L) with each image expanded to its placeholder run; pixel_values: the images in reading
        order ((I, 3, H, W) for LLaVA-1.5; (I, P, 3, H, W) crops with ``image_sizes`` (I, 2) for LLaVA-NeXT; packed
        patches with ``image_grid_thw`` (I, 3) for Qwen); attention_mask, labels, guidance_mask: (B, L) or None;
        guidance_input_ids, guidance_attention_mask: (B, T) the question for the CLIP text tower, or None.
        image_inputs: the family's other image inputs (``_encode_images`` keywords: ``vision_feature_layer``,
        ``vision_feature_select_strategy``, ``image_sizes`` on the LLaVA line; ``image_grid_thw``,
        ``mm_token_type_ids`` on Qwen). pad_left: re-pad side; None keeps the caller's side (right when any row ends
        with padding, else left, so every row's last position stays its last real token).
        """
        settings = settings if settings is not None else self.compression_settings()
        check_input_shapes(
            input_ids, attention_mask, labels, guidance_mask, guidance_input_ids, guidance_attention_mask
        )
        encoded = self._encode_images(input_ids, pixel_values, settings, **image_inputs)
        layouts = encoded.layouts
        image_token_id = self.config.image_token_id
        is_image = input_ids == image_token_id
        num_images = len(layouts)
        run_lengths = [layout.token_index.shape[0] for layout in layouts]
        patch_counts = [int((layout.token_index != NEWLINE).sum()) for layout in layouts]  # host tensors
        device = encoded.device
        # One host sync for validation: clear errors instead of silently misaligned tokens or a NaN attention that
        # quietly keeps nothing. It comes after the tower so that the features' finiteness travels with it; the
        # same transfer brings each row's placeholder and real text counts, from which the rebuilt width follows
        # on the host when the kept counts are fixed (no second sync in pack_sequences).
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(is_image)
        host_counts = torch.cat(
            [
                torch.stack(
                    [
                        is_image.sum(),
                        (~real[:, -1]).any().long(),
                        (is_image & ~real).sum(),
                        encoded.non_finite.long().to(is_image.device),
                    ]
                ),
                is_image.sum(dim=1),  # (B,) placeholders per row
                (real & ~is_image).sum(dim=1),  # (B,) real text tokens per row
            ]
        ).tolist()
        num_placeholders, ends_with_padding, masked_placeholders, has_non_finite = host_counts[:4]
        row_placeholders = host_counts[4 : 4 + input_ids.shape[0]]
        row_text = host_counts[4 + input_ids.shape[0] :]
        if num_placeholders == 0:
            raise ValueError(
                f"pixel_values holds {num_images} image(s) but input_ids has no image token "
                f"(id {image_token_id}); put the processor's image placeholder in the prompt"
            )
        if num_placeholders != sum(run_lengths):
            raise ValueError(
                f"input_ids has {num_placeholders} image tokens but {encoded.description} "
                f"(expected {sum(run_lengths)} image tokens)"
            )
        if masked_placeholders:
            raise ValueError(
                f"attention_mask is 0 on {masked_placeholders} image placeholder position(s): compression reads every "
                "image token of the prompt (stock LLaVA feeds them too), so a masked image would silently drop out "
                "or misalign. Set the mask to 1 on the image tokens (0 only on padding), or pass "
                "compression={'method': 'none'}"
            )
        if has_non_finite:
            raise ValueError(
                "the vision tower's features hold NaN or inf (non-finite pixel_values, or an overflow in this "
                "dtype); compression cannot rank such tokens. Check pixel_values with torch.isfinite, or load the "
                "vision tower in float32/bfloat16"
            )
        if pad_left is None:  # the caller's side: right only when a row ends with padding
            pad_left = not ends_with_padding
        tokens_per_image = (
            run_lengths[0]
            if len(set(run_lengths)) == 1
            else torch.tensor(run_lengths, dtype=torch.long, device=input_ids.device)
        )
        signals = self._crop_signals(encoded, settings)
        image_has_text = None
        if settings.guidance_source is not None:
            image_row = self._image_rows(is_image, num_images, tokens_per_image).to(device)  # (I,)
            crop_image = torch.repeat_interleave(
                torch.arange(num_images, device=device), host_to_device(encoded.crops_per_image, device)
            )  # (P,)
            with torch.no_grad():
                if settings.guidance_source == "llm":
                    question, has_text = self._llm_question(input_ids, attention_mask, labels, guidance_mask)
                else:
                    question, has_text = self._clip_question(guidance_input_ids, guidance_attention_mask)
                patches = self._guidance_patches(encoded, signals, settings)  # (P, N, W)
                crop_question = question.to(patches.device)[image_row.to(patches.device)[crop_image]]  # (P, W)
                signals.text_scores = torch.nn.functional.cosine_similarity(
                    patches.float(), crop_question.unsqueeze(1), dim=-1
                )  # (P, N)
                signals.guidance_dim = patches.shape[-1]
            image_has_text = has_text.to(device)[image_row]  # (I,)

        image_tokens, plan, absorbed = self._plan_images(signals, layouts, image_has_text, settings, device)
        # With fixed counts (a budget) the rebuilt width is known on the host: pack_sequences need not read it.
        fixed = [settings.fixed_count(layout.views) for layout in layouts]
        new_length = None
        if None not in fixed:
            host_kept = [count + runs - patches for count, runs, patches in zip(fixed, run_lengths, patch_counts)]
            new_length = packed_width(row_placeholders, row_text, run_lengths, host_kept)
        packed = pack_sequences(
            input_ids,
            attention_mask,
            labels,
            image_token_id=image_token_id,
            tokens_per_image=tokens_per_image,
            kept_counts=plan.counts.to(input_ids.device),
            slots_per_image=image_tokens.shape[1],
            pad_token_id=self._pad_token_id(),
            pad_left=pad_left,
            new_length=new_length,
        )
        handoff = self._language_model_batch(encoded, packed, image_tokens, plan, input_ids, attention_mask)
        slot = torch.arange(plan.source_index.shape[1], device=device)  # (K,)
        synthetic = (slot < plan.counts.unsqueeze(-1)) & (plan.source_index == PADDING_SOURCE)  # (I, K)
        report = CompressionReport(
            method=settings.to_dict(),
            num_patches=absorbed.shape[-1],
            kept_counts=plan.counts,
            source_index=plan.source_index.masked_fill(synthetic, SYNTHETIC_SOURCE),
            absorbed=absorbed,
            patch_counts=host_to_device(patch_counts, device),
            newline_counts=host_to_device([runs - patches for runs, patches in zip(run_lengths, patch_counts)], device),
        )
        return CompressedBatch(
            inputs_embeds=handoff.pop("inputs_embeds", None), packed=packed, report=report, **handoff
        )

    def _plan_images(
        self,
        signals: CropSignals,
        layouts: list[ImageLayout],
        image_has_text: torch.Tensor | None,
        settings: MethodConfig,
        device: torch.device,
    ) -> tuple[torch.Tensor, TokenPlan, torch.Tensor]:
        """Which tokens each image keeps: one batched method call per layout shape (images of one size share it),
        a loop over image geometries. Returns (tokens (I, K, D) in reading order, the plan, absorbed (I, K, M))."""
        groups: dict[tuple, list[int]] = {}
        for image, layout in enumerate(layouts):
            groups.setdefault(layout.shape_key, []).append(image)
        results = []
        for members in groups.values():
            member_index = host_to_device(members, device)
            has_text = image_has_text[member_index] if image_has_text is not None else None
            group = self._compress_group(signals, [layouts[i] for i in members], has_text, settings)
            results.append((member_index, *group))
        if len(results) == 1:
            _, image_tokens, plan, absorbed = results[0]
            return image_tokens, plan, absorbed
        return self._merge_groups(results, num_images=len(layouts))

    @staticmethod
    def _merge_groups(results: list, num_images: int) -> tuple[torch.Tensor, TokenPlan, torch.Tensor]:
        """Per-group (image indices, tokens, plan, absorbed) -> one (I, K, ...) batch padded to the largest K, M."""
        max_slots = max(tokens.shape[1] for _, tokens, _, _ in results)
        max_patches = max(absorbed.shape[-1] for _, _, _, absorbed in results)
        _, first_tokens, first_plan, _ = results[0]
        device = first_tokens.device
        tokens = first_tokens.new_zeros(num_images, max_slots, first_tokens.shape[-1])  # (I, K, D)
        source = torch.full((num_images, max_slots), -1, dtype=torch.long, device=device)  # (I, K)
        counts = first_plan.counts.new_zeros(num_images)  # (I,)
        absorbed = torch.zeros(num_images, max_slots, max_patches, dtype=torch.bool, device=device)  # (I, K, M)
        for members, group_tokens, plan, group_absorbed in results:
            slots, patches = group_absorbed.shape[1], group_absorbed.shape[2]
            tokens = tokens.index_copy(0, members, nn.functional.pad(group_tokens, (0, 0, 0, max_slots - slots)))
            source[members, :slots] = plan.source_index
            counts[members] = plan.counts
            absorbed[members, :slots, :patches] = group_absorbed
        return tokens, TokenPlan(source_index=source, counts=counts), absorbed

    def _pad_token_id(self) -> int:
        for candidate in (
            self.generation_config.pad_token_id,
            getattr(self.config, "pad_token_id", None),
            getattr(self.config.text_config, "pad_token_id", None),
        ):
            if isinstance(candidate, int):
                return candidate
        return 0


__all__ = [
    "NEWLINE",
    "NEWLINE_SOURCE",
    "PADDING_SOURCE",
    "SYNTHETIC_SOURCE",
    "CompressedBatch",
    "CompressionPlanner",
    "CompressionReport",
    "CropSignals",
    "EncodedImages",
    "ImageLayout",
    "host_to_device",
]
