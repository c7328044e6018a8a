"""llava-rc inside vLLM: compressed LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision with a fixed budget per image.

Imported only by vLLM (through ``llava_rc.vllm_plugin``); docs/serving.md is the user's page. How the pieces fit:

- **Placeholder counts.** vLLM fixes the number of placeholder tokens of every image in its processor, before the
  encoder runs. With a budget the count is known there: ``MethodConfig.fixed_count`` of the image's views (the
  budget clamped to the image's patches; G-Prune's per-view rule), plus the image's newline tokens (NeXT/OneVision;
  they depend only on the image size). Settings without a budget (adaptive RC/PruMerge) are refused with a
  ValueError that says to set one. OneVision (``onevision_token_counts``): a one-image prompt reads the base view and
  the unpadded grid, downsampled past ``vision_aspect_ratio``; a prompt with several images reads each one's base
  view and one newline, so the prompt's image count is hashed with each image (``IMAGES_KEY``).
- **Image embeddings** (``image_embeds``) are refused with a ValueError: the methods need the tower's attention.
- **Settings per request.** ``config.compression`` (``hf_overrides={"compression": {...}}`` replaces it for a whole
  engine), updated by a request's ``mm_processor_kwargs={"compression": {...}}`` with the rule of
  ``generate(compression=...)`` (``compression_registry.update_compression``). The processor hands the validated
  settings to the encoder as a per-image field, so requests with different settings can share a batch.
- **The question of text-guided methods** (RC, TRSM). vLLM's multimodal caches (processor cache, encoder cache)
  key on the image plus the processor kwargs, not on the prompt. The processor therefore puts the question into the
  kwargs (``llava_rc_question``: the prompt's text token ids for ``"llm"`` guidance, the extracted question for
  ``"clip"``) before vLLM hashes them: the same image with another question is another cache entry, and the encoder
  reads the question of its own request.
- **The encoder** is the transformers model's own compression pre-pass (``CompressedGenerationMixin.
  compress_inputs``): the full vision tower (every layer, so the layer that consumes the feature layer exists), the
  attention recomputed from its hidden states, the method's pure function from ``compression_registry.METHODS``,
  the projector, newline placement. It runs on a vision-only instance of the transformers class (a language model
  of zero layers) whose input embeddings are vLLM's, on one synthetic row per image: the image's placeholder run
  plus, for ``"llm"`` guidance, its request's text tokens. So vLLM serves exactly the tokens ``generate()`` would
  feed the language model; there is no second copy of any method.
- **Tensor parallelism.** The vision half is replicated on every rank (a CLIP-L tower is ~0.3 B parameters); only
  the language model is sharded. docs/serving.md says how a head-sharded tower would gather the attention.
"""

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMultiModal, SupportsPP
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from .compression_common import MethodConfig, resolve_guidance
from .compression_registry import update_compression
from .configuration_llava_rc import LlavaNextRCConfig, LlavaOnevisionRCConfig, LlavaRCConfig
from .modeling_llava_rc import LlavaNextRCForConditionalGeneration, LlavaOnevisionRCForConditionalGeneration
from .modeling_llava_rc import LlavaRCForConditionalGeneration, OnevisionImageGeometry, anyres_token_counts
from .processing_llava_rc import extract_question

# mm_processor_kwargs keys of this plugin: the per-request settings, and what the processor adds of the prompt.
COMPRESSION_KEY = "compression"
QUESTION_KEY = "llava_rc_question"
IMAGES_KEY = "llava_rc_images_in_prompt"  # OneVision: a prompt with several images reads only their base views
OWN_KEYS = (COMPRESSION_KEY, QUESTION_KEY, IMAGES_KEY)
# Per-image fields from the processor to the encoder.
SETTINGS_FIELD = "llava_rc_settings"  # (I, S) long: the settings as UTF-8 JSON bytes
GUIDANCE_IDS_FIELD = "llava_rc_guidance_ids"  # (I, T) long: the question's tokens (LLM's or CLIP's tokenizer)
GUIDANCE_MASK_FIELD = "llava_rc_guidance_mask"  # (I, T) long: 1 on real question tokens
OWN_FIELDS = (SETTINGS_FIELD, GUIDANCE_IDS_FIELD, GUIDANCE_MASK_FIELD)
GEOMETRY_FIELD = "llava_rc_geometry"  # OneVision, (I, 3) long: height, width, 1 when read as base view + grid


