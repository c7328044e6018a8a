"""Nothing in the compressed path forces eager attention, and device_map / bf16 loading generate with compression."""

import pytest
import torch
from tiny import PAD_TOKEN_ID, make_batch, tiny_rc_model
from transformers import LlavaForConditionalGeneration
from transformers.modeling_utils import AttentionInterface
from transformers.models.clip import modeling_clip
from transformers.models.llama import modeling_llama

from llava_rc import LlavaRCForConditionalGeneration

RC = {"method": "rc", "budget": 5}
GREEDY = {"max_new_tokens": 4, "do_sample": False}


def forbid_eager_and_count_sdpa(monkeypatch) -> dict:
    """Eager attention raises; SDPA calls are counted per attention module class."""

    def eager(module, *args, **kwargs):
        raise AssertionError(f"eager attention used in {type(module).__name__}")

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager)
    monkeypatch.setattr(modeling_clip, "eager_attention_forward", eager)
    sdpa = AttentionInterface._global_mapping["sdpa"]
    calls = {}

    def counting_sdpa(module, *args, **kwargs):
        calls[type(module).__name__] = calls.get(type(module).__name__, 0) + 1
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", counting_sdpa)
    return calls


@pytest.mark.parametrize("compression", [RC, {"method": "rc"}, {"method": "prumerge_plus"}, {"method": "trsm"}])
def test_compressed_generate_and_forward_stay_on_sdpa(monkeypatch, compression):
    model = tiny_rc_model()
    model.set_attn_implementation("sdpa")
    calls = forbid_eager_and_count_sdpa(monkeypatch)
    batch = make_batch([5, 9], [1, 1])
    out = model.generate(**batch, compression=compression, **GREEDY)
    assert out.shape[1] == batch["input_ids"].shape[1] + GREEDY["max_new_tokens"]
    model(**batch, labels=batch["input_ids"], compression=compression)
    # Both towers ran their attention through SDPA (vision once per forward pass, the LM at every step).
    assert calls.get("CLIPAttention", 0) > 0 and calls.get("LlamaAttention", 0) > 0
    for config in (model.config.text_config, model.config.vision_config):
        assert config._attn_implementation == "sdpa"


def test_the_eager_guard_would_catch_eager_attention(monkeypatch):
    model = tiny_rc_model()
    model.set_attn_implementation("eager")
    forbid_eager_and_count_sdpa(monkeypatch)
    with pytest.raises(AssertionError, match="eager attention used"):
        model.generate(**make_batch([5], [1]), compression=RC, **GREEDY)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_rc")
    tiny_rc_model(compression=RC).save_pretrained(directory)
    return directory


def load(directory, **kwargs) -> LlavaRCForConditionalGeneration:
    model = LlavaRCForConditionalGeneration.from_pretrained(directory, **kwargs).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def compressed_generate(model):
    batch = make_batch([5, 9], [1, 1], seed=3)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)  # the config's compression: RC, 5 tokens
    assert out.compression.kept_counts.tolist() == [5, 5]
    return out.sequences


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loads_generate_like_a_plain_load(saved_model, dtype, device_map):
    kwargs = {} if dtype is None else {"dtype": dtype}
    plain = load(saved_model, **kwargs)
    mapped = load(saved_model, device_map=device_map, **kwargs)
    expected_dtype = dtype or torch.float32
    assert {parameter.dtype for parameter in mapped.parameters()} == {expected_dtype}
    assert {parameter.device.type for parameter in mapped.parameters()} == {"cpu"}
    assert torch.equal(compressed_generate(mapped), compressed_generate(plain))


def test_bfloat16_load_holds_the_cast_weights_and_is_stock_with_compression_off(saved_model):
    """from_pretrained(dtype=bfloat16) holds exactly the bf16 cast of every float32 weight, compresses as
    configured, and with compression off generates exactly as stock LLaVA loaded the same way.

    Every comparison is between two computations that are the same on any CPU. (A float32 model cast with
    ``.to(torch.bfloat16)`` is not one: it also casts the rotary ``inv_freq`` buffers, which from_pretrained keeps
    in float32, so on CPUs with native bf16 kernels its tokens may differ from the bf16 load.)"""
    float32 = load(saved_model).state_dict()
    loaded = load(saved_model, dtype=torch.bfloat16)
    for name, parameter in loaded.named_parameters():
        assert parameter.dtype == torch.bfloat16, name
        assert torch.equal(parameter, float32[name].to(torch.bfloat16)), name
    compressed_generate(loaded)  # the configured RC keeps 5 tokens per image and the caller's prompt comes back
    stock = LlavaForConditionalGeneration.from_pretrained(saved_model, dtype=torch.bfloat16).eval()
    stock.generation_config.pad_token_id = PAD_TOKEN_ID
    batch = make_batch([5, 9], [1, 1], seed=3)
    off = loaded.generate(**batch, compression={"method": "none"}, **GREEDY)
    assert torch.equal(off, stock.generate(**batch, **GREEDY))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_device_map_auto_generates_with_compression(saved_model, dtype):
    reference = load(saved_model)
    model = load(saved_model, device_map="auto", dtype=dtype)
    assert {parameter.device.type for parameter in model.parameters()} == {"cuda"}
    batch = make_batch([5, 9], [1, 1], seed=3)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    assert out.sequences.device.type == "cuda" and out.compression.kept_counts.tolist() == [5, 5]
    assert torch.equal(out.sequences[:, : batch["input_ids"].shape[1]].cpu(), batch["input_ids"])
    # The compressed forward agrees with the float32 CPU reference: exactly in what it keeps and closely in its
    # logits in float32; in half precision near-ties may change what RC keeps, so only finiteness is required.
    cuda_batch = {key: value.to("cuda") for key, value in batch.items()}
    output = model(**cuda_batch)
    expected = reference(**batch)
    logits = output.logits.float().cpu()
    assert logits.shape == expected.logits.shape and torch.isfinite(logits).all()
    if dtype == torch.float32:
        assert torch.equal(output.compression.source_index.cpu(), expected.compression.source_index)
        assert torch.allclose(logits, expected.logits, atol=1e-3 * expected.logits.abs().max(), rtol=0)
