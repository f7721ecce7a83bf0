"""WebDataset shards: tar files whose members are grouped into samples by basename
(``000123.jpg`` + ``000123.cls``: the image and its class index, as text).

Two readers of the same files:

- :class:`ShardSamples`, what a run trains from (``dataset=webdataset``): random access to
  local shards by each image's byte offset (from the ``index.json`` that ``transferlab-shard``
  writes beside them, or found by reading the tar headers once), so that the run's own seeded
  order, exact resume, DDP sampler and feature cache work as they do for a folder. Remote
  shards (``http(s)://``) are downloaded once into a local cache (:func:`fetched`, with the
  ``index.json`` beside them where there is one), then read as local ones.
- :class:`ShardStream`, a streamed reader for shards that are remote (``https://...``) or too
  many to index: every epoch the shard order is shuffled and the samples pass through a
  seeded shuffle buffer; each DDP rank, and each DataLoader worker within it, reads its own
  contiguous part of the epoch, so that every sample is read exactly once per epoch.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from transferlab.config.schema import WebDatasetConfig
from transferlab.data import DataSplits, assemble, derived_seed, holdout, sample_rngs
from transferlab.data.image_folder import to_rgb
from transferlab.errors import UserError

INDEX_FILE = "index.json"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_urls(pattern: str) -> list[str]:
    """The shards a brace pattern names, in order: ``{000..012}`` a numeric range (zero padding
    kept), ``{a,b}`` alternatives; several patterns separated by ``::``."""
    out: list[str] = []
    for part in (p.strip() for p in pattern.split("::")):
        if not part:
            continue
        match = _BRACE.search(part)
        if match is None:
            out.append(part)
            continue
        head, body, tail = part[:match.start()], match.group(1), part[match.end():]
        numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numeric:
            lo, hi = numeric.groups()
            width = len(lo) if lo.startswith("0") else 0
            choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            choices = body.split(",")
        for choice in choices:
            out.extend(expand_urls(head + choice + tail))
    return out


def shard_urls(pattern: str, what: str = "dataset.urls") -> list[str]:
    """The shards ``pattern`` names (:func:`expand_urls`); none is one line saying what to give."""
    urls = expand_urls(pattern)
    if not urls:
        raise UserError(f"{what} is empty: give a brace pattern of tar shards, e.g. "
                        f"{what}=/data/shards/train-{{000000..000003}}.tar")
    return urls


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member: the key is the path up to the first dot of the file
    name (WebDataset's grouping rule), the extension the rest, lower case."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass(frozen=True)
class ShardSample:
    """One sample of a local shard: where its image's bytes are, and its label."""

    shard: str
    offset: int
    size: int
    label: int
    key: str


def _label(data: bytes, where: str) -> int:
    try:
        return int(data.decode().strip())
    except ValueError:
        raise UserError(f"{where}: the label {data[:20]!r} is not an integer class index: "
                        "write shards with transferlab-shard, or set dataset.label_key") from None


def _group(members: Iterator[tuple[str, object]], image_keys: list[str], label_key: str):
    """(key, {ext: member}) of consecutive members sharing a key, for complete samples only
    (an image under one of ``image_keys`` and a label)."""
    for key, group in itertools.groupby(members, key=lambda m: split_key(m[0])[0]):
        parts = {split_key(name)[1]: item for name, item in group}
        image = next((parts[k] for k in image_keys if k in parts), None)
        if image is not None and label_key in parts:
            yield key, image, parts[label_key]


def scan_shard(path: str, image_keys: list[str], label_key: str) -> list[ShardSample]:
    """The complete samples of a local shard, by reading its tar headers (and labels)."""
    with tarfile.open(path, "r:") as tar:
        files = ((m.name, m) for m in tar.getmembers() if m.isfile())
        found = []
        for key, image, label in _group(files, image_keys, label_key):
            value = _label(tar.extractfile(label).read(), f"{path}: {key}")
            found.append(ShardSample(path, image.offset_data, image.size, value, key))
    return found


def _indexed(path: str, image_keys: list[str], label_key: str) -> list[ShardSample] | None:
    """The samples of ``path`` from the ``index.json`` beside it, when it lists this file at its
    present size under the same keys; else None (the shard is scanned)."""
    index = Path(path).parent / INDEX_FILE
    try:
        entry = json.loads(index.read_text())["shards"][Path(path).name]
    except (OSError, ValueError, KeyError):
        return None
    if entry.get("size") != os.path.getsize(path) or entry.get("label_key") != label_key \
            or not set(entry.get("image_keys", ())) <= set(image_keys):
        return None
    return [ShardSample(path, offset, size, label, key)
            for key, label, offset, size in entry["samples"]]


