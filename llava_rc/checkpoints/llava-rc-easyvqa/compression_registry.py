"""The literal registry of compression methods: a name maps to (config class, function).

Adding a method means one ``compression_<method>.py`` with a frozen ``MethodConfig`` dataclass and a pure
function, and one row here.
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .compression_cls_attention import ClsAttentionConfig, compress_cls_attention
from .compression_common import MethodConfig
from .compression_gprune import GPruneConfig, compress_gprune
from .compression_prumerge import PruMergeConfig, PruMergePlusConfig, compress_prumerge, compress_prumerge_plus
from .compression_random import RandomConfig, compress_random
from .compression_rc import RCConfig, compress_rc
from .compression_trsm import TrsmConfig, compress_trsm


@dataclass(frozen=True)
class NoCompressionConfig(MethodConfig):
    """``"none"``: the identity; the model behaves exactly like stock LLaVA."""

    method = "none"


METHODS: dict[str, tuple[type[MethodConfig], Callable | None]] = {
    "none": (NoCompressionConfig, None),
    "random": (RandomConfig, compress_random),
    "cls_attention": (ClsAttentionConfig, compress_cls_attention),
    "prumerge": (PruMergeConfig, compress_prumerge),
    "prumerge_plus": (PruMergePlusConfig, compress_prumerge_plus),
    "gprune": (GPruneConfig, compress_gprune),
    "trsm": (TrsmConfig, compress_trsm),
    "rc": (RCConfig, compress_rc),
}


def parse_compression(settings: dict | MethodConfig | None) -> MethodConfig:
    """Validate compression settings (``{"method": name, **params}``) into that method's config.

    Raises ValueError naming an unknown method or key, or a value out of range, and the allowed values.
    """
    if settings is None:
        return NoCompressionConfig()
    if isinstance(settings, MethodConfig):
        return settings
    if not isinstance(settings, dict):
        raise ValueError(f"compression must be a dict like {{'method': 'rc', ...}}, got {type(settings).__name__}")
    params = dict(settings)
    method = params.pop("method", None)
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; expected one of {sorted(METHODS)}")
    config_class, _ = METHODS[method]
    allowed = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for compression method {method!r}; allowed: {sorted(allowed) or 'none'}"
        )
    return config_class(**params)


def method_function(config: MethodConfig) -> Callable | None:
    """The pure function that plans ``config``'s compression (None for ``"none"``)."""
    return METHODS[config.method][1]
