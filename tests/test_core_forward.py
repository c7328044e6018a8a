"""forward(labels=...) with compression: the loss, gradients and Trainer behave as for a stock fine-tune."""

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from tiny import IMAGE_TOKEN_ID, make_batch, tiny_rc_model, unpad_row

COMPRESSION = {"method": "cls_attention", "budget": 5}


def labels_for(batch: dict) -> torch.Tensor:
    """Train on every real text token; image placeholders and padding ignored (as LLaVA collators do)."""
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (batch["input_ids"] == IMAGE_TOKEN_ID)] = -100
    return labels


@pytest.mark.parametrize("pad_left", [True, False])
def test_loss_equals_per_sample_unpadded_reference(pad_left):
    model = tiny_rc_model(COMPRESSION)
    images_per_row = [1, 2, 0]
    batch = make_batch([7, 3, 10], images_per_row, seed=11, pad_left=pad_left)
    batch["labels"] = labels_for(batch)
    with torch.no_grad():
        batched = model(**batch)
        total_loss, total_tokens, first = 0.0, 0, 0
        for row, num_images in enumerate(images_per_row):
            single = unpad_row(batch, row, first, num_images)
            single["labels"] = labels_for(single)
            alone = model(**single)
            tokens = int((single["labels"][:, 1:] != -100).sum())  # the loss predicts each label but the first
            total_loss += float(alone.loss) * tokens
            total_tokens += tokens
            first += num_images
    torch.testing.assert_close(batched.loss, torch.tensor(total_loss / total_tokens), rtol=1e-5, atol=1e-6)
    # The rebuilt labels come back at the compressed length, aligned with the logits.
    assert batched.labels.shape == batched.logits.shape[:2] == batched.attention_mask.shape
    assert batched.labels.shape[1] < batch["input_ids"].shape[1]
    assert (batched.labels[batched.attention_mask == 0] == -100).all()


def test_labels_move_with_their_text_tokens():
    model = tiny_rc_model(COMPRESSION)
    batch = make_batch([6, 4], [1, 1], seed=12, pad_left=False)
    batch["labels"] = labels_for(batch)
    with torch.no_grad():
        out = model(**batch)
    for row in range(2):
        text = batch["labels"][row][batch["labels"][row] != -100]
        # Every text label but the row's first (which nothing precedes) survives, in order.
        assert torch.equal(out.labels[row][out.labels[row] != -100], text[1:])


def test_gradients_reach_projector_and_vision_tower_with_checkpointing():
    model = tiny_rc_model(COMPRESSION).train()
    model.gradient_checkpointing_enable()
    batch = make_batch([5, 8], [1, 1], seed=13)
    batch["labels"] = labels_for(batch)
    model(**batch).loss.backward()
    projector_grad = model.model.multi_modal_projector.linear_1.weight.grad
    assert projector_grad is not None and projector_grad.abs().sum() > 0
    vision_grad = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad
    assert vision_grad is not None and vision_grad.abs().sum() > 0


class TinyDataset(Dataset):
    def __init__(self, seed: int):
        self.batch = make_batch([5, 8, 6, 7], [1, 1, 1, 1], seed=seed)
        self.batch["labels"] = labels_for(self.batch)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.batch.items()}


def test_trainer_runs_a_step_unchanged(tmp_path):
    model = tiny_rc_model(COMPRESSION).train()
    before = model.model.multi_modal_projector.linear_2.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    result = Trainer(model=model, args=args, train_dataset=TinyDataset(seed=14)).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.model.multi_modal_projector.linear_2.weight)
