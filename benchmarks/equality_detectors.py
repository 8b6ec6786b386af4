"""Bit-for-bit equality of every registered detector's training, before and after a change that must
change no output (a seeding or training-loop refactor is the risk).

For each detector, a tiny real training (ELPV demo at 256 px, 128 px tiles, two neighbourhood tasks,
the validation set that selects the epoch, a thumbnail branch) is saved as a checkpoint; every
checkpoint tensor and checkpoint.json (training records, selected epochs, normalization, thresholds)
are recorded. PatchCore is also exported with an IVF index (a seeded faiss training), and its manifest
(file sha256s included) recorded without `created`.

    python benchmarks/equality_detectors.py record  REF [--detectors rdpp,destseg]
    python benchmarks/equality_detectors.py compare REF [--detectors rdpp,destseg]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from equality import array_differences

TINY_VIT = {"backbone_name": "vit_tiny_patch16_224", "allow_random_backbone": True}
PATCH = {  # detector -> its tiny `patch:` section (as tests/test_contract.py)
    "patchcore": {"target_embed_dimension": 64, "percentage": 0.1},
    "rdpp": {"layers_to_extract_from": [2, 3], "total_epochs": 2, "batch_size": 4},
    "destseg": {"total_epochs": 3, "de_st_epochs": 1, "batch_size": 4},
    "fastflow": {"flow_step": 2, "hidden_ratio": 0.5, "num_epochs": 2, "batch_size": 4},
    "padim": {"embed_dimension": 32},
    "dinomaly": {
        **TINY_VIT,
        "layers_to_extract_from": [0, 1, 2, 3],
        "fuse_layer_encoder": [[0, 1], [2, 3]],
        "decoder_depth": 2,
        "fuse_layer_decoder": [[0], [1]],
        "total_epochs": 2,
        "batch_size": 4,
    },
    "inpformer": {
        **TINY_VIT,
        "layers_to_extract_from": [0, 1, 2, 3],
        "fuse_layer_encoder": [[0, 1], [2, 3]],
        "decoder_depth": 2,
        "fuse_layer_decoder": [[0], [1]],
        "num_prototypes": 3,
        "total_epochs": 2,
        "batch_size": 4,
    },
    "vitad": {**TINY_VIT, "layers_to_extract_from": [0, 1, 2], "neck_layers": [3], "total_epochs": 2, "batch_size": 4},
    "realnet": {
        "max_epoch": 2,
        "batch_size": 4,
        "init_bsn": 1,
        "num_res_blocks": 1,
        "channel_mult": [1],
        "attention_mult": [],
    },
}


def _config(name: str):
    from hiad_train.config import parse_config

    return parse_config(
        {
            "seed": 3,
            "image_size": 256,
            "patch_size": 128,
            "batch_size": 4,
            "detector": name,
            "tasks": {"generator": "neighborhood", "num_groups_width": 2, "num_groups_height": 1},
            "patch": PATCH[name],
            "thumbnail": {**PATCH[name], "thumbnail_size": 128},
            "val_config": {"anomaly_syn_fn": {"name": "random_box", "p": 0.5}, "val_sample_ratio": 0.25},
            "evaluation": {"resize": 128, "overlays": False},
        },
        f"equality:{name}",
    )


def _outputs(name: str, samples, work: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from hiad_train.checkpoint import save_checkpoint
    from hiad_train.trainer import HRTrainer

    model = HRTrainer(_config(name), progress=False).fit(samples)
    ckpt = save_checkpoint(model, work / name / "checkpoint").resolve()
    arrays = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            arrays[f"{name}/{f.relative_to(ckpt)}/{k}"] = v
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    arrays[f"{name}/checkpoint.json"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    if name == "patchcore":  # a seeded IVF index: the native artifact writer's output
        from hiad_export.writer import ExportOptions, write_bundle
        from hiad_train.checkpoint import load_checkpoint

        images = [s.image((256, 256)) for s in samples[:1]]
        opts = ExportOptions(native={"index": "IVF4,Flat", "search_params": "nprobe=2"})
        manifest = write_bundle(load_checkpoint(ckpt), work / name / "bundle", images, opts).to_dict()
        manifest.pop("created")
        arrays[f"{name}/manifest.json"] = np.frombuffer(json.dumps(manifest, sort_keys=True).encode(), np.uint8)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["record", "compare"])
    parser.add_argument("ref", type=Path)
    parser.add_argument("--detectors", default=",".join(PATCH), help="comma-separated registry names")
    args = parser.parse_args()
    from hiad_train.data import read_mvtec
    from hiad_train.data.elpv import build_elpv_demo

    names = args.detectors.split(",")
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = build_elpv_demo(Path(tmp) / "data", rows=2, cols=2, cell_size=128, n_train=4, n_test=4, seed=0)
        samples = read_mvtec(root, "train")
        for name in names:
            arrays |= _outputs(name, samples, Path(tmp))
            print(f"{name}: trained", flush=True)
    if args.mode == "record":
        args.ref.mkdir(parents=True, exist_ok=True)
        for name in names:
            np.savez(args.ref / f"{name}.npz", **{k: v for k, v in arrays.items() if k.startswith(f"{name}/")})
        print(f"recorded {len(arrays)} arrays of {len(names)} detectors into {args.ref}")
        return
    before = {k: v for name in names for k, v in np.load(args.ref / f"{name}.npz").items()}
    differ = array_differences(before, arrays)
    print(
        f"{len(arrays)} arrays of {len(names)} detectors compared: "
        + ("all identical" if not differ else f"{len(differ)} differ")
    )
    for line in differ:
        print("  " + line)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
