"""Packing and the Batch contract."""

import time

import numpy as np
import pytest

from fft.data.batch import BatchError, next_token_targets, pad_batch, stack_rows, validate_batch
from fft.data.formats import encode_record
from fft.data.packing import pack, pad_examples


def _ex(tokens, mask):
    return {"tokens": tokens, "loss_mask": mask}


def test_pack_segments_positions_masks():
    examples = [
        _ex([1, 2, 3], [0, 1, 1]),
        _ex([4, 5], [1, 1]),
        _ex([6, 7, 8, 9], [0, 0, 1, 1]),
        _ex([10], [0]),
    ]
    rows = pack(examples, 6)
    validate_batch(rows)
    np.testing.assert_array_equal(rows["tokens"], [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    # The first token of every segment is never a target, even if the example said so.
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]])


def test_pack_exact_fit_and_overlong():
    rows = pack([_ex([1, 2, 3, 4], [0, 1, 1, 1]), _ex(list(range(10)), [1] * 10)], 4)
    assert rows["tokens"].shape == (2, 4)
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1]])


def test_pad_mode():
    rows = pad_examples([_ex([5, 6, 7], [0, 1, 1]), _ex([8], [0])], 4, pad_id=9)
    np.testing.assert_array_equal(rows["tokens"], [[5, 6, 7, 9], [8, 9, 9, 9]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 0], [1, 0, 0, 0]])


def test_validate_batch_errors():
    batch = pack([_ex([1, 2, 3], [0, 1, 1])], 4)
    validate_batch(batch)
    with pytest.raises(BatchError, match="'positions'"):
        validate_batch({k: v for k, v in batch.items() if k != "positions"})
    with pytest.raises(BatchError, match="dtype"):
        validate_batch(batch | {"loss_mask": batch["loss_mask"].astype(np.int32)})
    with pytest.raises(BatchError, match="shape"):
        validate_batch(batch | {"tokens": batch["tokens"][:, :2]})
    with pytest.raises(BatchError, match="missing"):
        validate_batch(batch | {"chosen_tokens": batch["tokens"]})
    padded = pad_batch(batch, 3)
    validate_batch(padded)
    assert padded["tokens"].shape == (3, 4) and not padded["segment_ids"][1:].any()
    _, targets, weights = next_token_targets(batch)
    np.testing.assert_array_equal(targets, [[2, 3, 0]])
    np.testing.assert_array_equal(weights, [[1, 1, 0]])
    assert stack_rows([{"a": np.zeros(2)}] * 3)["a"].shape == (3, 2)


def test_tokenize_and_pack_throughput(tokenizer):
    """The loader must outpace training: tens of thousands of tokens/s on one core."""
    texts = [{"text": "the cat sat on a mat and the dog ran home " * 3}] * 2000
    start = time.perf_counter()
    examples = [encode_record(r, "text", tokenizer, max_len=256) for r in texts]
    rows = pack(examples, 256)
    seconds = time.perf_counter() - start
    tokens = int((rows["segment_ids"] > 0).sum())
    assert tokens / seconds > 50_000, f"{tokens / seconds:.0f} tokens/s"
