"""Datasets: samples, the MVTec-AD and HiAD jsonl readers, the ELPV demo and synthetic defects."""

from hiad_train.data.jsonl import read_jsonl
from hiad_train.data.mvtec import read_mvtec
from hiad_train.data.samples import HRSample

__all__ = ["HRSample", "read_jsonl", "read_mvtec"]
