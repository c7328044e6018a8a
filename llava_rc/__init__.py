"""llava-rc: training-free visual-token compression for LLaVA, LLaVA-NeXT and LLaVA-OneVision, loadable from the Hub."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .compression_common import CompressionInputs, MethodConfig, TokenPlan
from .compression_registry import METHODS, parse_compression
from .configuration_llava_rc import LlavaNextRCConfig, LlavaOnevisionRCConfig, LlavaRCConfig
from .modeling_llava_rc import CompressionReport, LlavaNextRCForConditionalGeneration, LlavaRCCausalLMOutputWithPast
from .modeling_llava_rc import LlavaOnevisionRCForConditionalGeneration, LlavaRCForConditionalGeneration
from .modeling_llava_rc import anyres_token_counts
from .processing_llava_rc import LlavaRCProcessor

__version__ = "0.1.0"

# Which code serves a repo: with llava_rc imported, the installed package's config, model AND processor classes
# serve every llava_rc / llava_next_rc repo, its remote-code files included (transformers prefers classes registered
# here over a repo's auto_map), so the three always come from one version. Without the import, the repo's own files
# serve all three (pin them with revision=).
for config_class, model_class in (
    (LlavaRCConfig, LlavaRCForConditionalGeneration),
    (LlavaNextRCConfig, LlavaNextRCForConditionalGeneration),
    (LlavaOnevisionRCConfig, LlavaOnevisionRCForConditionalGeneration),
):
    # Local use: the Auto classes resolve model_type "llava_rc" / "llava_next_rc" / "llava_onevision_rc" without
    # remote code.
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
    # Hub use: save_pretrained writes auto_map and copies the model code next to the weights.
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForImageTextToText")
AutoProcessor.register(LlavaRCConfig, LlavaRCProcessor, exist_ok=True)  # LLaVA-NeXT repos use the stock processor
LlavaRCProcessor.register_for_auto_class()

__all__ = [
    "METHODS",
    "CompressionInputs",
    "CompressionReport",
    "LlavaNextRCConfig",
    "LlavaNextRCForConditionalGeneration",
    "LlavaOnevisionRCConfig",
    "LlavaOnevisionRCForConditionalGeneration",
    "LlavaRCCausalLMOutputWithPast",
    "LlavaRCConfig",
    "LlavaRCForConditionalGeneration",
    "LlavaRCProcessor",
    "MethodConfig",
    "TokenPlan",
    "anyres_token_counts",
    "parse_compression",
]
