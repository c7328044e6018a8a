"""The LLaVA line's hooks (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision): a CLIP or SigLIP tower run over crops, the
importance recomputed from its stored hidden states, the projector, and the stock LLaVA forward arguments.

``LlavaFamilyMixin`` answers the shared planning's encode hooks (``planning.CompressionPlanner``) for every model of
the line; a model class adds only how its pixel values become crops and how the crops' tokens fill each image's
placeholder run (``_image_crops``, ``_image_token_layouts``, and where it differs ``_signal_packer``,
``_image_newline``, ``_plan_tokens``; see ``modeling_llava_rc``).

- encode: the tower once over every crop (P, 3, H, W) with all hidden states; ``vision_feature_layer`` picks the
  features, ``vision_feature_select_strategy`` must drop the [CLS] ("default") where the tower has one;
- importance: per crop token, the [CLS] attention of its crop or the mean attention it receives
  (``config.importance_score``), recomputed at one encoder layer with that layer's own norm and q/k projections
  (no hooks, no ``output_attentions``), and the layer's keys;
- guidance: ``"llm"`` compares the projected patches with the question's input embeddings, ``"clip"`` CLIP's
  projected final patches with its text tower's question embedding (the RC paper).
"""

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .compressed_generation import CompressedGenerationMixin
from .compression_common import CompressionInputs, MethodConfig, TokenPlan, apply_plan, cls_attention
from .planning import CropSignals, EncodedImages, ImageLayout
from .vision_importance import importance_score_kind, received_attention


