"""The tiny Qwen2.5-VL-RC recipe's pieces on tiny sizes, and the shipped Qwen checkpoint loaded the way users load it."""

import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText

import llava_rc
from llava_rc import easyvqa, train_qwen_easyvqa
from llava_rc.hub_upload import run_without_llava_rc
from llava_rc.train_easyvqa import packed_batch, remote_code_files
from llava_rc.train_qwen_easyvqa import (
    GRID,
    NUM_PATCHES,
    NUM_TOKENS,
    PROMPT,
    QUESTION_TEMPLATE,
    REMOTE_CODE_ENTRIES,
    build_processor,
    load_processor,
    model_config,
    new_model,
    processor_order,
    rope_positions,
    save_processor,
    tower_inputs,
    tower_patches,
    train_language_model,
)

pytestmark = pytest.mark.skipif(
    "mm_encoder_outputs" not in inspect.signature(transformers.Qwen2_5_VLForConditionalGeneration.forward).parameters,
    reason="Qwen-VL compression needs transformers >= 5.23",
)

PACKAGE = Path(llava_rc.__file__).parent
CHECKPOINT = PACKAGE / "checkpoints" / "qwen2_5-vl-rc-easyvqa"
WORDS = ["what", "color", "is", "the", "shape", "red", "blue", "circle", "yes", "no", "in", "top", "left"]


@pytest.fixture(scope="module")
def processor():
    return build_processor(WORDS)


@pytest.fixture(scope="module")
def tiny_model(processor):
    config = model_config(processor.tokenizer, vision_width=32, hidden_size=32)
    torch.manual_seed(0)
    tower = llava_rc.Qwen2_5_VLRCForConditionalGeneration(config).model.visual
    state = {name: value for name, value in tower.state_dict().items() if not name.startswith("merger.")}
    return new_model(config, state, seed=0)


# ---- processor and tower order ---------------------------------------------------------------------------------
def test_processor_expands_the_image_to_36_tokens_and_saves_as_the_stock_processor(processor, tmp_path):
    image = Image.new("RGB", (128, 128), (200, 10, 10))
    inputs = processor(images=[image], text=[PROMPT.format(question="what color is the shape?")], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_id).sum()) == NUM_TOKENS
    assert inputs["image_grid_thw"].tolist() == [[1, GRID, GRID]]
    assert int(inputs["mm_token_type_ids"].sum()) == NUM_TOKENS
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert "<unk>" not in tokens and tokens[:3] == ["<|im_start|>", "user", "<|vision_start|>"]
    save_processor(processor, tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text()) == {"processor_class": "Qwen2_5_VLProcessor"}
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"].startswith("Qwen2VL")
    again = load_processor(tmp_path)(images=[image], text=[PROMPT.format(question="what color is the shape?")], return_tensors="pt")
    assert all(torch.equal(inputs[name], again[name]) for name in inputs)


def test_processor_order_matches_the_stock_image_processor(processor):
    # Each 14 px patch painted with its raster index: the processor's patch sequence must read processor_order().
    pixels = torch.arange(NUM_PATCHES).view(GRID, GRID).repeat_interleave(14, 0).repeat_interleave(14, 1)
    image = Image.fromarray(torch.stack([pixels, pixels, pixels], -1).to(torch.uint8).numpy())
    processor.image_processor.do_normalize = False
    try:
        values = processor.image_processor([image], return_tensors="pt")["pixel_values"]  # (144, 1176)
    finally:
        processor.image_processor.do_normalize = True
    read = (values.mean(dim=-1) * 255).round().long()  # (144,) the painted index of each patch in order
    assert torch.equal(read, processor_order())


def test_tower_patches_undo_the_window_permutation(tiny_model):
    tower = tiny_model.model.visual
    frames = torch.randn(2, NUM_PATCHES, 3 * 14 * 14).half()
    with torch.no_grad():
        values, grids = tower_inputs(frames)
        stock = tower(values, grids).pooler_output  # (2 * 36, D) raster order of merge units
        ours = tower.merger(tower_patches(tower, frames).flatten(0, 1))
    torch.testing.assert_close(ours, stock)


