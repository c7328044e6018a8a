"""Every registered method on anyres images (LLaVA-NeXT): the rows of ``test_method_matrix.METHOD_ROWS`` x
{generate, forward(labels)} on a padded batch of images of different sizes, fp32 and bf16."""

import pytest
import torch

from llava_rc import anyres_token_counts
from llava_rc.compression_registry import METHODS
from test_method_matrix import METHOD_ROWS
from test_next_core import kept_without_newlines
from tiny import IMAGE_TOKEN_ID
from tiny_next import make_next_batch, tiny_next_model, unpad_next_row

ROWS = [settings for name, settings in METHOD_ROWS.items() if name in METHODS]
PROMPTS, IMAGES = [6, 11, 3], [[(56, 56)], [(20, 56), (60, 30)], []]
GREEDY = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


def expected_counts(model, settings: dict, image_sizes) -> list[int]:
    newlines = anyres_token_counts(model.config, image_sizes)[:, 2].tolist()
    return [kept + rows for kept, rows in zip(kept_without_newlines(settings, image_sizes), newlines)]


def labels_for(batch: dict) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (batch["input_ids"] == IMAGE_TOKEN_ID)] = -100
    return labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("settings", ROWS, ids=[row["method"] for row in ROWS])
def test_generate_on_anyres(settings, dtype):
    model = tiny_next_model(settings).to(dtype)
    batch = make_next_batch(PROMPTS, IMAGES, seed=41)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    length = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :length], batch["input_ids"])
    assert out.sequences.shape[1] == length + GREEDY["max_new_tokens"]
    assert out.compression.kept_counts.tolist() == expected_counts(model, settings, batch["image_sizes"])
    if dtype == torch.float32:
        first = 0
        for row, sizes in enumerate(IMAGES):
            single = unpad_next_row(batch, row, first, len(sizes))
            alone = model.generate(**single, **GREEDY)
            assert torch.equal(out.sequences[row, length:], alone[0, single["input_ids"].shape[1] :])
            first += len(sizes)


@pytest.mark.parametrize("settings", ROWS, ids=[row["method"] for row in ROWS])
def test_forward_with_labels_on_anyres(settings):
    model = tiny_next_model(settings)
    batch = make_next_batch(PROMPTS, IMAGES, seed=42)
    batch["labels"] = labels_for(batch)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    all_tokens = anyres_token_counts(model.config, batch["image_sizes"]).sum(-1)
    removed = all_tokens - torch.tensor(expected_counts(model, settings, batch["image_sizes"]))
    removed_per_row = torch.stack([removed[:1].sum(), removed[1:].sum(), removed.new_zeros(())])
    assert out.attention_mask.sum(1).tolist() == (batch["attention_mask"].sum(1) - removed_per_row).tolist()
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    total, tokens, first = 0.0, 0, 0
    with torch.no_grad():
        for row, sizes in enumerate(IMAGES):
            single = unpad_next_row(batch, row, first, len(sizes))
            single["labels"] = labels_for(single)
            count = int((single["labels"][:, 1:] != -100).sum())
            total += float(model(**single).loss) * count
            tokens += count
            first += len(sizes)
    torch.testing.assert_close(out.loss.detach(), torch.tensor(total / tokens), rtol=1e-5, atol=1e-6)