def request_settings(config, mm_kwargs: Mapping[str, object]) -> MethodConfig:
    """The settings of one request: ``config.compression`` updated by ``mm_kwargs["compression"]``, validated.

    Raises ValueError for bad settings and for settings without a fixed count (vLLM needs each image's token count
    before the encoder runs).
    """
    try:
        settings = update_compression(config.compression, mm_kwargs.get(COMPRESSION_KEY))
        # guidance="auto": "clip" with CLIP's text tower, else none (as CompressedGenerationMixin.compression_settings)
        settings = resolve_guidance(settings, getattr(config, "guidance_text_config", None) is not None)
    except TypeError as error:  # a ValueError is what vLLM turns into a 400 answer
        raise ValueError(str(error)) from error
    side = config.vision_config.image_size // config.vision_config.patch_size
    if settings.method != "none" and settings.fixed_count(((side, side),)) is None:
        raise ValueError(
            f"compression method {settings.method!r} without a budget keeps an adaptive number of tokens per image, "
            "which vLLM cannot serve (it fixes each image's placeholder count before the encoder runs). Set a budget: "
            "per request mm_processor_kwargs={'compression': {'budget': 64}} (an int count or a float ratio), or for "
            "the whole engine hf_overrides={'compression': {...,'budget': 64}}"
        )
    return settings


def encode_settings(settings: MethodConfig) -> list[int]:
    """The settings as the bytes of their JSON (a tensor field survives vLLM's batching and IPC)."""
    return list(json.dumps(settings.to_dict(), sort_keys=True).encode("utf-8"))


def decode_settings(codes: torch.Tensor) -> MethodConfig:
    return update_compression(None, json.loads(bytes(codes.tolist()).decode("utf-8")))


