"""Qwen2.5-VL-RC and Qwen3-VL-RC: a saved repo, and one converted from a stock checkpoint by ``llava-rc-upload``'s
conversion, load through remote code in a fresh process where llava_rc cannot be imported, and generate as before.

The Qwen processors need torchvision (their video processors), which this environment lacks, so the fresh-process
checks feed tensors, as for OneVision.
"""

import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from llava_rc.hub_upload import check_base_config, family, load_and_convert, run_without_llava_rc
from tiny_qwen import FAMILIES, GRIDS, PAD_TOKEN_ID, make_qwen_batch, qwen_stock_twin

# Compression on Qwen needs generate's mm_encoder_outputs (transformers >= 5.23); CI also runs the oldest, 5.17.
pytestmark = pytest.mark.skipif(
    "mm_encoder_outputs" not in inspect.signature(transformers.Qwen2_5_VLForConditionalGeneration.forward).parameters,
    reason="Qwen-VL compression needs transformers >= 5.23",
)

COMPRESSION = {"method": "cls_attention", "budget": 0.25}
CLASS_NAMES = {
    "qwen2_5_vl": ("Qwen2_5_VLRCConfig", "Qwen2_5_VLRCForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLRCConfig", "Qwen3VLRCForConditionalGeneration"),
}

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
    batch = make_qwen_batch([4, 7], [[GRIDS[1]], [GRIDS[2], GRIDS[0]]], seed=51)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    with torch.no_grad():
        sequences = model.generate(**batch, **settings)
        off = stock.generate(**batch, **settings)
    torch.save({"batch": batch, "sequences": sequences, "off": off, "pad_token_id": PAD_TOKEN_ID}, path)
    return path


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    arguments, expected = [], []
    for name in sorted(FAMILIES):
        build = FAMILIES[name][0]
        model = build(COMPRESSION)
        saved = root / f"{name}_saved"
        model.save_pretrained(saved)
        arguments += [saved, reference_for(model, qwen_stock_twin(model), root / f"{name}_saved.pt")]
        base, converted = root / f"{name}_base", root / f"{name}_converted"
        qwen_stock_twin(build(seed=3)).save_pretrained(base)
        config = check_base_config(str(base))
        assert config.model_type == name and family(name)[2].__name__ == CLASS_NAMES[name][1]
        stock, converted_model = load_and_convert(str(base), torch.float32, {"method": "gprune"}, None, name)
        converted_model.save_pretrained(converted)
        arguments += [converted, reference_for(converted_model, stock, root / f"{name}_converted.pt")]
        expected += [(name, "cls_attention"), (name, "gprune")]
    return root, [str(item) for item in arguments], expected


def test_qwen_repos_load_through_remote_code_in_a_fresh_process(repos):
    root, arguments, expected = repos
    result = run_without_llava_rc(LOADER, arguments, root, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(reports) == len(expected)
    for report, (name, method) in zip(reports, expected):
        config_name, model_name = CLASS_NAMES[name]
        assert report["model_type"] == f"{name}_rc"
        assert report["model_class"] == model_name
        assert report["module"].startswith("transformers_modules")
        assert report["auto_map"] == {
            "AutoConfig": f"configuration_qwen_vl_rc.{config_name}",
            "AutoModelForImageTextToText": f"modeling_qwen_vl_rc.{model_name}",
        }
        assert report["compression"]["method"] == method
        assert report["sequences_equal"] and report["off_equal"]
        if method == "cls_attention":  # 24, 10 and 4 tokens at 25%
            assert report["kept_counts"] == [6, 2, 1]
    names = {path.name for path in (root / "qwen3_vl_converted").iterdir()}
    assert {"config.json", "model.safetensors", "configuration_qwen_vl_rc.py", "modeling_qwen_vl_rc.py",
            "configuration_llava_rc.py", "compressed_generation.py", "planning.py", "vision_importance.py"} <= names