class LlavaFamilyMixin(CompressedGenerationMixin):
    """Compression for a LLaVA-line ``...ForConditionalGeneration`` (put it first in the bases): the encode hooks of
    a crop-based CLIP/SigLIP tower and the stock LLaVA ``forward()`` arguments. A model class supplies
    ``_image_crops`` and ``_image_token_layouts``.

    ``generate(..., compression={...})`` and ``forward(..., compression={...})`` override the settings for one
    call; nothing is stored on the model.
    """

    _image_inputs = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")

    # ---- forward: the stock LLaVA inputs --------------------------------------------------------------------
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
        return self._compressed_forward(
            compression,
            dict(
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
            ),
            dict(
                guidance_mask=guidance_mask,
                guidance_input_ids=guidance_input_ids,
                guidance_attention_mask=guidance_attention_mask,
            ),
        )

    def _init_guidance_modules(self, config) -> None:
        """"clip" guidance (the RC paper): CLIP's text tower and both projections into the shared space."""
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

    # ---- the model's hooks ----------------------------------------------------------------------------------
    def _image_crops(self, pixel_values: torch.Tensor, image_sizes) -> tuple[torch.Tensor, list[int]]:
        """(crops (P, 3, H, W) for the vision tower, crops per image) from the caller's pixel values."""
        raise NotImplementedError

    def _image_token_layouts(self, crops_per_image: list[int], image_sizes) -> list[ImageLayout]:
        """Each image's placeholder run in terms of crop tokens, in the order the stock model fills it."""
        raise NotImplementedError

    def _num_prefix_tokens(self) -> int:
        """Tokens before the patches in the vision tower's output: 1 for a [CLS] (CLIP), 0 for none (SigLIP)."""
        return 1

    def _plan_tokens(self, signals: CropSignals, plan: TokenPlan, pack, settings: MethodConfig) -> torch.Tensor:
        """(I_g, K, D) the language-model tokens of a plan; pack: the group's ``_signal_packer``.

        A selection plan (no merge weights) of patches already projected (stage "projected", or "llm" guidance) is
        a gather of that projection; merged features must go through the (nonlinear) projector.
        """
        if settings.stage == "projected" or (plan.is_selection and signals.projected is not None):
            return apply_plan(pack(signals.projected), plan)  # (I_g, K, D)
        return self.model.multi_modal_projector(apply_plan(pack(signals.features), plan))  # (I_g, K, D)

    # ---- encode ---------------------------------------------------------------------------------------------
    def _encode_images(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        settings: MethodConfig,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> EncodedImages:
        """The vision tower once over every crop of every image (``_image_crops``), and each image's layout
        (``_image_token_layouts``). The family's image inputs arrive as keywords (``_image_inputs``)."""
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        expected_strategy = "default" if self._num_prefix_tokens() else "full"
        if strategy != expected_strategy:
            raise ValueError(
                f"compression needs vision_feature_select_strategy={expected_strategy!r} (the patch tokens, without "
                f"[CLS]) for this model, got {strategy!r}"
            )
        feature_layer = self._vision_feature_layer(vision_feature_layer)
        attention_layer = self._attention_layer_index(feature_layer, settings) if settings.needs_attention else None
        crops, crops_per_image = self._image_crops(pixel_values, image_sizes)
        layouts = self._image_token_layouts(crops_per_image, image_sizes)
        vision_tower = self.model.vision_tower
        hidden_states = vision_tower(
            crops.to(vision_tower.dtype), output_hidden_states=True, return_dict=True
        ).hidden_states
        read_states = {feature_layer % len(hidden_states)} | ({attention_layer} if attention_layer is not None else set())
        non_finite = torch.stack([(~hidden_states[index].isfinite()).any() for index in sorted(read_states)]).any()
        run_lengths = [layout.token_index.shape[0] for layout in layouts]
        per_image = f"{run_lengths[0]} patches each" if len(set(run_lengths)) == 1 else f"{run_lengths} tokens"
        return EncodedImages(
            layouts=layouts,
            crops_per_image=crops_per_image,
            non_finite=non_finite,
            description=f"pixel_values holds {len(layouts)} image(s) of {per_image}",
            device=hidden_states[0].device,
            state={"hidden_states": hidden_states, "feature_layer": feature_layer},
        )

    def _vision_feature_layer(self, vision_feature_layer) -> int:
        """The feature layer as an index into the tower's hidden states (a one-element list counts as its int)."""
        layer = vision_feature_layer if vision_feature_layer is not None else self.config.vision_feature_layer
        if isinstance(layer, (list, tuple)) and len(layer) == 1:
            layer = layer[0]
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(
                f"compression supports a single vision_feature_layer (an int), got {layer!r}; "
                "use compression={'method': 'none'} for multi-layer features"
            )
        num_states = self.config.vision_config.num_hidden_layers + 1  # the embeddings, then each layer's output
        if not -num_states <= layer < num_states:
            raise ValueError(
                f"vision_feature_layer={layer} is out of range for a vision tower with "
                f"{num_states - 1} layers; expected an int in [-{num_states}, {num_states - 1}]"
            )
        return layer

    def _attention_layer_index(self, feature_layer: int, settings: MethodConfig) -> int:
        """The encoder layer whose [CLS] attention a method reads (see ``_attention_inputs``)."""
        num_layers = self.config.vision_config.num_hidden_layers
        requested = getattr(settings, "cls_attention_layer", None)
        if requested is None:
            consuming = feature_layer % (num_layers + 1)  # hidden_states[l] is layer l's input
            producing = getattr(settings, "attention_layer", "consuming") == "producing"
            return min(max(consuming - producing, 0), num_layers - 1)
        if -num_layers <= requested < num_layers:
            return requested % num_layers
        raise ValueError(
            f"cls_attention_layer={requested} is out of range for a vision tower with {num_layers} layers; "
            f"expected an int in [-{num_layers}, {num_layers - 1}]"
        )

    def _attention_inputs(
        self, hidden_states: tuple, feature_layer: int, settings: MethodConfig, all_queries: bool = False
    ):
        """[CLS] query (P, A) (all_queries: every token's, (P, T, A)) and keys (P, T, A) of every crop, T = prefix + N
        tokens ([CLS] first when the tower has one), recomputed from the stored hidden states.

        Layer ``l`` of the encoder reads ``hidden_states[l]``; by default the attention layer is the one that reads
        the feature layer's output (for LLaVA's -2, the last layer), or the last layer when the features are the
        final output; a method whose settings say ``attention_layer="producing"`` (FasterVLM) reads the layer that
        produces it instead (for -2, the one before the last). The layer's own pre-norm and q/k projections are
        applied, so no hooks and no ``output_attentions`` are needed and SDPA/FlashAttention stay on.
        """
        tower = self.model.vision_tower
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise ValueError(
                f"{settings.method!r} reads vision attention, which needs a CLIP/SigLIP-style vision tower with an "
                f"encoder of attention layers; got {type(tower).__name__}"
            )
        layer_index = self._attention_layer_index(feature_layer, settings)
        layer = encoder.layers[layer_index]
        normed = layer.layer_norm1(hidden_states[layer_index])  # (P, T, C)
        query = layer.self_attn.q_proj(normed if all_queries else normed[:, 0])  # (P, T, A) or (P, A)
        keys = layer.self_attn.k_proj(normed)  # (P, T, A)
        return query, keys, layer.self_attn.num_heads

    def _crop_importance(
        self, hidden_states: tuple, feature_layer: int, settings: MethodConfig
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Per crop token: (importance per head (P, N), importance joint (P, N), keys (P, N, A), num_heads).

        ``config.importance_score`` picks the score: ``"cls_attention"`` (each crop's own [CLS] attention, softmax over
        that crop) or ``"received_attention"`` (the mean attention each token receives from all tokens of its crop,
        averaged over queries and heads; for towers without [CLS]); None = [CLS] attention when the tower has a
        [CLS], else received attention. "per head" softmaxes each head (FasterVLM, PruMerge); "joint" one softmax
        over all heads concatenated (RC's released code).
        """
        prefix = self._num_prefix_tokens()
        kind = importance_score_kind(getattr(self.config, "importance_score", None), prefix)
        query, keys, num_heads = self._attention_inputs(
            hidden_states, feature_layer, settings, all_queries=kind == "received_attention"
        )
        if kind == "cls_attention":
            # Each crop's own [CLS] attention, softmax over that crop ([CLS] + all its N patches).
            crops = CompressionInputs(  # cls_attention reads only the query and keys
                features=keys, cls_query=query, attention_keys=keys, num_heads=num_heads
            )
            per_head = cls_attention(crops, per_head=True)  # (P, N)
            joint = cls_attention(crops, per_head=False)  # (P, N)
        else:
            sinks = getattr(self.config, "attention_sinks", 0) or 0
            per_head = received_attention(query, keys, num_heads, per_head=True, num_sinks=sinks)[:, prefix:]
            joint = received_attention(query, keys, num_heads, per_head=False, num_sinks=sinks)[:, prefix:]
        return per_head, joint, keys[:, prefix:], num_heads

    def _crop_signals(self, encoded: EncodedImages, settings: MethodConfig) -> CropSignals:
        """Everything the method may read but the text scores, for every crop token: (P, N, ...) tensors."""
        hidden_states, feature_layer = encoded.state["hidden_states"], encoded.state["feature_layer"]
        features = hidden_states[feature_layer][:, self._num_prefix_tokens() :]  # (P, N, C) patch tokens only
        signals = CropSignals(features=features)
        if settings.stage == "projected" or settings.guidance_source == "llm":
            signals.projected = self.model.multi_modal_projector(features)  # (P, N, D)
        if settings.needs_attention:
            with torch.no_grad():
                importance = self._crop_importance(hidden_states, feature_layer, settings)
            signals.attention_per_head, signals.attention_joint, signals.keys, signals.num_heads = importance
        return signals

    def _guidance_patches(self, encoded: EncodedImages, signals: CropSignals, settings: MethodConfig) -> torch.Tensor:
        """(P, N, W) the crop tokens in the space of the question embedding (``_llm_question`` / ``_clip_question``)."""
        if settings.guidance_source == "llm":
            return signals.projected.detach()  # (P, N, D)
        # CLIP's own image-text space: the final layer's patch tokens, post-norm, visual projection.
        final_patches = self.model.vision_tower.post_layernorm(
            encoded.state["hidden_states"][-1][:, self._num_prefix_tokens() :]
        )  # (P, N, C)
        return self.guidance_visual_projection(final_patches)  # (P, N, W)


__all__ = ["LlavaFamilyMixin"]
