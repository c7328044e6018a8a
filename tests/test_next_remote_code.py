"""LLaVA-NeXT RC: save_pretrained writes a repo that loads through remote code in a fresh process (llava_rc blocked),
and ``llava-rc-upload`` turns a stock LLaVA-NeXT checkpoint into one."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

import llava_rc.hub_upload as hub_upload
from llava_rc.hub_upload import run_without_llava_rc
from tiny import PAD_TOKEN_ID
from tiny_next import make_next_batch, tiny_next_config_dict, tiny_next_model, tiny_next_processor

COMPRESSION = {"method": "gprune", "keep_ratio": 0.25}

LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reports = []
    for repo, reference_path in zip(sys.argv[1::2], sys.argv[2::2]):
        reference = torch.load(reference_path)
        model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=reference["pad_token_id"])
        out = model.generate(**reference["batch"], return_dict_in_generate=True, **settings)
        off = model.generate(**reference["batch"], compression={"method": "none"}, **settings)
        images = [Image.fromarray(np.full((20 + 20 * i, 56, 3), 60 * i, dtype=np.uint8)) for i in range(2)]
        inputs = processor(images=images, text=["USER: <image> what color ? ASSISTANT:"] * 2, return_tensors="pt",
                           padding=True)
        from_processor = model.generate(**inputs, **settings)
        reports.append({
            "model_type": model.config.model_type,
            "auto_map": model.config.auto_map,
            "model_class": type(model).__name__,
            "module": type(model).__module__,
            "compression": model.config.compression,
            "sequences_equal": torch.equal(out.sequences, reference["sequences"]),
            "off_equal": torch.equal(off, reference["off"]),
            "kept_counts": out["compression"].kept_counts.tolist(),
            "processor_new_tokens": from_processor.shape[1] - inputs["input_ids"].shape[1],
        })
    print(json.dumps(reports))
    """
)


def reference_for(model, path: Path) -> Path:
    """Greedy outputs on a fixed batch: with the model's compression and with it off (the stock model: its own)."""
    batch = make_next_batch([4, 7], [[(56, 56)], [(20, 56), (60, 30)]], seed=51)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    is_stock = isinstance(model, LlavaNextForConditionalGeneration) and not hasattr(model, "compress_inputs")
    with torch.no_grad():
        sequences = model.generate(**batch, **settings)
        off = sequences if is_stock else model.generate(**batch, compression={"method": "none"}, **settings)
    torch.save({"batch": batch, "sequences": sequences, "off": off, "pad_token_id": PAD_TOKEN_ID}, path)
    return path


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """A repo saved from the model class, and one converted by llava-rc-upload from a stock checkpoint."""
    root = tmp_path_factory.mktemp("next")
    saved = root / "saved"
    model = tiny_next_model(COMPRESSION)
    model.save_pretrained(saved)
    tiny_next_processor().save_pretrained(saved)
    base, converted = root / "base", root / "converted"
    torch.manual_seed(3)
    stock = LlavaNextForConditionalGeneration(LlavaNextConfig(**tiny_next_config_dict())).eval()
    stock.save_pretrained(base)
    tiny_next_processor().save_pretrained(base)
    # main() itself verifies the repo in a fresh process (compression off == the stock model's greedy output).
    argv = ["--base", str(base), "--method", "cls_attention", "--set", "budget=0.5", "--output-dir", str(converted)]
    assert hub_upload.main(argv) == 0
    converted_model = tiny_next_model({"method": "cls_attention", "budget": 0.5})
    converted_model.load_state_dict(stock.state_dict(), strict=True)
    return {
        "root": root,
        "saved": (saved, reference_for(model, root / "saved.pt")),
        "converted": (converted, reference_for(converted_model, root / "converted.pt")),
        "stock_off": reference_for(stock, root / "stock.pt"),
    }


@pytest.mark.slow
def test_next_repos_load_through_remote_code_in_a_fresh_process(repos):
    arguments = [str(item) for name in ("saved", "converted") for item in repos[name]]
    result = run_without_llava_rc(LOADER, arguments, repos["root"], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    saved, converted = json.loads(result.stdout.strip().splitlines()[-1])
    for report in (saved, converted):
        assert report["model_type"] == "llava_next_rc"
        assert report["model_class"] == "LlavaNextRCForConditionalGeneration"
        assert report["module"].startswith("transformers_modules")
        assert report["auto_map"] == {
            "AutoConfig": "configuration_llava_rc.LlavaNextRCConfig",
            "AutoModelForImageTextToText": "modeling_llava_rc.LlavaNextRCForConditionalGeneration",
        }
        assert report["sequences_equal"] and report["off_equal"]
        assert report["processor_new_tokens"] == 4
    assert saved["compression"]["keep_ratio"] == 0.25
    # base 16 + grid 64 -> 4 + 16 kept + 8 newlines; 16 + 16 -> 4 + 4 + 2; 16 + 32 -> 4 + 8 + 8
    assert saved["kept_counts"] == [28, 10, 20]
    assert converted["compression"] == {"method": "cls_attention", "budget": 0.5, "attention_layer": "producing",
                                       "budget_scope": "view", "cls_attention_layer": None}
    assert converted["kept_counts"] == [48, 18, 32]


@pytest.mark.slow
def test_converted_next_repo_keeps_the_stock_weights(repos):
    stock_off = torch.load(repos["stock_off"])
    converted = torch.load(repos["converted"][1])
    assert torch.equal(stock_off["sequences"], converted["off"])
    names = {path.name for path in repos["converted"][0].iterdir()}
    assert {"config.json", "model.safetensors", "configuration_llava_rc.py", "modeling_llava_rc.py",
            "compressed_generation.py", "processor_config.json", "README.md"} <= names


def test_upload_rejects_clip_for_next_bases(tmp_path, capsys):
    base = tmp_path / "base"
    LlavaNextConfig(**tiny_next_config_dict()).save_pretrained(base)
    with pytest.raises(SystemExit) as raised:
        hub_upload.main(["--base", str(base), "--clip", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert "LLaVA-1.5" in str(raised.value.code) and "llava_next" in str(raised.value.code)
