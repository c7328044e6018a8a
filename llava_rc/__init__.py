"""llava-rc: training-free visual-token compression for LLaVA models, loadable from the Hub with one line."""

from transformers import AutoConfig, AutoModelForImageTextToText

from .compression_common import CompressionInputs, MethodConfig, TokenPlan
from .compression_registry import METHODS, parse_compression
from .configuration_llava_rc import LlavaRCConfig
from .modeling_llava_rc import CompressionReport, LlavaRCCausalLMOutputWithPast, LlavaRCForConditionalGeneration
from .processing_llava_rc import LlavaRCProcessor

__version__ = "0.1.0"

# Local use: the Auto classes resolve model_type "llava_rc" without remote code.
AutoConfig.register(LlavaRCConfig.model_type, LlavaRCConfig, exist_ok=True)
AutoModelForImageTextToText.register(LlavaRCConfig, LlavaRCForConditionalGeneration, exist_ok=True)
# Hub use: save_pretrained writes auto_map and copies the model code next to the weights.
LlavaRCConfig.register_for_auto_class()
LlavaRCForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
LlavaRCProcessor.register_for_auto_class()

__all__ = [
    "METHODS",
    "CompressionInputs",
    "CompressionReport",
    "LlavaRCCausalLMOutputWithPast",
    "LlavaRCConfig",
    "LlavaRCForConditionalGeneration",
    "LlavaRCProcessor",
    "MethodConfig",
    "TokenPlan",
    "parse_compression",
]
