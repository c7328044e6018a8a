"""The rebuild learns its width on the host when the kept counts are fixed: no device read in ``pack_sequences``.

On CPU a "sync" is a read of a tensor's value into Python (``item``, ``tolist``, ``int``, ``bool``, ``float``,
``__index__``); the tests count those reads by the file that makes them. The GPU test uses CUDA's sync debug mode.
"""

import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from llava_rc import planning
from llava_rc.sequence_packing import pack_sequences, packed_width
from test_method_matrix import METHOD_ROWS
from tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_batch, tiny_rc_model
from tiny_next import make_next_batch, tiny_next_model

READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")
FIXED = [
    METHOD_ROWS["rc"],
    METHOD_ROWS["cls_attention"],
    METHOD_ROWS["prumerge"],
    {"method": "gprune"},  # keep_ratio: fixed without a budget
    {"method": "gprune", "budget": 9},
]
NEXT_ROWS = ([6, 11, 3], [[(56, 56)], [(20, 56), (60, 30)], []])


@pytest.fixture
def value_reads(monkeypatch) -> Counter:
    """Counts reads of tensor values into Python, by the file name of the calling frame."""
    reads = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[Path(sys._getframe(1).f_code.co_filename).name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def compress(model, batch: dict, settings: dict):
    return model.compress_inputs(
        batch["input_ids"],
        batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        settings=model.compression_settings(settings),
        pad_left=True,
        image_sizes=batch.get("image_sizes"),
    )


def next_case():
    return tiny_next_model({"method": "none"}), make_next_batch(*NEXT_ROWS, seed=5)


def llava_case():
    return tiny_rc_model({"method": "none"}), make_batch([6, 11, 3], [1, 2, 0], seed=5)


@pytest.mark.parametrize("case", [llava_case, next_case], ids=["llava", "next"])
def test_a_fixed_budget_rebuild_reads_no_device_value(case, value_reads):
    model, batch = case()
    with torch.no_grad():
        for settings in FIXED:
            compress(model, batch, settings)
        assert value_reads["sequence_packing.py"] == 0
        # The counter sees the sync when it is needed: the adaptive count is only known on the device.
        compress(model, batch, {"method": "rc"})
    assert value_reads["sequence_packing.py"] == 1


@pytest.mark.parametrize("case", [llava_case, next_case], ids=["llava", "next"])
@pytest.mark.parametrize("settings", FIXED, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_the_host_width_gives_the_same_batch_as_the_device_width(case, settings, monkeypatch):
    model, batch = case()
    with torch.no_grad():
        host = compress(model, batch, settings)
        monkeypatch.setattr(planning, "packed_width", lambda *args: None)
        device = compress(model, batch, settings)
    for name in ("input_ids", "attention_mask", "position_ids", "image_slot", "source_position"):
        assert torch.equal(getattr(host.packed, name), getattr(device.packed, name)), name
    assert torch.equal(host.inputs_embeds, device.inputs_embeds)
    # The settings' fixed count is what the method kept (newlines on top).
    sizes = batch.get("image_sizes")
    layouts = model._image_token_layouts(model._image_crops(batch["pixel_values"], sizes)[1], sizes)
    method = model.compression_settings(settings)
    expected = [method.fixed_count(layout.views) + int((layout.token_index < 0).sum()) for layout in layouts]
    assert host.report.kept_counts.tolist() == expected


def test_packed_width_matches_pack_sequences_on_random_batches():
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        batch_size = int(torch.randint(1, 5, (1,), generator=generator))
        rows, runs, kept = [], [], []
        for _ in range(batch_size):
            parts = [torch.randint(4, 20, (int(torch.randint(0, 4, (1,), generator=generator)),), generator=generator)]
            for _ in range(int(torch.randint(0, 3, (1,), generator=generator))):
                run = int(torch.randint(1, 9, (1,), generator=generator))
                runs.append(run)
                kept.append(int(torch.randint(1, run + 1, (1,), generator=generator)))
                parts += [torch.full((run,), IMAGE_TOKEN_ID), torch.randint(4, 20, (1,), generator=generator)]
            rows.append(torch.cat(parts))
        width = max(len(row) for row in rows) + int(torch.randint(0, 3, (1,), generator=generator))
        input_ids = torch.full((batch_size, width), PAD_TOKEN_ID)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        for index, row in enumerate(rows):
            span = slice(width - len(row), width) if trial % 2 else slice(0, len(row))
            input_ids[index, span], mask[index, span] = row, 1
        is_image = input_ids == IMAGE_TOKEN_ID
        host = packed_width(
            is_image.sum(1).tolist(), (mask.bool() & ~is_image).sum(1).tolist(), runs, kept
        )
        packed = pack_sequences(
            input_ids, mask, None, IMAGE_TOKEN_ID, torch.tensor(runs, dtype=torch.long), torch.tensor(kept),
            slots_per_image=9, pad_token_id=PAD_TOKEN_ID, pad_left=bool(trial % 2),
        )
        assert host == packed.input_ids.shape[1]
    # A row boundary inside an image's run: the host cannot tell, the device decides.
    assert packed_width([3, 2], [1, 1], [5], [2]) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cuda_sync_in_the_rebuild_with_a_fixed_budget():
    model = tiny_next_model({"method": "none"}).cuda()
    batch = {key: value.cuda() for key, value in make_next_batch(*NEXT_ROWS, seed=5).items()}
    with torch.no_grad():
        compress(model, batch, METHOD_ROWS["rc"])  # warm-up (allocator, pinned memory)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                compress(model, batch, METHOD_ROWS["rc"])
            finally:
                torch.cuda.set_sync_debug_mode(0)
    files = Counter(Path(w.filename).name for w in caught if "synchroniz" in str(w.message).lower())
    assert files["sequence_packing.py"] == 0, files