def per_item(value) -> list[torch.Tensor]:
    """A batched vLLM field as one tensor per item (vLLM stacks equal shapes and lists unequal ones)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return [item for item in value]


def refuse_image_embeddings(mm_items) -> None:
    """Image embeddings (``image_embeds``) cannot be compressed: every method reads the vision tower's attention
    (or its features before the projector), which precomputed embeddings no longer carry."""
    items = mm_items.get("image")
    if items is None or isinstance(items, ImageProcessorItems):
        return
    shapes = []
    for index in range(items.get_count()):
        item = items.get(index)
        shapes.append(tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__)
    raise ValueError(
        f"llava-rc got image embeddings (image_embeds) for {len(shapes)} image(s), shapes {shapes}, but it needs the "
        "images themselves: every compression method reads the vision tower's attention, which embeddings no longer "
        "carry, and vLLM fixes each image's token count from its pixels. Send the image (PIL image, URL or "
        "base64 data) instead; embeddings are not served by this plugin, with any method, \"none\" included"
    )


# ---- processing ----------------------------------------------------------------------------------------------
class LlavaRCProcessingInfo(BaseProcessingInfo):
    """LLaVA-1.5: an image's stock token count is the tower's N patches; compressed, the budget's count.

    (vLLM's own LLaVA module is not imported: it pulls torchvision in, which vLLM's CPU build cannot load.)
    """

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """The stock (uncompressed) placeholder count of an image."""
        side = self.get_hf_config().vision_config.image_size // self.get_hf_config().vision_config.patch_size
        return side * side

    def get_image_size_with_most_features(self) -> tuple[int, int]:
        """(width, height) of the image with the most stock tokens."""
        size = self.get_hf_config().vision_config.image_size
        return size, size

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """The stock count bounds every budget (a budget is clamped to the image's tokens): the encoder cache is
        sized for it, so a request may ask for more tokens than the engine's default settings give."""
        width, height = self.get_image_size_with_most_features()
        return {"image": self.get_num_image_tokens(image_width=width, image_height=height)}

    def image_views(
        self, image_width: int, image_height: int, images_in_prompt: int = 1
    ) -> tuple[tuple[int, int], ...]:
        """The raster views of an image's non-newline tokens (LLaVA-1.5: one N-patch grid). images_in_prompt: how
        many images the image's prompt holds (only OneVision reads it)."""
        vision_config = self.get_hf_config().vision_config
        side = vision_config.image_size // vision_config.patch_size
        return ((side, side),)

    def image_newlines(self, image_width: int, image_height: int, images_in_prompt: int = 1) -> int:
        return 0

    def compressed_tokens(
        self, settings: MethodConfig, image_width: int, image_height: int, images_in_prompt: int = 1
    ) -> int:
        """Placeholders of one image under ``settings``: its kept tokens plus its newline tokens (``"none"``: every
        token of its views plus its newlines, the stock count)."""
        views = self.image_views(image_width, image_height, images_in_prompt)
        newlines = self.image_newlines(image_width, image_height, images_in_prompt)
        if settings.method == "none":
            return sum(rows * cols for rows, cols in views) + newlines
        return settings.fixed_count(views) + newlines


class LlavaRCMultiModalProcessorMixin:
    """What the plugin adds to a vLLM LLaVA-family processor: settings, question, and compressed counts."""

    def _settings(self, mm_kwargs: Mapping[str, object]) -> MethodConfig:
        merged = self.info.ctx.get_merged_mm_kwargs(mm_kwargs)
        return request_settings(self.info.get_hf_config(), merged)

    def _question(self, settings: MethodConfig, prompt: list[int]):
        """What a text-guided method reads of this prompt, as a hashable value, or None.

        "llm": the prompt's text token ids (placeholders removed): ``generate()`` averages the embeddings of every
        real text token of the prompt. "clip": the question as ``LlavaRCProcessor`` extracts it from the prompt.
        """
        guidance = settings.guidance_source if settings.method != "none" else None
        if guidance is None:
            return None
        image_token_id = self.info.get_hf_config().image_token_index
        if guidance == "llm":
            return [token for token in prompt if token != image_token_id]
        tokenizer = self.info.get_tokenizer()
        processor = self.info.get_hf_processor()
        text = tokenizer.decode(prompt, skip_special_tokens=False)
        for special in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token):
            if special and special != processor.image_token:
                text = text.replace(special, " ")
        return extract_question(text, processor.image_token)

    def apply(self, inputs, timing_ctx):
        refuse_image_embeddings(inputs.mm_data_items)
        settings = self._settings(inputs.hf_processor_mm_kwargs)
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        kwargs.pop(QUESTION_KEY, None)  # only the processor sets these
        kwargs.pop(IMAGES_KEY, None)
        question = self._question(settings, list(inputs.prompt))
        if question is not None:
            kwargs[QUESTION_KEY] = question  # hashed with the image: the caches key on the question too
        kwargs.update(self._prompt_keys(inputs))
        return super().apply(dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs), timing_ctx)

    def _prompt_keys(self, inputs) -> dict:
        """What else of the prompt decides an image's tokens, as processor kwargs (hashed with the image)."""
        return {}

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        settings = self._settings(hf_kwargs)
        stock_kwargs = {key: value for key, value in hf_kwargs.items() if key not in OWN_KEYS}
        processed = super()._call_hf_processor(hf_data, stock_kwargs)
        for name in ("guidance_input_ids", "guidance_attention_mask"):  # the stock prompt's; ours follow
            processed.pop(name, None)
        num_images = len(per_item(processed.get("pixel_values")))
        ids, mask = self._guidance_tokens(settings, hf_kwargs.get(QUESTION_KEY))
        processed[SETTINGS_FIELD] = torch.tensor([encode_settings(settings)] * num_images, dtype=torch.long)
        processed[GUIDANCE_IDS_FIELD] = ids.expand(num_images, -1).clone()
        processed[GUIDANCE_MASK_FIELD] = mask.expand(num_images, -1).clone()
        return processed

    def _guidance_tokens(self, settings: MethodConfig, question) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T) ids and mask of the question for the encoder (a (1, 1) zero pair when the method reads none)."""
        if question is None:
            return torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
        if settings.guidance_source == "llm":
            ids = torch.tensor([list(question)], dtype=torch.long).view(1, -1)
            return ids, torch.ones_like(ids)
        processor = self.info.get_hf_processor()
        tokenizer = getattr(processor, "guidance_tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "guidance='clip' needs the repo's CLIP guidance tokenizer (LlavaRCProcessor with a "
                "guidance_tokenizer/ folder); this repo has none: use guidance=None or 'auto'"
            )
        tokens = tokenizer(
            [question], truncation=True, max_length=processor.guidance_max_length, return_tensors="pt"
        )
        mask = tokens["attention_mask"] * int(bool(question.strip()))
        return tokens["input_ids"].long(), mask.long()

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence:
        settings = self._settings(hf_processor_mm_kwargs)
        image_token_id = self.info.get_hf_config().image_token_index

        def replacement(item_index: int) -> list[int]:
            images = mm_items.get_items("image", ImageProcessorItems)
            size = images.get_image_size(item_index)
            count = self.info.compressed_tokens(
                settings, size.width, size.height, int(hf_processor_mm_kwargs.get(IMAGES_KEY, 1))
            )
            return [image_token_id] * count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


class LlavaRCMultiModalProcessor(LlavaRCMultiModalProcessorMixin, BaseMultiModalProcessor):
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = {"pixel_values": MultiModalFieldConfig.batched("image")}
        fields.update({name: MultiModalFieldConfig.batched("image") for name in OWN_FIELDS})
        return fields


class LlavaNextRCProcessingInfo(LlavaRCProcessingInfo):
    """LLaVA-NeXT (anyres): base view + unpadded high-resolution grid, one newline per grid row
    (``anyres_token_counts``); a budget counts the non-newline tokens, the newlines are kept on top."""

    def _counts(self, image_width: int, image_height: int) -> list[int]:
        return anyres_token_counts(self.get_hf_config(), [(image_height, image_width)])[0].tolist()

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return sum(self._counts(image_width, image_height))

    def image_views(
        self, image_width: int, image_height: int, images_in_prompt: int = 1
    ) -> tuple[tuple[int, int], ...]:
        base, grid, rows = self._counts(image_width, image_height)
        side = self.get_hf_config().vision_config.image_size // self.get_hf_config().vision_config.patch_size
        return ((side, side), (rows, grid // rows)) if rows else ((side, side),)

    def image_newlines(self, image_width: int, image_height: int, images_in_prompt: int = 1) -> int:
        return self._counts(image_width, image_height)[2]

    def get_image_size_with_most_features(self) -> tuple[int, int]:
        """The grid pinpoint with the most stock tokens, as (width, height)."""
        pinpoints = self.get_hf_config().image_grid_pinpoints
        height, width = max(pinpoints, key=lambda hw: self.get_num_image_tokens(image_width=hw[1], image_height=hw[0]))
        return width, height


class LlavaNextRCMultiModalProcessor(LlavaRCMultiModalProcessor):
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields["image_sizes"] = MultiModalFieldConfig.batched("image")
        return fields


def onevision_grid_tokens(config, rows: int, cols: int) -> tuple[int, int]:
    """(grid tokens, newline tokens) of a LLaVA-OneVision grid of rows x cols tokens after unpadding: the stock
    ``pack_image_features`` downsamples it bilinearly to (rows // r, cols // r) when r = sqrt(rows * cols / (m * N))
    exceeds 1.1 (m from ``vision_aspect_ratio`` "anyres_max_<m>", N the patches of one crop); one newline per row."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    max_crops = int(config.vision_aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_crops * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return rows * cols, rows


def onevision_token_counts(config, image_height: int, image_width: int, patched: bool = True) -> tuple[int, int, int]:
    """(base-view, grid, newline) tokens of one LLaVA-OneVision image, as the stock processor and model count them.

    patched: the image is read as base view + anyres grid (its prompt holds one image); otherwise (several images
    in the prompt, the stock ``batch_num_images`` rule) as its base view and one newline. The grid is LLaVA-NeXT's
    unpadded grid (``anyres_token_counts``), downsampled past ``vision_aspect_ratio`` (``onevision_grid_tokens``).
    Example, OneVision-7B (SigLIP 384/14, 27 x 27 patches) at 1000 x 1000: [729, 6561, 81].
    """
    side = config.vision_config.image_size // config.vision_config.patch_size
    if not patched:
        return side * side, 0, 1
    _, grid, rows = anyres_token_counts(config, [(image_height, image_width)])[0].tolist()
    if rows == 0:  # a very wide image's unpadded grid has no row: its base view alone
        return side * side, 0, 0
    return (side * side, *onevision_grid_tokens(config, rows, grid // rows))


class OnevisionImageProcessing:
    """The part of a OneVision repo's processor that vLLM calls: its image processor (crops and sizes), plus the
    tokenizer and image token that the plugin reads. The stock ``LlavaOnevisionProcessor`` also builds a video
    processor, which needs torchvision (not loadable beside vLLM's CPU torch); videos are not served anyway."""

    def __init__(self, image_processor, tokenizer, image_token: str = "<image>"):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = getattr(tokenizer, "image_token", None) or image_token

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        if text is not None:
            raise ValueError("llava-rc's OneVision processing in vLLM takes images only (vLLM tokenizes the prompt)")
        kwargs.setdefault("return_tensors", "pt")
        return self.image_processor(images, **kwargs)


class LlavaOnevisionRCProcessingInfo(LlavaNextRCProcessingInfo):
    """LLaVA-OneVision: a prompt with one image reads it as base view + unpadded (and, past ``vision_aspect_ratio``,
    downsampled) grid with one newline per grid row; a prompt with several images reads each one's base view and one
    newline (``onevision_token_counts``). A budget counts the non-newline tokens; the newlines are kept on top."""

    def get_hf_processor(self, **kwargs: object) -> OnevisionImageProcessing:
        from vllm.transformers_utils.processor import cached_image_processor_from_config

        return OnevisionImageProcessing(
            cached_image_processor_from_config(self.ctx.model_config, **kwargs), self.get_tokenizer()
        )

    def _onevision_counts(self, image_width: int, image_height: int, images_in_prompt: int) -> tuple[int, int, int]:
        return onevision_token_counts(self.get_hf_config(), image_height, image_width, patched=images_in_prompt == 1)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return sum(self._onevision_counts(image_width, image_height, 1))

    def image_views(
        self, image_width: int, image_height: int, images_in_prompt: int = 1
    ) -> tuple[tuple[int, int], ...]:
        base, grid, rows = self._onevision_counts(image_width, image_height, images_in_prompt)
        side = self.get_hf_config().vision_config.image_size // self.get_hf_config().vision_config.patch_size
        return ((side, side), (rows, grid // rows)) if grid else ((side, side),)

    def image_newlines(self, image_width: int, image_height: int, images_in_prompt: int = 1) -> int:
        return self._onevision_counts(image_width, image_height, images_in_prompt)[2]

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """An upper bound of any image's stock count: every grid a pinpoint can unpad to (its full grid with fewer
        rows or fewer columns), downsampled as the stock model does (a grid just under the downsampling threshold
        can hold more tokens than the full pinpoint's downsampled grid)."""
        config = self.get_hf_config()
        vision_config = config.vision_config
        side = vision_config.image_size // vision_config.patch_size
        most = 0
        for height, width in config.image_grid_pinpoints:
            rows, cols = height // vision_config.image_size * side, width // vision_config.image_size * side
            unpadded = [(r, cols) for r in range(1, rows + 1)] + [(rows, c) for c in range(1, cols + 1)]
            for grid_rows, grid_cols in unpadded:
                most = max(most, sum(onevision_grid_tokens(config, grid_rows, grid_cols)))
        return {"image": side * side + most}


class LlavaOnevisionRCMultiModalProcessor(LlavaNextRCMultiModalProcessor):
    """Adds how many images the prompt holds (it decides each image's layout) to the hashed processor kwargs, and
    each image's geometry (height, width, patched) as a field for the encoder."""

    def _prompt_keys(self, inputs) -> dict:
        return {IMAGES_KEY: inputs.mm_data_items.get_count("image", strict=False)}

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processed = super()._call_hf_processor(hf_data, hf_kwargs)
        processed.pop("batch_num_images", None)  # of this call's images, not of the prompt's
        sizes = processed["image_sizes"].view(-1, 2).long()  # (I, 2) height, width
        patched = int(hf_kwargs.get(IMAGES_KEY, 1)) == 1
        processed[GEOMETRY_FIELD] = torch.cat([sizes, sizes.new_full((sizes.shape[0], 1), int(patched))], dim=1)
        return processed

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[GEOMETRY_FIELD] = MultiModalFieldConfig.batched("image")
        return fields


class LlavaRCDummyInputsBuilder(BaseDummyInputsBuilder):
    """Profiling inputs: one placeholder per image, images of the size with the most tokens."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        width, height = self.info.get_image_size_with_most_features()
        overrides = mm_options.get("image") if mm_options else None
        images = self._get_dummy_images(
            width=width, height=height, num_images=mm_counts.get("image", 0), overrides=overrides
        )
        return {"image": images}


# ---- the model -------------------------------------------------------------------------------------------------
class VllmEmbeddings(nn.Module):
    """The language model's input embeddings seen from the transformers vision half (no parameters of its own)."""

    def __init__(self, embed_input_ids):
        super().__init__()
        self._embed = embed_input_ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._embed(input_ids)


def vision_half(transformers_class, config_class, hf_config, dtype: torch.dtype):
    """The transformers model of ``hf_config`` with a zero-layer, one-word language model: the vision tower (every
    layer), projector, guidance modules and the compression pre-pass, without the language model's weights."""
    settings = {key: value for key, value in hf_config.to_dict().items() if key not in ("model_type", "auto_map")}
    text_config = dict(settings["text_config"])
    text_config.update(num_hidden_layers=0, vocab_size=1, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if text_config.get("layer_types") is not None:  # Qwen2 (OneVision) lists a type per layer
        text_config["layer_types"] = []
    settings.update(text_config=text_config, pad_token_id=0, tie_word_embeddings=False)
    config = config_class(**settings)
    config._attn_implementation = "sdpa"
    return transformers_class(config).to(dtype).eval()


@MULTIMODAL_REGISTRY.register_processor(
    LlavaRCMultiModalProcessor, info=LlavaRCProcessingInfo, dummy_inputs=LlavaRCDummyInputsBuilder
)
class LlavaRCForVllm(nn.Module, SupportsMultiModal, SupportsPP):
    """A LLaVA-family model in vLLM: vLLM's language model, fed by the transformers model's compression pre-pass."""

    transformers_class = LlavaRCForConditionalGeneration
    config_class = LlavaRCConfig
    sizes_field = "image_sizes"  # the per-image field that ``_stack_pixels`` reads beside the pixels

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"llava-rc serves images only, got modality {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.multimodal_config = vllm_config.model_config.multimodal_config
        request_settings(config, {})  # an engine whose settings cannot be served fails at start
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_index]
        )
        with self._mark_tower_model(vllm_config, "image"):
            self.compressor = vision_half(
                self.transformers_class, self.config_class, config, vllm_config.model_config.dtype
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        # The pre-pass embeds its synthetic rows with the served model's own embeddings ("llm" guidance reads them).
        embeddings = VllmEmbeddings(self.language_model.embed_input_ids)
        self.compressor.get_input_embeddings = lambda: embeddings
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ---- the encoder -------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        pixel_values = per_item(kwargs.get("pixel_values"))
        if not pixel_values:
            return []
        image_sizes = per_item(kwargs.get(self.sizes_field))
        settings_codes = per_item(kwargs[SETTINGS_FIELD])
        guidance_ids = per_item(kwargs[GUIDANCE_IDS_FIELD])
        guidance_mask = per_item(kwargs[GUIDANCE_MASK_FIELD])
        # One pre-pass per distinct settings (requests of one engine step may differ).
        groups: dict[str, list[int]] = {}
        for image, codes in enumerate(settings_codes):
            groups.setdefault(bytes(codes.tolist()).decode("utf-8"), []).append(image)
        outputs: list[torch.Tensor | None] = [None] * len(pixel_values)
        for members in groups.values():
            settings = decode_settings(settings_codes[members[0]])
            tokens = self.compress_images(
                [pixel_values[i] for i in members],
                [image_sizes[i] for i in members] if image_sizes else None,
                settings,
                [guidance_ids[i] for i in members],
                [guidance_mask[i] for i in members],
            )[0]
            for image, image_tokens in zip(members, tokens):
                outputs[image] = image_tokens
        return outputs

    @torch.no_grad()
    def compress_images(self, pixel_values, image_sizes, settings: MethodConfig, guidance_ids, guidance_mask):
        """Compress images that share ``settings`` with the transformers pre-pass; returns (per-image tokens
        [(K_i, D)], the ``CompressionReport``).

        pixel_values: per image its processor output (LLaVA-1.5 (3, H, W); NeXT/OneVision (P, 3, H, W));
        image_sizes: per image (2,) or None; guidance_ids/guidance_mask: per image (T_i,) its request's question.
        """
        batch = self.compressor.compress_inputs(
            **self.prepass_inputs(pixel_values, image_sizes, settings, guidance_ids, guidance_mask)
        )
        image_slot = batch.packed.image_slot  # (I, L') index into the kept tokens, -1 elsewhere; one image per row
        tokens = batch.inputs_embeds[image_slot >= 0]  # (sum K_i, D) image by image, each in reading order
        return list(tokens.split(batch.report.kept_counts.tolist())), batch.report

    def prepass_inputs(self, pixel_values, image_sizes, settings: MethodConfig, guidance_ids, guidance_mask) -> dict:
        """The arguments of ``compress_inputs`` for images sharing ``settings``: one synthetic row per image, its
        placeholder run then ("llm" guidance) its request's text tokens; the CLIP question rows ("clip")."""
        compressor = self.compressor
        if settings.method == "none":  # the stock tokens: every patch kept, in reading order (newlines in place)
            settings = update_compression(None, {"method": "random", "budget": 1.0})
        device = next(compressor.parameters()).device
        pixels, sizes = self._stack_pixels(pixel_values, image_sizes, device)
        crops, crops_per_image = compressor._image_crops(pixels, sizes)
        run_lengths = [layout.token_index.shape[0] for layout in compressor._image_token_layouts(crops_per_image, sizes)]
        llm_question = settings.guidance_source == "llm"
        text = [ids[mask.bool()] if llm_question else ids[:0] for ids, mask in zip(guidance_ids, guidance_mask)]
        width = max(run + row.shape[0] for run, row in zip(run_lengths, text))
        pad_id = compressor.config.text_config.pad_token_id or 0
        input_ids = torch.full((len(run_lengths), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, (run, question) in enumerate(zip(run_lengths, text)):
            input_ids[row, :run] = compressor.config.image_token_id
            input_ids[row, run : run + question.shape[0]] = question
            attention_mask[row, : run + question.shape[0]] = 1
        clip_ids = clip_mask = None
        if settings.guidance_source == "clip":
            length = max(ids.shape[0] for ids in guidance_ids)
            clip_ids = torch.zeros(len(guidance_ids), length, dtype=torch.long)
            clip_mask = torch.zeros_like(clip_ids)
            for row, (ids, mask) in enumerate(zip(guidance_ids, guidance_mask)):
                clip_ids[row, : ids.shape[0]] = ids
                clip_mask[row, : mask.shape[0]] = mask
            clip_ids, clip_mask = clip_ids.to(device), clip_mask.to(device)
        return dict(
            input_ids=input_ids.to(device),
            pixel_values=pixels,
            attention_mask=attention_mask.to(device),
            settings=settings,
            guidance_input_ids=clip_ids,
            guidance_attention_mask=clip_mask,
            pad_left=False,
            image_sizes=sizes,
        )

    def _stack_pixels(self, pixel_values, image_sizes, device):
        """LLaVA-1.5: (I, 3, H, W)."""
        return torch.stack(pixel_values).to(device), None

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    # ---- weights -----------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Language-model weights go to vLLM's model; everything else (tower, projector, newline, guidance
        modules) to the transformers vision half, whose CLIP names may be nested (``vision_model.``) or not."""
        language, vision = [], {}
        for name, tensor in weights:
            if name.startswith("lm_head.") or name.startswith("language_model.lm_head."):
                language.append((name[name.index("lm_head.") :], tensor))
            elif name.startswith(("model.language_model.", "language_model.")):
                rest = name.split("language_model.", 1)[1]  # LlamaModel-relative, or "model."-prefixed
                language.append((rest if rest.startswith("model.") else f"model.{rest}", tensor))
            else:
                vision[name] = tensor
        loaded = {f"language_model.{name}" for name in self.language_model.load_weights(language)}
        loaded |= self._load_vision_half(vision)
        return loaded

    def _load_vision_half(self, weights: dict[str, torch.Tensor]) -> set[str]:
        own = self.compressor.state_dict()
        state = {}
        for name, tensor in weights.items():
            target = self._vision_half_name(name, own)
            if target is None:
                raise ValueError(f"checkpoint weight {name!r} has no place in the llava-rc vision half")
            state[target] = tensor
        wanted = {name for name in own if not name.startswith(("model.language_model.", "lm_head."))}
        missing = sorted(wanted - set(state))
        if missing:
            raise ValueError(f"the checkpoint lacks these vision-side weights: {missing[:8]}")
        self.compressor.load_state_dict(state, strict=False)
        return {f"compressor.{name}" for name, _ in self.compressor.named_parameters()}

    @staticmethod
    def _vision_half_name(name: str, own: Mapping[str, torch.Tensor]) -> str | None:
        candidates = [name, f"model.{name}" if not name.startswith("model.") else name]
        for candidate in list(candidates):
            candidates.append(candidate.replace("vision_tower.", "vision_tower.vision_model.", 1))
            candidates.append(candidate.replace("vision_tower.vision_model.", "vision_tower.", 1))
        return next((candidate for candidate in candidates if candidate in own), None)

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model", connector="compressor.model.multi_modal_projector",
            tower_model="compressor.model.vision_tower",
        )


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextRCMultiModalProcessor, info=LlavaNextRCProcessingInfo, dummy_inputs=LlavaRCDummyInputsBuilder
)
class LlavaNextRCForVllm(LlavaRCForVllm):
    """LLaVA-NeXT: the processor's crops of each image (padded to the largest crop count) and its size."""

    transformers_class = LlavaNextRCForConditionalGeneration
    config_class = LlavaNextRCConfig

    def _stack_pixels(self, pixel_values, image_sizes, device):
        """(I, P_max, 3, H, W) crops padded with zeros past each image's own count, and (I, 2) sizes."""
        most = max(pixels.shape[0] for pixels in pixel_values)
        padded = [torch.nn.functional.pad(pixels, (0, 0, 0, 0, 0, 0, 0, most - pixels.shape[0])) for pixels in pixel_values]
        return torch.stack(padded).to(device), torch.stack(list(image_sizes)).to(device)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionRCMultiModalProcessor, info=LlavaOnevisionRCProcessingInfo, dummy_inputs=LlavaRCDummyInputsBuilder
)
class LlavaOnevisionRCForVllm(LlavaNextRCForVllm):
    """LLaVA-OneVision (images; videos are not served): the processor's crops of each image and its geometry (size,
    and whether its prompt reads its grid), handed to the transformers pre-pass as an ``OnevisionImageGeometry``."""

    transformers_class = LlavaOnevisionRCForConditionalGeneration
    config_class = LlavaOnevisionRCConfig
    sizes_field = GEOMETRY_FIELD

    def _stack_pixels(self, pixel_values, image_sizes, device):
        """(I, P_max, 3, H, W) crops padded with zeros, and the images' ``OnevisionImageGeometry``."""
        pixels, geometry = super()._stack_pixels(pixel_values, image_sizes, device)
        rows = geometry.tolist()  # (I, 3) height, width, patched
        return pixels, OnevisionImageGeometry(
            sizes=tuple((height, width) for height, width, _ in rows),
            patched=tuple(bool(patched) for _, _, patched in rows),
            aspect_ratio=self.config.vision_aspect_ratio,
        )
