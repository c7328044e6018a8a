"""Configurations of LLaVA, LLaVA-NeXT and LLaVA-OneVision with visual-token compression: the stock config plus
``compression``."""

from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig

from .compression_registry import parse_compression
from .vision_importance import IMPORTANCE_SCORES

DEFAULT_COMPRESSION = {"method": "rc"}


def normalise_compression_fields(config) -> None:
    """Validate and normalise the compression fields shared by both configs, in place."""
    settings = DEFAULT_COMPRESSION if config.compression is None else config.compression
    # Store the normalised JSON form (defaults filled in) so saved configs are explicit.
    config.compression = parse_compression(settings).to_dict()
    importance = getattr(config, "importance_score", None)
    if importance is not None and importance not in IMPORTANCE_SCORES:
        raise ValueError(f"importance_score must be one of {list(IMPORTANCE_SCORES)} or None, got {importance!r}")
    sinks = getattr(config, "attention_sinks", 0)
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"attention_sinks must be an int >= 0 (tokens per crop left out of the score), got {sinks!r}")
    if config.guidance_text_config is not None:
        if hasattr(config.guidance_text_config, "to_dict"):
            config.guidance_text_config = config.guidance_text_config.to_dict()
        if not isinstance(config.guidance_projection_dim, int) or config.guidance_projection_dim < 1:
            raise ValueError(
                "guidance_projection_dim must be a positive int (CLIP's projection_dim) when "
                f"guidance_text_config is given, got {config.guidance_projection_dim!r}"
            )


class LlavaRCConfig(LlavaConfig):
    r"""LLaVA configuration whose model compresses the visual tokens of every image.

    compression (`dict` or `str`, *optional*):
        Plain-JSON settings ``{"method": <name>, <method parameters>}`` (a method name alone means
        ``{"method": name}``), validated on construction against the method registry (see
        ``llava_rc.compression_registry.METHODS``) and stored as the dict with every default filled in. A config without this key (None) becomes
        Recoverable Compression with its defaults: ``{"method": "rc"}``, adaptive count, ``"auto"`` guidance (the RC
        paper's ``"clip"`` guidance where the model has ``guidance_text_config``, else none, with a warning).
        ``{"method": "none"}`` is the identity. Per-call ``compression=`` updates these settings (see
        ``compression_registry.update_compression``).
    guidance_text_config (`dict`, *optional*):
        A `CLIPTextConfig` as a dict. When given, the model owns a CLIP text tower and the CLIP text and visual
        projections, which ``guidance="clip"`` uses (the RC paper's text guidance).
    guidance_projection_dim (`int`, *optional*):
        Width of CLIP's shared image-text space; required with ``guidance_text_config``.
    importance_score (`str`, *optional*):
        The per-token score that methods reading attention ([CLS]-based: ``cls_attention``, PruMerge(+), RC) rank
        by: ``"cls_attention"`` or ``"received_attention"`` (the mean attention a token receives from all tokens of
        its crop); None (default) = [CLS] attention when the vision tower has a [CLS], else received attention.
    attention_sinks (`int`, *optional*, defaults to 0):
        With received attention: the most-attended tokens per crop treated as attention sinks (left out of the
        statistic as keys and as queries, and scored 0); 0 keeps the plain statistic. See
        ``llava_rc.vision_importance``.
    All other arguments are those of [`LlavaConfig`].
    """

    model_type = "llava_rc"

    compression: dict | str | None = None
    guidance_text_config: dict | None = None
    guidance_projection_dim: int | None = None
    importance_score: str | None = None
    attention_sinks: int = 0

    def __post_init__(self, **kwargs):
        normalise_compression_fields(self)
        super().__post_init__(**kwargs)


class LlavaNextRCConfig(LlavaNextConfig):
    r"""LLaVA-NeXT (anyres) configuration whose model compresses the visual tokens of every image.

    compression (`dict` or `str`, *optional*):
        As for [`LlavaRCConfig`]: ``{"method": <name>, <method parameters>}``, validated on construction; default
        ``{"method": "rc"}``. On anyres images a budget counts each image's visual tokens *without* newline tokens
        (base view N + unpadded high-resolution grid rows x cols = M, different per image): an int B keeps
        ``min(B, M)``, a ratio r keeps ``floor(r * M)`` (at least one), one selection per image over both views;
        ``"gprune"`` instead applies a ratio to each of its two graphs (base view, grid) and splits an int by view
        size. The ``rows`` newline tokens are always kept on top and the output is in reading order (newlines at
        the row ends). [CLS] attention is each crop's own, normalised per crop; RC's LOF statistics run once over
        the whole image. Details: ``llava_rc.modeling_llava_rc`` and the README.
    guidance_text_config (`dict`, *optional*), guidance_projection_dim (`int`, *optional*):
        CLIP text tower for ``guidance="clip"``, as for [`LlavaRCConfig`].
    importance_score (`str`, *optional*), attention_sinks (`int`, *optional*): as for [`LlavaRCConfig`].
    All other arguments are those of [`LlavaNextConfig`] (``image_grid_pinpoints``, ...). Build one from a stock
    config with ``LlavaNextRCConfig(**{k: v for k, v in next_config.to_dict().items() if k != "model_type"},
    compression={...})``.
    """

    model_type = "llava_next_rc"

    compression: dict | str | None = None
    guidance_text_config: dict | None = None
    guidance_projection_dim: int | None = None
    importance_score: str | None = None
    attention_sinks: int = 0

    def __post_init__(self, **kwargs):
        normalise_compression_fields(self)
        super().__post_init__(**kwargs)


class LlavaOnevisionRCConfig(LlavaOnevisionConfig):
    r"""LLaVA-OneVision configuration whose model compresses the visual tokens of every image (not of videos).

    compression (`dict` or `str`, *optional*):
        As for [`LlavaNextRCConfig`]: validated on construction, default ``{"method": "rc"}``; a budget counts each
        image's visual tokens without newline tokens (base view, then the unpadded grid, after the stock bilinear
        downsampling when the grid exceeds ``vision_aspect_ratio``), newline tokens are always kept. SigLIP has no
        [CLS]: methods that read [CLS] attention rank by the mean attention each token receives instead. Details:
        ``LlavaOnevisionRCForConditionalGeneration`` and ``docs/design.md``.
    guidance_text_config (`dict`, *optional*), guidance_projection_dim (`int`, *optional*), importance_score (`str`,
        *optional*), attention_sinks (`int`, *optional*): as for [`LlavaRCConfig`].
    All other arguments are those of [`LlavaOnevisionConfig`]. Build one from a stock config with
    ``LlavaOnevisionRCConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"}, compression={...})``.
    """

    model_type = "llava_onevision_rc"

    compression: dict | str | None = None
    guidance_text_config: dict | None = None
    guidance_projection_dim: int | None = None
    importance_score: str | None = None
    attention_sinks: int = 0

    def __post_init__(self, **kwargs):
        normalise_compression_fields(self)
        super().__post_init__(**kwargs)
