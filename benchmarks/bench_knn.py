"""Approximate k-NN at the floor (issue #22): for an IVF-Flat bundle, each search against the exact one.

Per setting (exact search; faiss's own IVF scan and the grouped scan of hiad_runtime/ivf.py at
nprobe 1/2/4/8): recall@1 against exact search (the same nearest distance), the map's largest
deviation from the exact path's (fraction of its range), image AUROC and AUPRO (maps at 512 px) on the
test split and their change against exact, and median seconds per image end to end and in scoring
(decoding excluded), and in the searches alone (wall and CPU time summed over the workers that search
a chunk's heads at once; CPU time is robust to the load of a shared box, where wall times are not).
All settings run in this one process on the same decoded images, interleaved image by image, so their
ratios hold at whatever load the machine has (printed).

    .venv/bin/python benchmarks/bench_knn.py BUNDLE DATA [BUNDLE DATA ...] [--nprobe 1,2,4,8]

DATA is the MVTec-layout folder the bundle was trained on (its test split is scored). A benchmark that
prints figures (docs/benchmarks.md records them), not a test.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import cv2
import faiss
import numpy as np
from tqdm import tqdm

from hiad_runtime.heads import FaissKnnHead, exact_knn_distance
from hiad_runtime.inspector import Inspector
from hiad_runtime.ivf import IvfLists
from hiad_train.data import read_mvtec
from hiad_train.evaluation import aupro, image_auroc


def searches(head: FaissKnnHead, index_file: Path, nprobes: list[int]) -> dict:
    """setting -> queries -> (M, k) neighbours, for one loaded head and its index file."""
    lists: IvfLists = head.lists
    exact = faiss.IndexFlatL2(head.bank.shape[1])
    exact.add(head.bank)
    ivf = faiss.read_index(str(index_file))  # faiss's own scan of the same lists
    out = {"exact": lambda q: exact.search(q, head.k)[1]}
    for n in nprobes:
        out[f"faiss nprobe {n}"] = lambda q, n=n: ivf.search(q, head.k, params=faiss.SearchParametersIVF(nprobe=n))[1]
        out[f"grouped nprobe {n}"] = lambda q, n=n: lists.search(q, head.k, n)
    return out


def run(bundle: Path, data: Path, nprobes: list[int]) -> None:
    inspector = Inspector.load(bundle)
    engine = inspector.engine
    heads = {name: engine.heads[name] for name in engine.heads.sizes}
    if not all(isinstance(h, FaissKnnHead) and h.lists is not None for h in heads.values()):
        raise SystemExit(f"{bundle}: benchmark needs k-NN heads with an IVF-Flat index")
    files = {t.name: bundle / t.head.files["index"] for t in inspector.manifest.tasks}
    per_head = {name: searches(h, files[name], nprobes) for name, h in heads.items()}
    settings = list(next(iter(per_head.values())))
    samples = read_mvtec(data, "test")
    maps, scores, seconds, scoring, recall, cpu = ({s: [] for s in settings} for _ in range(6))
    search_s = {s: [0.0, 0.0] for s in settings}  # wall and CPU seconds in the searches alone, summed over workers
    lock = threading.Lock()
    deviation = dict.fromkeys(settings, 0.0)  # largest |map - exact map| over the test images
    low, high = np.inf, -np.inf  # the exact maps' range
    calls = {}  # head -> (queries, neighbours) of the last search, read after the timed run
    for sample in tqdm(samples, desc=f"{bundle.name}: test images"):
        image = inspector.decode(sample.image_path)
        nearest = {}  # head -> the exact nearest distances for this image's queries
        for setting in settings:
            for name, head in heads.items():

                def neighbours(q, search=per_head[name][setting], name=name, spent=search_s[setting]):
                    wall, clock = time.perf_counter(), time.thread_time()  # heads run on several workers
                    calls[name] = q, search(q)
                    with lock:
                        spent[0] += time.perf_counter() - wall
                        spent[1] += time.thread_time() - clock
                    return calls[name][1]

                head.neighbours = neighbours
            t0, c0 = time.perf_counter(), time.process_time()
            r = inspector.predict(image)
            seconds[setting].append(time.perf_counter() - t0)
            cpu[setting].append(time.process_time() - c0)
            scoring[setting].append(r.timings["scoring"])
            for name, (q, idx) in calls.items():
                near = exact_knn_distance(q, heads[name].bank, np.where(idx[:, :1] < 0, 0, idx[:, :1]))
                if setting == "exact":
                    nearest[name] = near
                else:
                    recall[setting].append(np.isclose(near, nearest[name], rtol=1e-5, atol=1e-6).mean())
            if setting == "exact":
                exact_map = r.anomaly_map
                low, high = min(low, float(exact_map.min())), max(high, float(exact_map.max()))
            deviation[setting] = max(deviation[setting], float(np.abs(r.anomaly_map - exact_map).max()))
            maps[setting].append(cv2.resize(r.anomaly_map, (512, 512), interpolation=cv2.INTER_LINEAR))
            scores[setting].append(r.score)
    labels = np.array([s.label for s in samples])
    masks = [s.mask((512, 512)) for s in samples]
    print(f"\n{bundle} on {data} ({len(samples)} test images, {len(heads)} heads); load {load()}")
    print(
        "| search | recall@1 | map deviation (of range) | image AUROC | AUPRO | search ms/image, all workers (CPU ms) "
        "| scoring ms | s/image (CPU s) | vs exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for s in settings:
        auroc = image_auroc(np.array(scores[s]), labels)["image_auroc"]
        pro = aupro(np.array(scores[s]), labels, maps[s], masks)["aupro"]
        dev = deviation[s] / max(high - low, 1e-12)
        base = base or (auroc, pro, np.median(seconds[s]))
        rec = np.mean(recall[s]) if recall[s] else 1.0
        total = np.median(seconds[s])
        wall, clock = (t / len(samples) * 1000 for t in search_s[s])
        print(
            f"| {s} | {rec:.4f} | {dev:.1e} | {auroc:.4f} ({auroc - base[0]:+.4f}) | {pro:.4f} ({pro - base[1]:+.4f}) "
            f"| {wall:.0f} ({clock:.0f}) | {np.median(scoring[s]) * 1000:.0f} | {total:.2f} ({np.median(cpu[s]):.2f}) "
            f"| {total / base[2]:.2f} |"
        )


def load() -> str:
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", nargs="+", type=Path, help="BUNDLE DATA [BUNDLE DATA ...]")
    parser.add_argument("--nprobe", default="1,2,4,8")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give BUNDLE DATA pairs")
    nprobes = [int(n) for n in args.nprobe.split(",")]
    for bundle, data in zip(args.pairs[::2], args.pairs[1::2]):
        run(bundle, data, nprobes)


if __name__ == "__main__":
    main()
