"""llava-rc: training-free visual-token compression for LLaVA, LLaVA-NeXT and LLaVA-OneVision, loadable from the Hub.

The public names are imported on first use (PEP 562 ``__getattr__``): ``import llava_rc`` loads neither torch nor
transformers, so ``python -m llava_rc --help`` and ``llava-rc-upload --help`` answer at once. The first use of any
public name (``from llava_rc import LlavaRCConfig``, ``llava_rc.METHODS``, ...) registers the classes with
transformers' Auto classes; ``register_auto_classes()`` does it explicitly.

Which code serves a repo: once registered, the installed package's config, model AND processor classes serve every
``llava_rc`` / ``llava_next_rc`` / ``llava_onevision_rc`` repo, its remote-code files included (transformers prefers
classes registered in the process over a repo's ``auto_map``), so the three always come from one version. Before
that (or in a process that never uses llava_rc), the repo's own files serve all three: pin them with ``revision=``.
"""

import importlib

__version__ = "0.1.0"

# public name -> the sibling module that defines it
_EXPORTS = {
    "METHODS": "compression_registry",
    "CompressionInputs": "compression_common",
    "CompressionReport": "modeling_llava_rc",
    "LlavaNextRCConfig": "configuration_llava_rc",
    "LlavaNextRCForConditionalGeneration": "modeling_llava_rc",
    "LlavaOnevisionRCConfig": "configuration_llava_rc",
    "LlavaOnevisionRCForConditionalGeneration": "modeling_llava_rc",
    "LlavaRCCausalLMOutputWithPast": "modeling_llava_rc",
    "LlavaRCConfig": "configuration_llava_rc",
    "LlavaRCForConditionalGeneration": "modeling_llava_rc",
    "LlavaRCProcessor": "processing_llava_rc",
    "MethodConfig": "compression_common",
    "TokenPlan": "compression_common",
    "anyres_token_counts": "modeling_llava_rc",
    "parse_compression": "compression_registry",
    "Qwen2_5_VLRCConfig": "configuration_qwen_vl_rc",
    "Qwen2_5_VLRCForConditionalGeneration": "modeling_qwen_vl_rc",
    "Qwen3VLRCConfig": "configuration_qwen_vl_rc",
    "Qwen3VLRCForConditionalGeneration": "modeling_qwen_vl_rc",
    "update_compression": "compression_registry",
}
_registered = False


def register_auto_classes() -> None:
    """Register the configs, models and processor with transformers' Auto classes (once; later calls do nothing).

    Local use: ``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` resolve model_type "llava_rc",
    "llava_next_rc", "llava_onevision_rc", "qwen2_5_vl_rc" and "qwen3_vl_rc" without remote code. Hub use:
    ``save_pretrained`` writes ``auto_map`` and copies the model code next to the weights.
    """
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .configuration_llava_rc import LlavaNextRCConfig, LlavaOnevisionRCConfig, LlavaRCConfig
    from .modeling_llava_rc import LlavaNextRCForConditionalGeneration, LlavaOnevisionRCForConditionalGeneration
    from .modeling_llava_rc import LlavaRCForConditionalGeneration
    from .processing_llava_rc import LlavaRCProcessor
    from .configuration_qwen_vl_rc import Qwen2_5_VLRCConfig, Qwen3VLRCConfig
    from .modeling_qwen_vl_rc import Qwen2_5_VLRCForConditionalGeneration, Qwen3VLRCForConditionalGeneration

    for config_class, model_class in (
        (LlavaRCConfig, LlavaRCForConditionalGeneration),
        (LlavaNextRCConfig, LlavaNextRCForConditionalGeneration),
        (LlavaOnevisionRCConfig, LlavaOnevisionRCForConditionalGeneration),
        (Qwen2_5_VLRCConfig, Qwen2_5_VLRCForConditionalGeneration),
        (Qwen3VLRCConfig, Qwen3VLRCForConditionalGeneration),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModelForImageTextToText")
    # LLaVA-NeXT, OneVision and Qwen repos carry their stock processors.
    AutoProcessor.register(LlavaRCConfig, LlavaRCProcessor, exist_ok=True)
    LlavaRCProcessor.register_for_auto_class()
    _registered = True


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later uses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [*sorted(_EXPORTS), "register_auto_classes"]
