"""What the feature cache's checks cost: the keyed checksums verified on every read of an entry,
and the content identity of image files (every file's bytes hashed, every run).

    python experiments/feature_cache/checks.py [--images 50000] [--hymenoptera DIR]

Prints one JSON object. Entries are written through the store's own ``put`` with the shapes
the default backbone (EfficientNet-Lite0, 1280 features, float16) gives on digits and
hymenoptera, then read back with ``lookup`` (load + checksums + labels) and with the
checksums alone. Image identities: ``dataset_identity`` with ``content=True`` and ``False``
on hymenoptera, and on ``--images`` synthetic 96x96 JPEGs (written once to ``--scratch``),
read warm (page cache) and cold (each file's pages dropped first with posix_fadvise).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.data.image_folder import ImageFileDataset
from transferlab.feature_cache.identity import dataset_identity
from transferlab.feature_cache.store import DiskStore, checksum


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def entry_costs(store: DiskStore, name: str, rows: int, dim: int = 1280) -> dict:
    labels = np.arange(rows, dtype=np.int64) % 2

    def fill(features, into):
        features[:] = np.random.default_rng(0).standard_normal(features.shape)
        into[:] = labels

    entry = store.put(name, (rows, dim), "float16", {}, fill)
    return {"rows": rows, "bytes": entry.nbytes,
            "lookup_s": best_of(lambda: store.lookup(name, labels)),
            "checksums_only_s": best_of(lambda: (checksum(store.key, entry.features),
                                                 checksum(store.key, entry.labels)))}


def drop_pages(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def identity_costs(paths: list[Path], cold: bool) -> dict:
    data = ImageFileDataset([(p, 0) for p in paths])
    out = {"files": len(paths), "bytes": sum(p.stat().st_size for p in paths),
           "stat_s": best_of(lambda: dataset_identity(data, content=False), 3),
           "content_warm_s": best_of(lambda: dataset_identity(data, content=True), 3)}
    if cold:
        drop_pages(paths)
        started = time.perf_counter()
        dataset_identity(data, content=True)
        out["content_cold_s"] = time.perf_counter() - started
    return out


def synthetic(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"{i:06d}.jpg" for i in range(n)]
    base = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
    for path in paths:
        if not path.exists():
            noisy = np.clip(base.astype(np.int16) + rng.integers(-20, 20, base.shape), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--scratch", default="/tmp/transferlab-bench-images")
    parser.add_argument("--hymenoptera", default=os.path.join(
        os.environ.get("TRANSFERLAB_DATA_DIR", "data"), "hymenoptera"))
    args = parser.parse_args()
    results: dict = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        store = DiskStore(Path(tmp), key=b"k" * 32)
        results["entries"] = {
            "digits train (1437 x 1280 float16)": entry_costs(store, "digits", 1437),
            "hymenoptera train (244 x 1280 float16)": entry_costs(store, "hym", 244),
            "100k x 1280 float16": entry_costs(store, "big", 100_000)}
    hym = Path(args.hymenoptera)
    if hym.is_dir():
        files = sorted(p for p in hym.rglob("*") if p.is_file())
        results["hymenoptera"] = identity_costs(files, cold=False)
    if args.images:
        results["synthetic"] = identity_costs(synthetic(Path(args.scratch), args.images),
                                              cold=True)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
