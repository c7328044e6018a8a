"""Configurations of Qwen2.5-VL and Qwen3-VL with visual-token compression: the stock config plus ``compression``."""

from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

from .configuration_llava_rc import normalise_compression_fields


def check_qwen_compression_fields(config) -> None:
    """The shared compression fields, normalised, plus what a Qwen tower cannot do."""
    normalise_compression_fields(config)
    if config.importance_score == "cls_attention":
        raise ValueError(
            "importance_score='cls_attention' needs a vision tower with a [CLS] token; Qwen's ViT has none: use "
            "'received_attention' or None"
        )
    if config.guidance_text_config is not None:
        raise ValueError(
            "guidance_text_config (a CLIP text tower for guidance='clip') is not supported on Qwen: its ViT does not "
            "share CLIP's image-text space; leave it None (guidance 'auto' then runs without text guidance)"
        )


class Qwen2_5_VLRCConfig(Qwen2_5_VLConfig):
    r"""Qwen2.5-VL configuration whose model compresses the visual tokens of every image (not of videos).

    compression (`dict`, *optional*):
        As for [`LlavaRCConfig`]: ``{"method": <name>, <method parameters>}``, validated on construction; default
        ``{"method": "rc"}``. The unit is one language-model token (a 2 x 2 merge of ViT patches): methods see one
        token per LLM token and a budget counts LLM tokens (an image of (h, w) patches has h * w / 4).
    importance_score (`str`, *optional*):
        ``"received_attention"`` or None (the same): the ViT has no [CLS], so methods that read [CLS] attention rank
        by the mean attention each token receives at the last full-attention block, summed per merge unit.
    attention_sinks (`int`, *optional*, defaults to 0): as for [`LlavaRCConfig`] (counted in ViT patches).
    guidance_text_config, guidance_projection_dim: must stay None (``guidance="clip"`` is not supported on Qwen).
    All other arguments are those of [`Qwen2_5_VLConfig`]. Build one from a stock config with
    ``Qwen2_5_VLRCConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"}, compression={...})``.
    """

    model_type = "qwen2_5_vl_rc"

    compression: dict | None = None
    guidance_text_config: dict | None = None
    guidance_projection_dim: int | None = None
    importance_score: str | None = None
    attention_sinks: int = 0

    def __post_init__(self, **kwargs):
        check_qwen_compression_fields(self)
        super().__post_init__(**kwargs)


class Qwen3VLRCConfig(Qwen3VLConfig):
    r"""Qwen3-VL configuration whose model compresses the visual tokens of every image (not of videos).

    compression (`dict`, *optional*), importance_score (`str`, *optional*), attention_sinks (`int`, *optional*):
        as for [`Qwen2_5_VLRCConfig`]. Every ViT block of Qwen3-VL attends over the whole image; the importance is
        read at the last one. The DeepStack features of an image are compressed with the same plan as its tokens.
    All other arguments are those of [`Qwen3VLConfig`].
    """

    model_type = "qwen3_vl_rc"

    compression: dict | None = None
    guidance_text_config: dict | None = None
    guidance_projection_dim: int | None = None
    importance_score: str | None = None
    attention_sinks: int = 0

    def __post_init__(self, **kwargs):
        check_qwen_compression_fields(self)
        super().__post_init__(**kwargs)


__all__ = ["Qwen2_5_VLRCConfig", "Qwen3VLRCConfig"]