# ---- stage 2 ---------------------------------------------------------------------------------------------------
def test_rope_positions_match_the_stock_positions_and_keep_the_columns_of_kept_tokens(processor, tiny_model):
    tokenizer = processor.tokenizer
    prefix = tokenizer("<|im_start|>user\n<|vision_start|>", add_special_tokens=False)["input_ids"]
    question = tokenizer(QUESTION_TEMPLATE.format(question="what color is the shape?"), add_special_tokens=False)["input_ids"]
    answer = tokenizer(" red", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    block = (question + answer, len(question), 1.0)
    image_id = tiny_model.config.image_token_id
    all_units = torch.arange(NUM_TOKENS)
    kept_units = torch.tensor([0, 7, 20, 35])
    ids, _, text_positions, _, _ = packed_batch(
        prefix, [NUM_TOKENS, len(kept_units)], [[block, block], [block]], tokenizer.pad_token_id, image_id
    )
    positions = rope_positions(text_positions, [all_units, kept_units], len(prefix))  # (3, 2, T)
    single = ids[:1, : len(prefix) + NUM_TOKENS + len(block[0])]  # the first row's prompt with one block
    mm_types = (single == image_id).long()
    stock, _ = tiny_model.model.get_rope_index(single, mm_types, torch.tensor([[1, GRID, GRID]]), torch.ones_like(single))
    width = single.shape[1]
    assert torch.equal(positions[:, :1, :width], stock)
    # The second block restarts where the first started, in all three rows.
    assert torch.equal(positions[:, 0, width:width + len(block[0])], stock[:, 0, -len(block[0]):])
    # Kept tokens keep their (t, h, w) column; the text after them starts where it does with every token.
    image_start = len(prefix)
    assert torch.equal(positions[:, 1, image_start:image_start + 4], stock[:, 0, image_start + kept_units])
    assert torch.equal(positions[:, 1, image_start + 4:image_start + 4 + len(block[0])], stock[:, 0, -len(block[0]):])


def test_stage2_trains_merger_and_language_model_only_and_stops_where_its_check_says(processor, tiny_model, monkeypatch):
    trainable = {name for name, parameter in tiny_model.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith(("model.visual.merger.", "model.language_model.", "lm_head.")) for name in trainable)
    assert any(name.startswith("model.visual.merger.") for name in trainable)
    scenes = easyvqa.mosaic_scenes("test", 2, seed=0)
    features = torch.randn(len(scenes), NUM_PATCHES, 32).half()
    blocks_seen = []

    def recording_packed_batch(prefix, counts, blocks_per_image, *args):
        blocks_seen.append([len(blocks) for blocks in blocks_per_image])
        return packed_batch(prefix, counts, blocks_per_image, *args)

    monkeypatch.setattr(train_qwen_easyvqa, "packed_batch", recording_packed_batch)
    before = tiny_model.model.visual.merger.mlp[0].weight.detach().clone()
    frozen = tiny_model.model.visual.blocks[0].attn.qkv.weight.detach().clone()
    calls = []

    def check() -> bool:
        calls.append(tiny_model.training)
        return False

    finished = train_language_model(
        tiny_model, processor.tokenizer, features, scenes, 3, 2, 0, torch.autocast("cpu", enabled=False),
        check=(2, check), max_blocks=3,
    )
    assert finished is False and calls == [False] and len(blocks_seen) == 2
    assert all(count <= 3 for counts in blocks_seen for count in counts)
    assert not torch.equal(before, tiny_model.model.visual.merger.mlp[0].weight)
    assert torch.equal(frozen, tiny_model.model.visual.blocks[0].attn.qkv.weight)


# ---- the shipped model -----------------------------------------------------------------------------------------
def test_shipped_checkpoint_carries_the_package_code_and_attribution():
    code_files = sorted(path.name for path in CHECKPOINT.glob("*.py"))
    refresh = f"python -m llava_rc.train_qwen_easyvqa --refresh-code --output-dir {CHECKPOINT}"
    missing = sorted(set(remote_code_files(PACKAGE, REMOTE_CODE_ENTRIES)) - set(code_files))
    assert not missing, f"the checkpoint lacks {missing}, which its code imports: {refresh}"
    for name in code_files:
        assert (CHECKPOINT / name).read_text() == (PACKAGE / name).read_text(), f"{name} is stale: {refresh}"
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl_rc" and "AutoModelForImageTextToText" in config["auto_map"]
    assert json.loads((CHECKPOINT / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    assert (CHECKPOINT / "model.safetensors").stat().st_size <= 10 * 2**20
    assert "Victor Zhou" in (CHECKPOINT / "LICENSE-easy-vqa").read_text()


@pytest.fixture(scope="module")
def shipped():
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, trust_remote_code=True).eval()
    return model, load_processor(CHECKPOINT)


def test_shipped_model_answers_and_generates_compressed(shipped):
    model, processor = shipped
    scene = easyvqa.single_scenes("test")[1]
    example = next(e for e in scene.examples if e.kind == "color")
    inputs = processor(images=[scene.image()], text=[PROMPT.format(question=example.question)], return_tensors="pt")
    settings = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cases = (({"method": "none"}, None, True), ({"method": "rc", "budget": 0.25}, 9, True),
             ({"method": "cls_attention", "budget": 0.1}, 3, False))
    for compression, kept, must_answer in cases:
        out = model.generate(**inputs, compression=compression, **settings)
        new = processor.tokenizer.convert_ids_to_tokens(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
        assert new[0] == example.answer or not must_answer, (compression, new)
        assert new[0] in easyvqa.COLORS, (compression, new)
        assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        if kept is not None:
            assert out.compression.kept_counts.tolist() == [kept]


FRESH_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForImageTextToText
    checkpoint, inputs_path = sys.argv[1:3]
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    inputs = torch.load(inputs_path)
    out = model.generate(**inputs, compression={"method": "rc", "budget": 0.25}, max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True)
    print(json.dumps({"module": type(model).__module__, "answer": out.sequences[0, inputs["input_ids"].shape[1]].item(),
                      "kept": out.compression.kept_counts.tolist()}))
    """
)


@pytest.mark.slow
def test_shipped_model_runs_from_its_own_code_in_a_fresh_process(tmp_path, shipped):
    _, processor = shipped
    scene = easyvqa.mosaic_scenes("test", 3, seed=0)[2]
    example = next(e for e in scene.examples if e.kind == "color_at_position")
    inputs = processor(images=[scene.image()], text=[PROMPT.format(question=example.question)], return_tensors="pt")
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    result = run_without_llava_rc(FRESH_LOADER, [str(CHECKPOINT), str(tmp_path / "inputs.pt")], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.") and report["kept"] == [9]
    assert processor.tokenizer.convert_ids_to_tokens(report["answer"]) in easyvqa.COLORS


# ---- the command line's stage-1 cache ----------------------------------------------------------------------------
def test_stage1_only_needs_a_cache_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_qwen_easyvqa.main(["--output-dir", str(tmp_path / "out"), "--stage1-only"])
    assert "--stage1-only needs --stage1-cache" in capsys.readouterr().err


def test_a_stage1_cache_of_other_settings_is_refused_before_any_work(tmp_path, monkeypatch):
    cache = tmp_path / "stage1.pt"
    made_with = {"seed": 0, "train_mosaics": 6000, "vit_steps": 400, "vit_batch_size": 32, "autocast": "none"}
    torch.save({"settings": made_with, "threads": 1}, cache)

    def no_work(*args, **kwargs):
        raise AssertionError("the data was loaded before the cache was checked")

    monkeypatch.setattr(easyvqa, "single_scenes", no_work)
    for stage1_only in ([], ["--stage1-only"]):
        with pytest.raises(ValueError, match=r"holds stage 1 of .*'vit_steps': 400.*asks for .*'vit_steps': 800"):
            train_qwen_easyvqa.main(["--output-dir", str(tmp_path / "out"), "--stage1-cache", str(cache), *stage1_only])
    # The settings it was made with: --stage1-only has nothing left to do.
    train_qwen_easyvqa.main(
        ["--output-dir", str(tmp_path / "out"), "--stage1-cache", str(cache), "--vit-steps", "400", "--stage1-only"]
    )
    assert not (tmp_path / "out").exists()
