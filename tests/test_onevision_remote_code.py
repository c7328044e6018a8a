"""LLaVA-OneVision RC: a saved repo (and one converted from a stock checkpoint by ``llava-rc-upload``'s conversion)
loads through remote code in a fresh process where llava_rc cannot be imported, and generates as before.

The OneVision processor needs torchvision (its video processor), which this environment lacks, so the fresh-process
checks feed tensors; the full ``llava-rc-upload`` run (which verifies through the processor) is tested where
torchvision is installed.
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.utils import is_torchvision_available

import llava_rc.hub_upload as hub_upload
from llava_rc.hub_upload import check_base_config, family, load_and_convert, run_without_llava_rc
from tiny import PAD_TOKEN_ID
from tiny_onevision import make_onevision_batch, tiny_onevision_config_dict, tiny_onevision_model

COMPRESSION = {"method": "cls_attention", "budget": 0.25}

LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForImageTextToText

    reports = []
    for repo, reference_path in zip(sys.argv[1::2], sys.argv[2::2]):
        reference = torch.load(reference_path)
        model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=reference["pad_token_id"])
        out = model.generate(**reference["batch"], return_dict_in_generate=True, **settings)
        off = model.generate(**reference["batch"], compression={"method": "none"}, **settings)
        reports.append({
            "model_type": model.config.model_type,
            "auto_map": model.config.auto_map,
            "model_class": type(model).__name__,
            "module": type(model).__module__,
            "compression": model.config.compression,
            "sequences_equal": torch.equal(out.sequences, reference["sequences"]),
            "off_equal": torch.equal(off, reference["off"]),
            "kept_counts": out["compression"].kept_counts.tolist(),
        })
    print(json.dumps(reports))
    """
)


def reference_for(model, stock, path: Path) -> Path:
    """Greedy outputs on a fixed batch (a downsampled image, a two-image row): compression on, and the stock model's."""
    batch = make_onevision_batch([4, 7], [[(112, 112)], [(20, 56), (60, 30)]], seed=51)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    with torch.no_grad():
        sequences = model.generate(**batch, **settings)
        off = stock.generate(**batch, **settings)
    torch.save({"batch": batch, "sequences": sequences, "off": off, "pad_token_id": PAD_TOKEN_ID}, path)
    return path


def stock_of(model) -> LlavaOnevisionForConditionalGeneration:
    stock = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**tiny_onevision_config_dict())).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    return stock


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """A repo saved from the model class, and one converted from a stock checkpoint by the upload tool's code."""
    root = tmp_path_factory.mktemp("onevision")
    saved = root / "saved"
    model = tiny_onevision_model(COMPRESSION)
    model.save_pretrained(saved)
    base, converted = root / "base", root / "converted"
    stock = stock_of(tiny_onevision_model(seed=3))
    stock.save_pretrained(base)
    config = check_base_config(str(base))
    assert family(config.model_type)[2].__name__ == "LlavaOnevisionRCForConditionalGeneration"
    loaded_stock, converted_model = load_and_convert(str(base), torch.float32, {"method": "gprune"}, None,
                                                     config.model_type)
    converted_model.save_pretrained(converted)
    return {
        "root": root,
        "saved": (saved, reference_for(model, stock_of(model), root / "saved.pt")),
        "converted": (converted, reference_for(converted_model, loaded_stock, root / "converted.pt")),
    }


@pytest.mark.slow  # as the LLaVA and LLaVA-NeXT fresh-process tests: two conversions and a fresh interpreter
def test_onevision_repos_load_through_remote_code_in_a_fresh_process(repos):
    arguments = [str(item) for name in ("saved", "converted") for item in repos[name]]
    result = run_without_llava_rc(LOADER, arguments, repos["root"], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    saved, converted = json.loads(result.stdout.strip().splitlines()[-1])
    for report in (saved, converted):
        assert report["model_type"] == "llava_onevision_rc"
        assert report["model_class"] == "LlavaOnevisionRCForConditionalGeneration"
        assert report["module"].startswith("transformers_modules")
        assert report["auto_map"] == {
            "AutoConfig": "configuration_llava_rc.LlavaOnevisionRCConfig",
            "AutoModelForImageTextToText": "modeling_llava_rc.LlavaOnevisionRCForConditionalGeneration",
        }
        assert report["sequences_equal"] and report["off_equal"]
    # base 16 + downsampled grid 144 -> 4 + 36 kept + 12 newlines; base views 16 -> 4 kept + 1 newline each
    assert saved["kept_counts"] == [52, 5, 5]
    assert converted["compression"]["method"] == "gprune"
    names = {path.name for path in repos["converted"][0].iterdir()}
    assert {"config.json", "model.safetensors", "configuration_llava_rc.py", "modeling_llava_rc.py",
            "compressed_generation.py", "vision_importance.py"} <= names


@pytest.mark.skipif(not is_torchvision_available(), reason="the OneVision processor needs torchvision")
def test_upload_converts_a_onevision_base_end_to_end(tmp_path):
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    from tiny import CHAT_TEMPLATE, IMAGE_SIZE, tiny_tokenizer
    from tiny_onevision import GRID_PINPOINTS, NUM_PATCHES

    base = tmp_path / "base"
    stock_of(tiny_onevision_model(seed=3)).save_pretrained(base)
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                        image_grid_pinpoints=GRID_PINPOINTS),
        tokenizer=tiny_tokenizer(),
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=NUM_PATCHES,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(base)
    argv = ["--base", str(base), "--method", "cls_attention", "--set", "budget=0.5", "--output-dir",
            str(tmp_path / "out")]
    assert hub_upload.main(argv) == 0  # verifies the written repo in a fresh process
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llava_onevision_rc"
