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
    All other arguments are those of [`LlavaConfig`].
    """

    model_type = "llava_rc"

    compression: dict | None = None

    def __post_init__(self, **kwargs):
        settings = DEFAULT_COMPRESSION if self.compression is None else self.compression
        # Store the normalised JSON form (defaults filled in) so saved configs are explicit.
        self.compression = parse_compression(settings).to_dict()
        super().__post_init__(**kwargs)
