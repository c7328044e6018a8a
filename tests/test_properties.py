"""Property-based tests (hypothesis): drawn methods, budgets and batch layouts never give a silent wrong result.

For every draw: no exception but a documented ValueError; each image keeps between 1 and its patch count tokens
(newlines aside); generate's output starts with the caller's ids; and each row of a batch is compressed and
scored exactly as it is alone.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("hypothesis")  # the test extra; a bench-only machine skips this module instead of failing
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llava_rc.compression_registry import METHODS  # noqa: E402
from tiny import NUM_PATCHES, make_batch, tiny_rc_model, unpad_row
from tiny_next import make_next_batch, tiny_next_model, unpad_next_row

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
SMALL_NEIGHBOURHOODS = {"lof_neighbors_visual": 3, "lof_neighbors_text": 3, "lof_neighbors_merge": 3}


@st.composite
def compression_settings(draw):
    method = draw(st.sampled_from(sorted(METHODS)))
    fields = {field.name for field in dataclasses.fields(METHODS[method][0])}
    settings_ = {"method": method}
    if "budget" in fields:
        budget = draw(st.one_of(st.none(), st.integers(1, NUM_PATCHES + 4), st.floats(0.02, 1.0)))
        if budget is not None or method == "rc":
            settings_["budget"] = budget
    if method == "rc":
        settings_.update({name: value for name, value in SMALL_NEIGHBOURHOODS.items() if name in fields})
    return settings_


@st.composite
def batch_layouts(draw):
    rows = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(3, 8), min_size=rows, max_size=rows))
    images = draw(st.lists(st.integers(0, 2), min_size=rows, max_size=rows))
    if sum(images) == 0:
        images[0] = 1
    return lengths, images, draw(st.booleans()), draw(st.integers(0, 2**16))


MODELS = {}


def model_for(family: str, settings_: dict):
    """Models are built once per family; the drawn settings are passed per call (the per-call rule)."""
    if family not in MODELS:
        MODELS[family] = tiny_rc_model({"method": "none"}) if family == "llava" else tiny_next_model({"method": "none"})
    return MODELS[family]


def check_batch_against_rows(model, batch, images_per_row, settings_, unpad, extra_keys=()):
    try:
        out = model(**batch, compression=settings_)
    except ValueError as error:  # documented refusals only
        pytest.fail(f"unexpected ValueError for {settings_}: {error}")
    report = getattr(out, "compression", None)  # the stock output (no report) when nothing is compressed
    if settings_["method"] != "none":
        newlines = report.newline_counts if report.newline_counts is not None else torch.zeros_like(report.kept_counts)
        patches = report.patch_counts
        kept = report.kept_counts - newlines
        assert (kept >= 1).all() and (kept <= patches).all(), (settings_, kept.tolist(), patches.tolist())
    mask = out.attention_mask if getattr(out, "attention_mask", None) is not None else batch["attention_mask"]
    first_image = 0
    for row, count in enumerate(images_per_row):
        alone_batch = unpad(batch, row, first_image, count)
        alone_batch = {key: value for key, value in alone_batch.items() if value is not None}
        alone = model(**alone_batch, compression=settings_)
        if settings_["method"] != "none" and count:
            own = report.kept_counts[first_image : first_image + count]
            assert torch.equal(alone.compression.kept_counts, own)
        last = mask[row].nonzero().max()  # the row's last real token, on whichever side it is padded
        torch.testing.assert_close(out.logits[row, last], alone.logits[0, -1], rtol=1e-4, atol=1e-4)
        first_image += count
    generated = model.generate(**batch, compression=settings_, max_new_tokens=2, do_sample=False)
    assert torch.equal(generated[:, : batch["input_ids"].shape[1]], batch["input_ids"])


@PROPERTY_SETTINGS
@given(settings_=compression_settings(), layout=batch_layouts())
def test_llava_draws(settings_, layout):
    lengths, images, pad_left, seed = layout
    model = model_for("llava", settings_)
    batch = make_batch(lengths, images, seed=seed, pad_left=pad_left)
    check_batch_against_rows(model, batch, images, settings_, unpad_row)


NEXT_SIZES = [(56, 56), (20, 56), (60, 30), (40, 60), (28, 28)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    settings_=compression_settings(),
    sizes=st.lists(st.lists(st.sampled_from(NEXT_SIZES), min_size=0, max_size=2), min_size=1, max_size=2),
    pad_left=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_next_draws(settings_, sizes, pad_left, seed):
    if not any(sizes):
        sizes[0] = [NEXT_SIZES[0]]
    model = model_for("next", settings_)
    batch = make_next_batch([4] * len(sizes), sizes, seed=seed, pad_left=pad_left)
    check_batch_against_rows(model, batch, [len(row) for row in sizes], settings_, unpad_next_row)
