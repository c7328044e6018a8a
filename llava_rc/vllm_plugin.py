"""vLLM entry point (``vllm.general_plugins``): registers the llava-rc architectures with vLLM's model registry.

vLLM calls ``register()`` in every process it starts (API server, engine core, workers), before it resolves a
model's architecture, so it stays cheap: the model classes are named as strings and imported by vLLM on first use.
The serving code itself is ``llava_rc.vllm_model`` (docs/serving.md).
"""

ARCHITECTURES = {
    "LlavaRCForConditionalGeneration": "llava_rc.vllm_model:LlavaRCForVllm",
    "LlavaNextRCForConditionalGeneration": "llava_rc.vllm_model:LlavaNextRCForVllm",
    "LlavaOnevisionRCForConditionalGeneration": "llava_rc.vllm_model:LlavaOnevisionRCForVllm",
}


def register() -> None:
    """Register the architectures (a repo's ``config.architectures`` names one of them) and the package's
    config/processor classes with transformers, so the installed package serves every llava-rc repo."""
    from vllm import ModelRegistry

    import llava_rc

    llava_rc.register_auto_classes()
    supported = set(ModelRegistry.get_supported_archs())
    for architecture, target in ARCHITECTURES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, target)
