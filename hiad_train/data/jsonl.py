"""HiAD's jsonl meta files: one JSON object per line with filename, mask, clsname, label, label_name."""

from __future__ import annotations

import json
from pathlib import Path

from hiad_train.data.samples import HRSample


def read_jsonl(meta_file: str | Path, data_root: str | Path) -> list[HRSample]:
    """Samples listed in `meta_file`; paths inside are relative to `data_root`."""
    meta_file, data_root = Path(meta_file), Path(data_root)
    samples = []
    for n, line in enumerate(meta_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            label = int(rec.get("label", 0))
            mask = data_root / rec["mask"] if rec.get("mask") else None
            samples.append(
                HRSample(
                    data_root / rec["filename"],
                    label,
                    mask,
                    rec.get("clsname", ""),
                    rec.get("label_name", "good" if label == 0 else "anomaly"),
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_file}:{n}: bad record ({e})") from e
    return samples
