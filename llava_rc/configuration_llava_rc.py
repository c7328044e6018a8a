"""Configuration of LLaVA with visual-token compression: a ``LlavaConfig`` plus the ``compression`` settings."""

from transformers import LlavaConfig

from .compression_registry import parse_compression

DEFAULT_COMPRESSION = {"method": "rc"}


class LlavaRCConfig(LlavaConfig):
    r"""LLaVA configuration whose model compresses the visual tokens of every image.

    compression (`dict`, *optional*):
        Plain-JSON settings ``{"method": <name>, <method parameters>}``, validated on construction against the
        method registry (see ``llava_rc.compression_registry.METHODS``). Defaults to Recoverable Compression
        (``{"method": "rc"}``, adaptive count, ``"llm"`` guidance); ``{"method": "none"}`` is the identity.
    guidance_text_config (`dict`, *optional*):
        A `CLIPTextConfig` as a dict. When given, the model owns a CLIP text tower and the CLIP text and visual
        projections, which ``guidance="clip"`` uses (the RC paper's text guidance).
    guidance_projection_dim (`int`, *optional*):
        Width of CLIP's shared image-text space; required with ``guidance_text_config``.
    All other arguments are those of [`LlavaConfig`].
    """

    model_type = "llava_rc"

    compression: dict | None = None
    guidance_text_config: dict | None = None
    guidance_projection_dim: int | None = None

    def __post_init__(self, **kwargs):
        settings = DEFAULT_COMPRESSION if self.compression is None else self.compression
        # Store the normalised JSON form (defaults filled in) so saved configs are explicit.
        self.compression = parse_compression(settings).to_dict()
        if self.guidance_text_config is not None:
            if hasattr(self.guidance_text_config, "to_dict"):
                self.guidance_text_config = self.guidance_text_config.to_dict()
            if not isinstance(self.guidance_projection_dim, int) or self.guidance_projection_dim < 1:
                raise ValueError(
                    "guidance_projection_dim must be a positive int (CLIP's projection_dim) when "
                    f"guidance_text_config is given, got {self.guidance_projection_dim!r}"
                )
        super().__post_init__(**kwargs)
