"""Data: built-in tensor-backed sets, the IDX reader, and the resumable batch order."""

from etappe.data.idx import read_idx, write_idx
from etappe.data.sampler import EpochBatchSampler, ResumableBatches
from etappe.data.sets import Dataset, DataSpec, TensorData, load_dataset

__all__ = [
    "Dataset",
    "DataSpec",
    "EpochBatchSampler",
    "ResumableBatches",
    "TensorData",
    "load_dataset",
    "read_idx",
    "write_idx",
]