def shard_cache(cache_dir: str | None) -> Path:
    """Where remote shards are downloaded: ``dataset.cache_dir``, else the ``shards/`` folder
    of transferlab's cache (``$TRANSFERLAB_CACHE_DIR``, ``~/.cache/transferlab``)."""
    from transferlab.infra.runtime import cache_root

    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "shards"


def fetched(url: str, cache: Path, what: str = "dataset.urls") -> str:
    """The local copy of the remote shard ``url`` (downloaded once, atomically, into a folder
    of ``cache`` named after the URL's folder, with the ``index.json`` beside it where the
    server has one); a failed download is one line saying what to do."""
    from urllib.error import URLError

    base, _, name = url.rpartition("/")
    folder = cache / hashlib.sha256(base.encode()).hexdigest()[:16]
    target = folder / name
    if target.is_file():
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _download(url, target)
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"{what}: could not download {url} ({reason}): check the network, or "
                        "download the shards and give their local paths") from None
    index = folder / INDEX_FILE
    if not index.is_file():
        try:
            _download(f"{base}/{INDEX_FILE}", index)
        except (URLError, OSError):  # none (shards of another writer): their headers are read
            pass
    return str(target)


def _download(url: str, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open_url(url) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def index_shards(pattern: str, image_key: str, label_key: str, what: str = "dataset.urls",
                 cache_dir: str | None = None) -> tuple[list[ShardSample], list[str] | None]:
    """Every sample of the shards ``pattern`` names, in shard order (remote ones downloaded
    first: :func:`fetched`), and the class names the shards' ``index.json`` gives (None where
    there is none)."""
    paths = shard_urls(pattern, what)
    if any("://" in p for p in paths):
        cache = shard_cache(cache_dir)
        paths = [fetched(p, cache, what) if "://" in p else p for p in paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{what}: shard {missing[0]} does not exist ({len(missing)} of "
                        f"{len(paths)} missing): check the pattern")
    keys = image_keys(image_key)
    samples: list[ShardSample] = []
    listed = True  # every shard in the index.json beside it: its class names hold for them
    for path in (os.path.abspath(p) for p in paths):  # a resume may start elsewhere
        found = _indexed(path, keys, label_key)
        listed = listed and found is not None
        samples += found if found is not None else scan_shard(path, keys, label_key)
    if not samples:
        raise UserError(f"{what}: no sample in {len(paths)} shard(s) has an image "
                        f"({image_key}) and a label ({label_key}): check dataset.image_key "
                        "and dataset.label_key")
    return samples, _classes(Path(paths[0]).parent / INDEX_FILE) if listed else None


def image_keys(text: str) -> list[str]:
    return [k.strip().lower() for k in text.split(";") if k.strip()]


def _classes(index: Path) -> list[str] | None:
    try:
        return list(json.loads(index.read_text())["classes"])
    except (OSError, ValueError, KeyError):
        return None


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return to_rgb(im)


class ShardSamples(Dataset):
    """Images of local shards read by their byte offsets, passed through ``transform``."""

    def __init__(self, samples: list[ShardSample], transform=None):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def __getitem__(self, i: int):
        sample = self.samples[i]
        with open(sample.shard, "rb") as f:
            f.seek(sample.offset)
            image = decode(f.read(sample.size))
        return (self.transform(image) if self.transform else image), sample.label

    def cache_identity(self, content: bool) -> str:
        """The feature cache's key of this split: every shard file it reads (path and content
        hash, or size and modification time; as image files of a folder) and the samples
        (offset, size, label) it takes from each."""
        from transferlab.feature_cache.identity import file_identity

        h = hashlib.sha256(b"webdataset shards\n")
        for shard, group in itertools.groupby(self.samples, key=lambda s: s.shard):
            h.update(file_identity(shard, content) + b"\n")
            for s in group:
                h.update(f"{s.offset}|{s.size}|{s.label}\n".encode())
        return h.hexdigest()


def build_webdataset(cfg: WebDatasetConfig, train_tf, eval_tf) -> DataSplits:
    """``dataset=webdataset``: train from ``urls``; val from ``val_urls`` or held out of train
    by ``val_fraction``; test from ``test_urls`` or ``test_fraction`` of train."""
    if cfg.stream:
        return build_stream(cfg, train_tf, eval_tf)
    train, classes = index_shards(cfg.urls, cfg.image_key, cfg.label_key,
                                  cache_dir=cfg.cache_dir)
    labels = [s.label for s in train]
    classes = classes or [str(i) for i in range(max(labels) + 1)]
    _check_labels(labels, classes, "dataset.urls")
    test = None
    if cfg.test_urls:
        test = _split_shards(cfg, cfg.test_urls, classes, "dataset.test_urls")
    if cfg.val_urls:
        val = _split_shards(cfg, cfg.val_urls, classes, "dataset.val_urls")
        if test is None and cfg.test_fraction > 0:
            keep, _, out = holdout(labels, cfg, val=False, names=classes)
            train, test = [train[i] for i in keep], [train[i] for i in out]
    else:
        keep, held, out = holdout(labels, cfg, test=test is None, names=classes)
        train, val, test = ([train[i] for i in keep], [train[i] for i in held],
                            test if test is not None else [train[i] for i in out])
    return assemble(cfg, classes, ShardSamples, train, val, test or None,
                    lambda s: s.label, train_tf, eval_tf)


def _split_shards(cfg: WebDatasetConfig, pattern: str, classes: list[str],
                  what: str) -> list[ShardSample]:
    samples, named = index_shards(pattern, cfg.image_key, cfg.label_key, what, cfg.cache_dir)
    if named is not None and named != classes:
        raise UserError(f"{what} has classes {named[:5]}..., dataset.urls {classes[:5]}...: "
                        "write every split's shards from one folder with transferlab-shard")
    _check_labels([s.label for s in samples], classes, what)
    return samples


def _check_labels(labels: list[int], classes: list[str], what: str) -> None:
    bad = sorted({y for y in labels if not 0 <= y < len(classes)})
    if bad:
        raise UserError(f"{what}: label {bad[0]} is outside the {len(classes)} classes "
                        f"(0..{len(classes) - 1}): check dataset.label_key")


# -- streaming ---------------------------------------------------------------------------------
def open_url(url: str):
    """A binary stream of a local path or an ``http(s)://`` / ``file://`` URL."""
    if "://" in url:
        from urllib.request import urlopen

        return urlopen(url)  # noqa: S310 (the user names the shards)
    return open(url, "rb")


def stream_samples(url: str, image_keys: list[str], label_key: str):
    """(key, image bytes, label) of the complete samples of one shard, read front to back."""
    with open_url(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        def members():
            for m in tar:
                if m.isfile():
                    yield m.name, tar.extractfile(m).read()

        for key, image, label in _group(members(), image_keys, label_key):
            yield key, image, _label(label, f"{url}: {key}")


class ShardStream(IterableDataset):
    """Samples streamed from shards (local or remote) whose sample counts are known
    (``counts``: :func:`shard_counts` reads them from the ``index.json`` written beside them):
    the training split of ``dataset.stream=true``, never copied nor read by index.

    Epoch ``e`` (:meth:`set_epoch`) reads the shards in an order drawn by (seed, e) (when
    ``shuffle_buffer`` > 0) as one sequence of ``N`` samples. Rank ``r`` of ``world_size``
    takes the ``r``-th of ``world_size`` contiguous parts of that sequence (padded, as
    PyTorch's ``DistributedSampler``, by wrapping to its start where ``N`` is not a multiple
    of ``world_size``: every rank then steps the same number of batches). Its part is cut into
    batches of ``batch_size`` and DataLoader worker ``w`` of ``W`` takes the ``w``-th contiguous
    run of them: each worker's batches are whole but the rank's last (a last batch of one
    sample is left out: it would break BatchNorm in train mode), and the loader delivers them
    in turn, worker after worker. A shard is opened only by the workers whose parts overlap
    it, and read up to the end of their part. Each worker passes its samples through a
    shuffle buffer of ``shuffle_buffer`` samples drawn by (seed, e, rank, w).

    Items are ``(transform(image), label)``; a run's share (:meth:`shared`) gives
    ``(transform(image), label, epoch, index)``, the transform's randomness drawn by (seed,
    epoch, index) (``index``: the sample's place in the shards as listed), as for a split read
    by index. ``skip_batches``: the first batches of the epoch the loader would deliver are
    read past, not decoded (a run resumed from a checkpoint written mid-epoch)."""

    def __init__(self, urls: list[str], counts: list[int], image_key: str = "jpg;png",
                 label_key: str = "cls", transform=None, seed: int = 0,
                 shuffle_buffer: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1, labels: list[int] | None = None):
        if len(urls) != len(counts):
            raise ValueError(f"{len(urls)} shards but {len(counts)} counts")
        self.urls, self.counts = list(urls), list(counts)
        self.image_keys, self.label_key = image_keys(image_key), label_key
        self.transform, self.seed, self.shuffle_buffer = transform, seed, shuffle_buffer
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.batch_size, self.labels, self.indexed = batch_size, labels, False
        self.skip_batches = 0

    def shared(self, seed: int, batch_size: int, rank: int, world_size: int) -> ShardStream:
        """A run's share of the stream: process ``rank`` of ``world_size``, in batches of
        ``batch_size``, items with their epoch and index, augmentations seeded by ``seed``."""
        share = copy.copy(self)
        share.seed, share.batch_size, share.rank, share.world_size = (seed, batch_size, rank,
                                                                      world_size)
        share.indexed = True
        return share

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def total(self) -> int:
        return sum(self.counts)

    def __len__(self) -> int:
        """Samples per rank and epoch."""
        per_rank = math.ceil(self.total / self.world_size)
        return per_rank - 1 if self.batch_size > 1 and per_rank % self.batch_size == 1 \
            else per_rank

    def cache_identity(self, content: bool) -> str:
        """The shards (as named) and their samples' counts and labels: what a resume checks."""
        h = hashlib.sha256(b"streamed webdataset shards\n")
        for url, count in zip(self.urls, self.counts, strict=True):
            h.update(f"{url}|{count}\n".encode())
        h.update(repr(self.labels).encode())
        return h.hexdigest()

    def _worker_batches(self, workers: int) -> list[tuple[int, int]]:
        """Each worker's run of batches (first, end) of this rank's part."""
        batches = math.ceil(len(self) / self.batch_size)
        return [(w * batches // workers, (w + 1) * batches // workers) for w in range(workers)]

    def _turns(self, workers: int) -> tuple[list[int], list[int]]:
        """(which run of batches each loader worker reads, how many of that run's batches it
        reads past). The loader takes one batch of every worker in turn (worker 0 first),
        passing over those done: to go on after its first ``skip_batches`` batches exactly as
        the whole epoch would, the runs go to the workers in the order the rest of the epoch
        takes them."""
        runs = [end - first for first, end in self._worker_batches(workers)]
        order = [w for turn in range(max(runs, default=0)) for w in range(workers)
                 if runs[w] > turn]
        done = [0] * workers
        for w in order[:self.skip_batches]:
            done[w] += 1
        rest = list(dict.fromkeys(order[self.skip_batches:]))
        return rest + [w for w in range(workers) if w not in rest], done

    def _parts(self, run: int, workers: int) -> list[tuple[int, int, int]]:
        """(shard index, first, end) sample ranges of the ``run``-th of ``workers`` runs of
        batches, in order."""
        order = list(range(len(self.urls)))
        if self.shuffle_buffer > 0:
            random.Random(derived_seed("shards", self.seed, self.epoch)).shuffle(order)
        total, per_rank = self.total, math.ceil(self.total / self.world_size)
        first, end = self._worker_batches(workers)[run]
        lo = self.rank * per_rank + first * self.batch_size
        hi = self.rank * per_rank + min(end * self.batch_size, len(self))
        # positions past the end are the padding: they wrap to the start
        spans = [(lo, hi)] if hi <= total else (
            [(lo - total, hi - total)] if lo >= total else [(lo, total), (0, hi - total)])
        starts = list(itertools.accumulate([self.counts[i] for i in order], initial=0))
        parts = []
        for a, b in spans:
            for j, shard in enumerate(order):
                first, end = max(a, starts[j]) - starts[j], min(b, starts[j + 1]) - starts[j]
                if first < end:
                    parts.append((shard, first, end))
        return parts

    def _read(self, parts: list[tuple[int, int, int]]) -> Iterator[tuple[bytes, int, int]]:
        listed = list(itertools.accumulate(self.counts, initial=0))
        for shard, first, end in parts:
            samples = stream_samples(self.urls[shard], self.image_keys, self.label_key)
            for i, (_, image, label) in enumerate(itertools.islice(samples, first, end)):
                yield image, label, listed[shard] + first + i

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        runs, done = self._turns(workers)
        run = runs[worker]
        rng = random.Random(derived_seed("buffer", self.seed, self.epoch, self.rank, run))
        skip = done[run] * self.batch_size
        for n, item in enumerate(self._buffered(self._read(self._parts(run, workers)), rng)):
            if n >= skip:
                yield self._item(*item)

    def _buffered(self, items: Iterator[tuple[bytes, int, int]], rng: random.Random
                  ) -> Iterator[tuple[bytes, int, int]]:
        buffer: list[tuple[bytes, int, int]] = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            if buffer:
                j = rng.randrange(len(buffer))
                buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _item(self, data: bytes, label: int, index: int):
        if not self.indexed:
            image = decode(data)
            return (self.transform(image) if self.transform else image), label
        with sample_rngs(self.seed, self.epoch, index):
            image = decode(data)
            return (self.transform(image) if self.transform else image), label, self.epoch, \
                index


def shard_counts(urls: list[str], index: str | None = None) -> list[int]:
    """Each shard's sample count from an ``index.json`` (``index``, a path or URL; default:
    the one beside the first shard)."""
    return stream_index(urls, index)[0]


def stream_index(urls: list[str], index: str | None = None
                 ) -> tuple[list[int], list[int] | None, list[str] | None]:
    """(each shard's sample count, every sample's label in order where the index lists them,
    the class names) from an ``index.json`` (``index``, a path or URL; default: the one
    beside the first shard), read without opening a shard."""
    where = index or urls[0].rsplit("/", 1)[0] + "/" + INDEX_FILE
    try:
        with open_url(where) as f:
            data = json.loads(f.read())
        entries = [data["shards"][u.rsplit("/", 1)[-1]] for u in urls]
        counts = [int(e["count"]) for e in entries]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read the sample counts of {len(urls)} shard(s) from {where} "
                        f"({exc}): write the shards with transferlab-shard, which writes it") \
            from None
    listed = all("samples" in e for e in entries)
    labels = [int(s[1]) for e in entries for s in e["samples"]] if listed else None
    return counts, labels, data.get("classes")


def build_stream(cfg: WebDatasetConfig, train_tf, eval_tf) -> DataSplits:
    """``dataset=webdataset dataset.stream=true``: the training shards streamed
    (:class:`ShardStream`, their counts and labels from their ``index.json``); val (and test)
    from their own shards, read as ``stream=false`` reads them."""
    for bad, why in ((not cfg.val_urls, "val cannot be held out of them: give "
                      "dataset.val_urls (transferlab-shard writes val shards from a val/ "
                      "folder)"),
                     (cfg.train_fraction < 1.0 or cfg.samples_per_class is not None,
                      "a training subset cannot be drawn from them: use "
                      "dataset.train_fraction=1 and no samples_per_class"),
                     (cfg.folds is not None, "k-fold splits cannot be drawn from them: use "
                      "dataset.folds=null"),
                     (cfg.test_fraction > 0 and not cfg.test_urls, "test cannot be held out "
                      "of them: give dataset.test_urls, or dataset.test_fraction=0")):
        if bad:
            raise UserError("dataset.stream=true reads the training shards in order, so "
                            f"{why}; or dataset.stream=false")
    urls = shard_urls(cfg.urls)
    counts, labels, classes = stream_index(urls, cfg.index)
    if labels is None or classes is None:
        raise UserError(f"dataset.stream=true: the index.json of {urls[0]} lists no samples or "
                        "classes: write the shards with transferlab-shard")
    _check_labels(labels, classes, "dataset.urls")
    train = ShardStream(urls, counts, cfg.image_key, cfg.label_key, train_tf,
                        shuffle_buffer=cfg.shuffle_buffer, labels=labels)
    val = ShardSamples(_split_shards(cfg, cfg.val_urls, classes, "dataset.val_urls"), eval_tf)
    test = (ShardSamples(_split_shards(cfg, cfg.test_urls, classes, "dataset.test_urls"),
                         eval_tf) if cfg.test_urls else None)
    return DataSplits(train=train, val=val, classes=list(classes), test=test,
                      train_labels=labels)
