"""fft.data: sources, formats, packing and checkpointable pipelines that end as Batches.

The synthetic world lives in `fft.data.synthetic` (imported on its own; it is not loaded here).
"""

from fft.data.batch import REQUIRED_FIELDS, Batch, BatchError, pad_batch, stack_rows, validate_batch
from fft.data.formats import FORMATS, encode_prompt, encode_record
from fft.data.packing import Packer, pack, pad_examples
from fft.data.pipeline import DataIterator, make_encoder, make_eval_batches, make_train_iterator
from fft.data.sources import (
    ArrayRecordSource,
    BadRecordError,
    JsonlSource,
    ShardStream,
    open_source,
    tfds_source,
)

__all__ = [
    "REQUIRED_FIELDS",
    "FORMATS",
    "ArrayRecordSource",
    "BadRecordError",
    "Batch",
    "BatchError",
    "DataIterator",
    "JsonlSource",
    "Packer",
    "ShardStream",
    "encode_prompt",
    "encode_record",
    "make_encoder",
    "make_eval_batches",
    "make_train_iterator",
    "open_source",
    "pack",
    "pad_batch",
    "pad_examples",
    "stack_rows",
    "tfds_source",
    "validate_batch",
]
