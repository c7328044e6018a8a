"""The literal registry of compression methods: a name maps to (config class, function).

Adding a method means one ``compression_<method>.py`` with a frozen ``MethodConfig`` dataclass and a pure
function, and one row here.
"""

import dataclasses
import numbers
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


def parse_compression(settings: dict | str | MethodConfig | None) -> MethodConfig:
    """Validate compression settings (``{"method": name, **params}``, or a method name alone, meaning
    ``{"method": name}``) into that method's config.

    Raises ValueError naming an unknown method or key, or a value out of range, and the allowed values; TypeError
    for a method name that is not a string. numpy integers and floats are accepted as Python numbers.
    """
    if settings is None:
        return NoCompressionConfig()
    if isinstance(settings, MethodConfig):
        return settings
    settings = as_settings_dict(settings)
    params = {name: _plain_number(value) for name, value in settings.items()}
    method = params.pop("method", None)
    if not isinstance(method, str):
        raise TypeError(
            f"compression method must be a str, one of {sorted(METHODS)}; got {type(method).__name__} {method!r}"
        )
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


def update_compression(
    base: dict | str | MethodConfig | None, update: dict | str | MethodConfig | None
) -> MethodConfig:
    """The settings of one call: ``update`` applied to ``base`` (the model config's settings), validated.

    The rule of ``generate(**kwargs)`` over ``generation_config``: keys given in ``update`` replace the base's
    settings of the same method and keep the rest (``{"budget": 16}`` on an RC config stays RC with its guidance);
    naming another method starts from that method's defaults (``{"method": "gprune"}`` is G-Prune as registered).
    A method name alone means ``{"method": name}``. A ``MethodConfig`` given as ``update`` is complete and is used
    as it is. None: the base alone.
    """
    if isinstance(update, MethodConfig):
        return update
    base_config = parse_compression(base)
    if update is None:
        return base_config
    update = as_settings_dict(update)
    method = update.get("method", base_config.method)
    if method == base_config.method:
        return parse_compression({**base_config.to_dict(), **update})
    return parse_compression({**update, "method": method})


def as_settings_dict(settings: dict | str) -> dict:
    """Compression settings as a dict: a method name alone is ``{"method": name}``; a dict is returned as it is."""
    if isinstance(settings, str):
        return {"method": settings}
    if not isinstance(settings, dict):
        raise ValueError(
            "compression must be a dict like {'method': 'rc', ...} or a method name (one of "
            f"{sorted(METHODS)}), got {type(settings).__name__} {settings!r}"
        )
    return settings


def _plain_number(value):
    """numpy (or other) integers and reals as Python int/float, so configs stay plain JSON; others unchanged."""
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def method_function(config: MethodConfig) -> Callable | None:
    """The pure function that plans ``config``'s compression (None for ``"none"``)."""
    return METHODS[config.method][1]
