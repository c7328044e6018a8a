"""Inputs at the edges, refused clearly or handled like any other: images whose anyres grid has no row, caches filled
from a compressed prompt, settings that would loop for ever or that are not what they claim to be, masked image
tokens, an unusable --output-dir, and a method name given where settings are accepted."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaConfig, LlavaNextConfig

import tiny_onevision
from llava_rc import LlavaNextRCConfig, LlavaOnevisionRCConfig, LlavaRCConfig, anyres_token_counts, hub_upload
from llava_rc.compressed_generation import COMPRESSED_CACHE_FLAG, NEWLINE_SOURCE
from llava_rc.compression_common import resolve_budget
from llava_rc.compression_gprune import MAX_STEPS
from llava_rc.compression_registry import METHODS, parse_compression
from test_method_matrix import METHOD_ROWS
from tiny import IMAGE_TOKEN_ID, NUM_PATCHES, make_batch, stock_twin, tiny_config_dict, tiny_rc_model
from tiny_next import make_next_batch, next_stock_twin, tiny_next_config_dict, tiny_next_model
from tiny_onevision import make_onevision_batch, onevision_stock_twin, tiny_onevision_model

ROOT = Path(__file__).resolve().parents[1]
GREEDY = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
FAMILIES = {
    "llava": (tiny_rc_model, lambda seed: make_batch([5, 8], [1, 1], seed=seed), stock_twin),
    "next": (tiny_next_model, lambda seed: make_next_batch([5, 8], [[(56, 56)], [(20, 56)]], seed=seed),
             next_stock_twin),
    "onevision": (tiny_onevision_model, lambda seed: make_onevision_batch([5, 8], [[(56, 56)], [(20, 56)]], seed=seed),
                  onevision_stock_twin),
}


# ---- 2. an anyres image whose unpadded grid has no row ----------------------------------------------------------
# At the tiny geometry (28 px crops of 4 x 4 patches) a 1 x 56 image picks the 1 x 2 pinpoint and its unpadded grid
# keeps none of its 4 rows: the image is its base view alone (16 tokens, no grid, no newline), as a 10 x 2000 image
# is at LLaVA-1.6's (576 base tokens, 0 grid, 0 newlines).
NO_ROW_SIZE = (1, 56)
ADAPTIVE_ROWS = [{"method": "rc"}, {"method": "prumerge"}, {"method": "prumerge_plus"}]
NO_ROW_SETTINGS = [*METHOD_ROWS.values(), {"method": "gprune"}, *ADAPTIVE_ROWS]
NO_ROW_FAMILIES = {
    "next": (tiny_next_model, make_next_batch, next_stock_twin),
    "onevision": (tiny_onevision_model, make_onevision_batch, onevision_stock_twin),
}


def test_the_no_row_image_has_a_base_view_only_at_the_tiny_geometry():
    assert anyres_token_counts(LlavaNextConfig(**tiny_next_config_dict()), [NO_ROW_SIZE]).tolist() == [
        [NUM_PATCHES, 0, 0]
    ]
    assert tiny_onevision.token_counts([NO_ROW_SIZE]) == [NUM_PATCHES]


@pytest.mark.parametrize("family", sorted(NO_ROW_FAMILIES))
@pytest.mark.parametrize("settings", NO_ROW_SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_an_image_whose_grid_has_no_row_compresses_its_base_view(family, settings):
    make_model, make_rows, _ = NO_ROW_FAMILIES[family]
    model = make_model(settings)
    batch = make_rows([6, 9], [[NO_ROW_SIZE], [(56, 56)]], seed=7)  # beside an ordinary image (another layout)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    length = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :length], batch["input_ids"])
    assert out.sequences.shape[1] == length + GREEDY["max_new_tokens"]
    report = out.compression
    assert report.patch_counts[0] == NUM_PATCHES and report.newline_counts[0] == 0
    count = int(report.kept_counts[0])
    if "budget" in settings or settings["method"] == "gprune":
        assert count == resolve_budget(settings.get("budget", 0.5), NUM_PATCHES)
    else:  # adaptive: at least one token, at most every patch plus the extra token
        assert 1 <= count <= NUM_PATCHES + 1
    sources = report.source_index[0, :count]
    assert ((sources < NUM_PATCHES) & (sources != NEWLINE_SOURCE)).all()  # base-view patches (or a merged token)
    labels = batch["input_ids"].masked_fill((batch["input_ids"] == IMAGE_TOKEN_ID) | (batch["attention_mask"] == 0),
                                            -100)
    trained = model(**batch, labels=labels)
    assert torch.isfinite(trained.loss)
    assert trained.compression.kept_counts[0] == count  # forward(labels) plans the same


@pytest.mark.parametrize("family", sorted(NO_ROW_FAMILIES))
def test_an_image_whose_grid_has_no_row_is_stock_with_compression_off(family):
    make_model, make_rows, make_stock = NO_ROW_FAMILIES[family]
    model = make_model({"method": "none"})
    batch = make_rows([6, 9], [[NO_ROW_SIZE], [(56, 56)]], seed=8)
    assert torch.equal(model.generate(**batch, **GREEDY), make_stock(model).generate(**batch, **GREEDY))


# ---- 3. a cache filled from a compressed prompt ------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_cache_from_a_compressed_forward_is_refused_by_generate(family):
    make_model, make_rows, _ = FAMILIES[family]
    model = make_model({"method": "cls_attention", "budget": 5})
    batch = make_rows(3)
    out = model(**batch, use_cache=True)
    assert out.attention_mask.shape[1] < batch["input_ids"].shape[1]  # the cache holds the shorter prompt
    with pytest.raises(ValueError, match="filled from a compressed prompt"):
        model.generate(**batch, past_key_values=out.past_key_values, **GREEDY)
    text_only = {key: batch[key] for key in ("input_ids", "attention_mask")}
    stock_cache = model(**text_only, use_cache=True).past_key_values  # nothing compressed: a stock cache
    assert not getattr(stock_cache, COMPRESSED_CACHE_FLAG, False)


# ---- 4. settings that drive a loop are bounded -------------------------------------------------------------------
def test_gprune_steps_are_bounded_at_config_time():
    assert parse_compression({"method": "gprune", "steps": MAX_STEPS}).steps == MAX_STEPS
    for steps in (MAX_STEPS + 1, 10**12, 10**400):
        with pytest.raises(ValueError, match=rf"steps must be in \[1, {MAX_STEPS}\], got {steps}"):
            parse_compression({"method": "gprune", "steps": steps})
        with pytest.raises(ValueError, match="steps must be in"):
            LlavaRCConfig(**tiny_config_dict(compression={"method": "gprune", "steps": steps}))
        with pytest.raises(ValueError, match="steps must be in"):
            tiny_rc_model().generate(**make_batch([4], [1]), compression={"method": "gprune", "steps": steps})
    methods_doc = (ROOT / "docs" / "methods.md").read_text()
    assert f"| `steps` | int | `5` | [1, {MAX_STEPS}] |" in methods_doc


def integer_settings():
    """(method, setting) for every setting of every method that takes an int."""
    return [
        (name, field.name)
        for name, (config_class, _) in sorted(METHODS.items())
        for field in dataclasses.fields(config_class)
        if "int" in str(field.type)
    ]


@pytest.mark.parametrize(("method", "setting"), integer_settings())
def test_a_huge_int_setting_is_refused_or_clamped_never_a_long_loop(method, setting):
    """10**12 in any int setting is refused at config time (a bound) or the call finishes at once (clamped to
    the image's patches): none drives a loop or an allocation of that size."""
    try:
        settings = parse_compression({"method": method, setting: 10**12}).to_dict()
    except ValueError as error:
        assert setting in str(error)
        return
    model = tiny_rc_model()
    try:
        out = model(**make_batch([4], [1], seed=2), compression=settings)
    except ValueError as error:  # refused by the model (a vision layer index out of its range)
        assert setting in str(error)
        return
    assert 1 <= int(out.compression.kept_counts[0]) <= NUM_PATCHES + 1


# ---- 5. an unusable --output-dir is refused before any weights load ----------------------------------------------
@pytest.fixture
def config_only_base(tmp_path):
    base = tmp_path / "base"
    LlavaConfig(**tiny_config_dict()).save_pretrained(base)
    return base


def output_dir_cases(tmp_path) -> dict:
    (tmp_path / "a_file").write_text("not a folder")
    return {
        "under_a_file": (tmp_path / "a_file" / "out", "is a file"),
        "deeper_under_a_file": (tmp_path / "a_file" / "x" / "out", "is a file"),
        "name_too_long": (tmp_path / ("x" * 300) / "out", "cannot be created"),
    }


@pytest.mark.parametrize("case", ["under_a_file", "deeper_under_a_file", "name_too_long"])
def test_an_unusable_output_dir_is_refused_before_any_weights_load(config_only_base, tmp_path, monkeypatch, capsys,
                                                                    case):
    def loads_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before --output-dir was checked")

    monkeypatch.setattr(hub_upload, "convert", loads_weights)
    monkeypatch.setattr(hub_upload, "load_and_convert", loads_weights)
    output, expected = output_dir_cases(tmp_path)[case]
    with pytest.raises(SystemExit) as raised:
        hub_upload.main(["--base", str(config_only_base), "--output-dir", str(output)])
    assert raised.value.code != 0
    message = capsys.readouterr().err
    assert "--output-dir" in message and expected in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file", "base"]  # nothing made, nothing left


def test_the_upload_command_ends_without_a_traceback_on_an_unusable_output_dir(config_only_base, tmp_path):
    output, _ = output_dir_cases(tmp_path)["under_a_file"]
    result = subprocess.run(
        [sys.executable, "-m", "llava_rc.hub_upload", "--base", str(config_only_base), "--output-dir", str(output)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "is a file" in result.stderr


def test_a_makeable_output_dir_passes_the_check_and_leaves_nothing_behind(tmp_path):
    destination = tmp_path / "new" / "deeper" / "out"
    assert hub_upload.output_dir_problem(destination, force=False) is None
    assert list(tmp_path.iterdir()) == []


# ---- 6. one validation rule on every path ------------------------------------------------------------------------
INVALID = [{"budget": -1}, {"bogus": 1}, {"method": "none", "budget": 3}, {"method": "bogus"}, "bogus",
           {"method": "rc", "budget": 0}]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("configured", [{"method": "none"}, {"method": "rc"}], ids=["none", "rc"])
@pytest.mark.parametrize("images", [True, False], ids=["images", "text_only"])
def test_invalid_settings_are_refused_by_forward_and_generate_alike(family, configured, images):
    make_model, make_rows, _ = FAMILIES[family]
    model = make_model(configured)
    batch = make_rows(4)
    if not images:
        batch = {key: batch[key] for key in ("input_ids", "attention_mask")}
    for compression in INVALID:
        with pytest.raises(ValueError):
            model.generate(**batch, compression=compression, max_new_tokens=2)
        with pytest.raises(ValueError):
            model(**batch, compression=compression)


# ---- 7. a list or dict where a choice is expected ----------------------------------------------------------------
def choice_settings():
    """(method, setting, default) for every setting whose value is one of a few names (its default is a str)."""
    return [
        (name, field.name, field.default)
        for name, (config_class, _) in sorted(METHODS.items())
        for field in dataclasses.fields(config_class)
        if isinstance(field.default, str)
    ]


def test_every_method_with_choices_is_covered():
    assert {name for name, _, _ in choice_settings()} >= {"rc", "trsm", "prumerge", "prumerge_plus", "cls_attention"}


@pytest.mark.parametrize("bad", [["x"], {"x": 1}, [], ("x",)], ids=["list", "dict", "empty_list", "tuple"])
@pytest.mark.parametrize(("method", "setting", "default"), choice_settings())
def test_a_choice_given_a_container_names_the_setting_and_the_choices(method, setting, default, bad):
    with pytest.raises(ValueError, match=rf"{setting}.* must be one of \[.*'{default}'.*\], got") as raised:
        parse_compression({"method": method, setting: bad})
    assert repr(bad) in str(raised.value)
    with pytest.raises(ValueError, match=setting):
        LlavaRCConfig(**tiny_config_dict(compression={"method": method, setting: bad}))


def test_a_choice_given_a_container_is_refused_by_generate_and_forward():
    model = tiny_rc_model({"method": "rc"})
    batch = make_batch([4], [1])
    with pytest.raises(ValueError, match=r"guidance .*must be one of \['clip', 'llm'\], got \['llm'\]"):
        model.generate(**batch, compression={"guidance": ["llm"]}, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"guidance .*must be one of"):
        model(**batch, compression={"guidance": ["llm"]})
    with pytest.raises(ValueError, match=r"importance_score must be one of"):
        LlavaRCConfig(**tiny_config_dict(importance_score=["cls_attention"]))


# ---- 8. a masked image placeholder -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_masked_image_placeholder_is_refused_with_compression_on(family):
    make_model, make_rows, make_stock = FAMILIES[family]
    model = make_model({"method": "cls_attention", "budget": 5})
    batch = make_rows(5)
    image_positions = (batch["input_ids"][1] == IMAGE_TOKEN_ID).nonzero().flatten()
    batch["attention_mask"][1, image_positions[:3]] = 0
    with pytest.raises(ValueError, match=r"attention_mask is 0 on 3 image placeholder position"):
        model.generate(**batch, **GREEDY)
    with pytest.raises(ValueError, match=r"attention_mask is 0 on 3 image placeholder position"):
        model(**batch)
    # Compression off stays the stock call, whatever the mask.
    off = model.generate(**batch, compression="none", **GREEDY)
    assert torch.equal(off, make_stock(model).generate(**batch, **GREEDY))


# ---- 9. a method name where settings are accepted ----------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_method_name_means_that_method_everywhere(family):
    make_model, make_rows, make_stock = FAMILIES[family]
    model = make_model({"method": "rc"})
    batch = make_rows(6)
    # "none": off for the call, the stock model.
    assert torch.equal(model.generate(**batch, compression="none", **GREEDY),
                       make_stock(model).generate(**batch, **GREEDY))
    assert torch.equal(model(**batch, compression="none").logits, make_stock(model)(**batch).logits)
    # Another method: exactly {"method": name}.
    by_name = model.generate(**batch, compression="cls_attention", return_dict_in_generate=True, **GREEDY)
    by_dict = model.generate(**batch, compression={"method": "cls_attention"}, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(by_name.sequences, by_dict.sequences)
    assert by_name.compression.method == parse_compression({"method": "cls_attention"}).to_dict()
    forward_by_name = model(**batch, compression="cls_attention")
    assert torch.equal(forward_by_name.logits, model(**batch, compression={"method": "cls_attention"}).logits)
    with pytest.raises(ValueError, match=r"unknown compression method 'tome'; expected one of"):
        model.generate(**batch, compression="tome", **GREEDY)


@pytest.mark.parametrize("config_class", [LlavaRCConfig, LlavaNextRCConfig, LlavaOnevisionRCConfig])
def test_a_config_takes_a_method_name(config_class):
    config = config_class(compression="gprune")
    assert config.compression == parse_compression({"method": "gprune"}).to_dict()
    assert parse_compression("none") == parse_compression({"method": "none"})
