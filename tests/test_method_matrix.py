"""Every registered method through the real model: {batch 1, batch 3 with padding} x {fp32, bf16} x
{generate, forward(labels)}. Adding a method to the registry adds a row here (``METHOD_ROWS``)."""

import pytest
import torch

from llava_rc.compression_common import resolve_budget
from llava_rc.compression_registry import METHODS
from tiny import IMAGE_TOKEN_ID, NUM_PATCHES, make_batch, tiny_rc_model, unpad_row

# One row per method: its settings with a fixed budget, so the kept count is known in advance.
METHOD_ROWS = {
    "random": {"method": "random", "budget": 4},
    "cls_attention": {"method": "cls_attention", "budget": 5},
    "prumerge": {"method": "prumerge", "budget": 6},
    "prumerge_plus": {"method": "prumerge_plus", "budget": 0.5},
    "gprune": {"method": "gprune", "budget": 7},
    "trsm": {"method": "trsm", "budget": 0.25, "guidance": "llm"},  # text plumbing, no CLIP tower
    "rc": {"method": "rc", "budget": 6, "guidance": "llm"},
}
ROWS = [settings for name, settings in METHOD_ROWS.items() if name in METHODS]
BATCHES = {"batch1": ([6], [1]), "batch3_padded": ([6, 11, 3], [1, 2, 0])}
GREEDY = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def test_every_registered_method_has_a_row():
    assert set(METHODS) - {"none"} <= set(METHOD_ROWS)


def labels_for(batch: dict) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (batch["input_ids"] == IMAGE_TOKEN_ID)] = -100
    return labels


def expected_count(settings: dict) -> int:
    return resolve_budget(settings["budget"], NUM_PATCHES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(BATCHES), ids=list(BATCHES))
@pytest.mark.parametrize("settings", ROWS, ids=[row["method"] for row in ROWS])
def test_generate(settings, shape, dtype):
    model = tiny_rc_model(settings).to(dtype)
    prompt_lengths, images_per_row = BATCHES[shape]
    batch = make_batch(prompt_lengths, images_per_row, seed=31)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    length = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :length], batch["input_ids"])
    assert out.sequences.shape[1] == length + GREEDY["max_new_tokens"]
    assert out.compression.kept_counts.tolist() == [expected_count(settings)] * sum(images_per_row)
    if dtype == torch.float32:
        first = 0
        for row, num_images in enumerate(images_per_row):
            single = unpad_row(batch, row, first, num_images)
            alone = model.generate(**single, **GREEDY)
            assert torch.equal(out.sequences[row, length:], alone[0, single["input_ids"].shape[1] :])
            first += num_images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(BATCHES), ids=list(BATCHES))
@pytest.mark.parametrize("settings", ROWS, ids=[row["method"] for row in ROWS])
def test_forward_with_labels(settings, shape, dtype):
    model = tiny_rc_model(settings).to(dtype)
    prompt_lengths, images_per_row = BATCHES[shape]
    batch = make_batch(prompt_lengths, images_per_row, seed=32)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    batch["labels"] = labels_for(batch)
    out = model(**batch)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    removed = (NUM_PATCHES - expected_count(settings)) * torch.tensor(images_per_row)
    assert out.attention_mask.sum(1).tolist() == (batch["attention_mask"].sum(1) - removed).tolist()
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    if dtype == torch.float32:
        total, tokens, first = 0.0, 0, 0
        with torch.no_grad():
            for row, num_images in enumerate(images_per_row):
                single = unpad_row(batch, row, first, num_images)
                single["labels"] = labels_for(single)
                count = int((single["labels"][:, 1:] != -100).sum())
                total += float(model(**single).loss) * count
                tokens += count
                first += num_images
        torch.testing.assert_close(out.loss.detach(), torch.tensor(total / tokens), rtol=1e-5, atol=1e-6)
