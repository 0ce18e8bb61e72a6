"""Datasets as in-memory tensors on the training device (no DataLoader in any hot path), or as data
sources read batch by batch (:class:`StreamData`, for data that does not fit in memory). Each carries
the task that scores it (:mod:`landscape.tasks`; classification by default).

Built-in: ``mnist1d`` (the default), ``cifar10``, ``npz``, ``synthetic``, and two generated offline for
other tasks: ``regression`` (a smooth function of uniform inputs plus noise) and ``modular`` (modular
addition as token sequences, for a language model). Float inputs are read as float32, integer inputs as
token ids (int64); integer targets are classes, float targets values. A user dataset is named by
import path ``package.module:factory`` (found on ``sys.path`` or in the current folder), called with the
dataset options as keyword arguments. It returns ``(x_train, y_train, x_test, y_test)`` (arrays or
tensors), a dict with those keys, or ``(train, test)`` where each is an ``(x, y)`` pair or a
map-style ``torch.utils.data.Dataset`` of ``(x, y)`` items (read once, in index order, into tensors).

Example::

    data = load_data(DataSpec("mnist1d"), device="cpu")
    data.x_train.shape   # torch.Size([4000, 1, 40])
"""
from __future__ import annotations

import importlib
import math
import os
import pickle
import sys
import threading
import zipfile
from dataclasses import dataclass, field, replace
from math import prod
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import (DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler,
                              Subset, SubsetRandomSampler)

from .bn import batch_slices
from .device import random_state, set_random_state
from .errors import DataError
from .options import Option, check_options
from .store.files import sha256
from .tasks import IGNORE_INDEX, Classification, get_task, to_device


@dataclass(frozen=True)
class DataSpec:
    """Which dataset and its options, e.g. ``DataSpec("cifar10", {"root": "~/data", "augment": True})``."""
    name: str = "mnist1d"
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(d["name"], dict(d.get("options", {})))


@dataclass
class Data:
    """Both splits in memory as tensors (the fast path), with the task that scores them. Inputs are
    float, or integer token ids; targets are class labels (int), float values, or token labels.
    ``sizes``: the splits' sizes before :meth:`subset` (for standard errors), else None."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool = False  # random crop (padding 4) + horizontal flip, for images
    task: object = None    # a landscape.tasks task; None: classification
    sizes: dict = None

    def __post_init__(self):
        self.task = get_task(self.task)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device) -> "Data":
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    def batches(self, split: str, batch_size: int, device=None):
        """``(x, y)`` batches of ``split`` in order (see :func:`batch_slices`)."""
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        for sl in batch_slices(len(x), batch_size):
            yield to_device((x[sl], y[sl]), device) if device is not None else (x[sl], y[sl])

    def population(self, split: str) -> int:
        """How many samples ``split`` was drawn from."""
        return (self.sizes or {}).get(split, len(getattr(self, f"x_{split}")))

    def subset(self, samples: int, seed: int = 0, splits=("train", "test")) -> "Data":
        """A fixed random subset of ``samples`` of each split (in their order), drawn from ``seed``."""
        g, changes = torch.Generator().manual_seed(seed), {"sizes": {s: self.population(s) for s in splits}}
        for split in splits:
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if samples < len(x):
                idx = torch.randperm(len(x), generator=g)[:samples].sort().values.to(x.device)
                changes.update({f"x_{split}": x[idx], f"y_{split}": y[idx]})
        return replace(self, **changes)


class StreamData:
    """Both splits as data sources that yield batches, read in a fixed order for every pass, one batch
    in memory at a time. A source is a ``torch.utils.data.DataLoader`` (one over a map-style dataset is
    read in index order, shuffling or not; with a ``SubsetRandomSampler`` or an array of indices as its
    sampler, those samples in their order) or a function returning a fresh iterable of batches. A
    batch is an ``(inputs, targets)`` tuple or a dict (see :mod:`landscape.tasks`).

    Example::

        x, y = torch.randn(100, 3), torch.randn(100)
        train = DataLoader(TensorDataset(x, y), batch_size=32)            # read in index order
        test = lambda: ((x[i:i + 25], y[i:i + 25]) for i in range(0, 100, 25))   # a fresh iterable per pass
        data = StreamData(train, test, task="regression")
    """
    augment = False
    num_classes = None

    def __init__(self, train, test, task=None, sizes: dict | None = None):
        for split, source in (("train", train), ("test", test)):
            if not (isinstance(source, DataLoader) or callable(source)):
                raise DataError(f"the {split} data source is a {type(source).__name__}; give a DataLoader or a "
                                "function returning an iterable of batches")
        self.train, self.test, self.task, self.sizes = train, test, get_task(task), sizes
        # what each map-style loader reads, worked out once (a sampler no fixed order can read is refused here)
        self._read = {split: _samples(source, split) for split, source in (("train", train), ("test", test))
                      if _map_style(source)}

    def to(self, device) -> "StreamData":
        return self  # batches move to the model's device as they are read

    def batches(self, split: str, batch_size: int = None, device=None):
        """The batches of ``split`` in its fixed order (``batch_size``: the source's own), with float
        tensors as float32 and integer ones as int64, as data in memory is."""
        first = None
        for i, batch in enumerate(_in_order(getattr(self, split), self._read.get(split))):
            first = batch if first is None else first
            _check_like(first, batch, split, i)
            _check_finite_batch(batch, split, i)
            batch = tree_map(_stream_typed, batch)
            yield to_device(batch, device) if device is not None else batch

    def population(self, split: str) -> int | None:
        source = getattr(self, split)
        if self.sizes and split in self.sizes:
            return self.sizes[split]
        return len(self._read[split]) if split in self._read else None

    def subset(self, samples: int, seed: int = 0, splits=("train", "test")) -> "StreamData":
        """A fixed random subset of ``samples`` of each split (a DataLoader over a map-style dataset)."""
        g, sources = torch.Generator().manual_seed(seed), {"train": self.train, "test": self.test}
        for split in splits:
            loader = sources[split]
            if split not in self._read:
                what = "a DataLoader with a batch_sampler" if isinstance(loader, DataLoader) and _sized(loader.dataset) \
                    else f"a {type(loader).__name__}"
                raise DataError(f"a subset of the {split} data needs a DataLoader that reads the samples of a dataset "
                                f"with a length one by one; the {split} source is {what}")
            read = self._read[split]
            if samples < len(read):
                idx = torch.randperm(len(read), generator=g)[:samples].sort().values.tolist()
                sources[split] = _sequential(loader, Subset(read, idx))
        return StreamData(sources["train"], sources["test"], self.task,
                          {s: self.population(s) for s in splits})


def _sized(dataset) -> bool:
    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__")


def _map_style(source) -> bool:
    """A DataLoader that reads samples of a map-style dataset one by one (not a user's batch sampler)."""
    return isinstance(source, DataLoader) and _sized(source.dataset) and source.batch_size is not None


def _samples(loader: DataLoader, split: str = ""):
    """The samples a map-style ``loader`` reads, as a dataset to read in index order: its whole dataset
    when its sampler takes every sample once (sequential or shuffling), the chosen ones for a
    ``SubsetRandomSampler`` or a list of indices. Another sampler (weighted, distributed, a user's own)
    draws a different selection on every pass, which no fixed order can read: refused. A
    ``DistributedSampler`` reads the whole dataset: under torchrun, processes share the points, and
    each point is evaluated on all the data."""
    sampler, dataset = loader.sampler, loader.dataset
    if isinstance(sampler, (SequentialSampler, DistributedSampler)) or (
            isinstance(sampler, RandomSampler) and not sampler.replacement and len(sampler) == len(dataset)):
        return dataset
    if isinstance(sampler, SubsetRandomSampler):
        return Subset(dataset, np.asarray(sampler.indices, dtype=np.int64).tolist())
    if isinstance(sampler, (list, tuple, range, np.ndarray, torch.Tensor)):
        return Subset(dataset, np.asarray(sampler, dtype=np.int64).tolist())
    raise DataError(f"the {split + ' ' if split else ''}DataLoader draws its samples with a {type(sampler).__name__}, "
                    "which no fixed order can read; give a DataLoader over the samples to evaluate (e.g. a "
                    "torch.utils.data.Subset, or a SubsetRandomSampler) or a function returning its batches")


def _sequential(loader: DataLoader, dataset=None) -> DataLoader:
    """``loader``'s dataset (or ``dataset``) read in index order, every sample, same batches and workers
    otherwise (a worker_init_fn may open the dataset's storage). Its workers do not persist: passes run
    side by side on the evaluator's threads, and a persistent loader serves one pass at a time."""
    workers = {} if not loader.num_workers else dict(
        worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
        timeout=loader.timeout, prefetch_factor=loader.prefetch_factor)
    return DataLoader(loader.dataset if dataset is None else dataset, batch_size=loader.batch_size or 1,
                      shuffle=False, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, **workers)


def _in_order(source, read=None):
    """One pass over a source in its fixed order: a map-style DataLoader's samples ``read`` (see
    :func:`_samples`) sequentially, any other iterable as it comes; either with torch's random state
    fixed for the pass (so a shuffling iterable, or random transforms, repeat themselves).

    The pass has a random state of its own (torch's CPU generator and, once CUDA is in use, every GPU's,
    each seeded 0), swapped in while the source makes each batch: passes run side by side on the
    evaluator's threads, and each must draw what a pass alone would, while the caller's random state
    stays as it was."""
    if read is not None:
        source = _sequential(source, read)
    state, batches = _seeded_state(), None
    while True:
        with _GLOBAL_RANDOM_STATE:
            outer = random_state(state[1])
            set_random_state(state)
            try:
                if batches is None:
                    batches = iter(source if isinstance(source, DataLoader) else source())
                batch = next(batches, _END)
            finally:
                state = random_state(state[1])
                set_random_state(outer)
        if batch is _END:
            return
        yield batch


_GLOBAL_RANDOM_STATE = threading.Lock()  # held while a pass's own state stands in for torch's


def _seeded_state() -> tuple:
    """(CPU state, {GPU index: state}) of generators seeded 0: a pass's own (a :func:`random_state`). The
    GPUs' only once CUDA is in use (asking for them would start CUDA in a job that runs on the CPU)."""
    cuda = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = {i: torch.Generator(f"cuda:{i}").manual_seed(0).get_state() for i in range(torch.cuda.device_count())}
    return torch.Generator().manual_seed(0).get_state(), cuda


_END = object()


def _check_like(first, batch, split: str, i: int) -> None:
    """Refuse a batch whose tensors differ in length, or whose structure, dimensions or dtypes differ
    from the first batch's (sizes may vary: sequences padded per batch)."""
    def kinds(b):
        if isinstance(b, dict):
            return {k: kinds(v) for k, v in b.items()}
        if isinstance(b, (tuple, list)):
            return [kinds(v) for v in b]
        return f"{b.ndim}-d {b.dtype}" if torch.is_tensor(b) else type(b).__name__
    lengths = {len(t) for t in (batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list))
                                else [batch]) if torch.is_tensor(t)}
    if len(lengths) > 1:
        raise DataError(f"batch {i} of the {split} data holds tensors of {sorted(lengths)} samples; every tensor "
                        "of a batch needs one row per sample")
    if i and kinds(first) != kinds(batch):
        raise DataError(f"batch {i} of the {split} data is {kinds(batch)}, the first was {kinds(first)}")


def _stream_typed(t):
    """A streamed batch's tensor in the types :func:`typed` gives data in memory: float as float32,
    integer as int64 (class labels from numpy's int32 included: cross-entropy takes int64 only). Bytes
    (uint8 images) and booleans stay as they are, as the model or the loss takes them."""
    if not torch.is_tensor(t) or t.dtype in (torch.float32, torch.int64, torch.uint8, torch.bool) or t.is_complex():
        return t
    return t.float() if t.is_floating_point() else t.long()


def _check_finite_batch(batch, split: str, i: int) -> None:
    """Refuse a batch whose float tensors hold NaN or an infinity, as :func:`check_finite_values` does
    data in memory: one such sample makes the split's loss NaN at every point. Checked where the batch
    is read, on the host; tensors a source yields on a GPU are not (the check would make the host wait
    for it)."""
    for t in tree_leaves(batch):
        if torch.is_tensor(t) and t.is_floating_point() and t.device.type == "cpu" and not torch.isfinite(t).all():
            rows = t.reshape(len(t) if t.dim() else 1, -1)
            first = int((~torch.isfinite(rows)).any(1).nonzero()[0])
            raise DataError(f"batch {i} of the {split} data holds NaN or infinite values (in its sample {first}); "
                            "no loss can be computed over them")


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip of an (N, C, H, W) batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator)
    dx = torch.randint(0, 9, (n,), generator=generator)
    draws = torch.stack([dy, dx, (torch.rand(n, generator=generator) < 0.5).long()])
    # to a GPU from pinned memory, asynchronously: a training step does not wait for the GPU here
    draws = draws.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else draws.to(x.device)
    dy, dx, flip = draws[0], draws[1], draws[2].bool()
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows, cols]


# ---------------------------------------------------------------------------------------------
# built-in datasets

def cache_dir() -> Path:
    return Path(os.environ.get("LANDSCAPE_CACHE", Path.home() / ".cache" / "landscape"))


def _mnist1d(options: dict):
    """MNIST-1D from the ``mnist1d`` package's own generator with its default arguments
    (4000 train, 1000 test, length 40); generated once, then read from the cache."""
    path = cache_dir() / "mnist1d-default.npz"
    if not path.exists():
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            raise DataError("dataset 'mnist1d' needs the 'mnist1d' package (pip install mnist1d)") from None
        raw = make_dataset(get_dataset_args())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x_train=raw["x"].astype(np.float32), y_train=raw["y"].astype(np.int64),
                 x_test=raw["x_test"].astype(np.float32), y_test=raw["y_test"].astype(np.int64))
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a cache file
    with np.load(path) as f:
        arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    arrays[0], arrays[2] = arrays[0][:, None, :], arrays[2][:, None, :]  # (N, 1, 40) for Conv1d
    return arrays, 10


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR-10 python layout is pickled; allow only the numpy classes it needs, so a
    crafted file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _read_cifar_batch(path: Path):
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"cifar10: missing file {path}") from None
    except Exception as e:  # malformed pickle, wrong keys, wrong sizes
        raise DataError(f"cifar10: {path} is not a CIFAR-10 batch file ({type(e).__name__}: {e})") from None
    if len(x) != len(y):
        raise DataError(f"cifar10: {path} has {len(x)} images but {len(y)} labels")
    return x, y


def _cifar10(options: dict):
    root = options.get("root")
    if not root:
        raise DataError("dataset 'cifar10' needs its directory: --data-option root=PATH "
                        "(the folder holding or being cifar-10-batches-py)")
    root = Path(root).expanduser()
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"cifar10: {root} is not a directory" if root.exists() else
                        f"cifar10: directory {root} does not exist")
    parts = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(folder / "test_batch")
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    mean = np.asarray(CIFAR_MEAN, np.float32)[None, :, None, None]
    std = np.asarray(CIFAR_STD, np.float32)[None, :, None, None]
    norm = lambda x: ((x.astype(np.float32) / 255.0) - mean) / std  # noqa: E731
    return [norm(x_train), y_train, norm(x_test), y_test], 10


def _npz(options: dict):
    path = options.get("path")
    if not path:
        raise DataError("dataset 'npz' needs its file: --data-option path=FILE.npz")
    keys = ("x_train", "y_train", "x_test", "y_test")
    not_npz = f"{path} is not an .npz file with {', '.join(keys)} (np.savez)"
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"npz file {path} does not exist")
    if file.is_dir():
        raise DataError(f"npz file {path} is a directory")
    try:
        loaded = np.load(file, allow_pickle=False)  # never unpickle what a user hands us
    except OSError as e:
        raise DataError(f"cannot read npz file {path}: {e.strerror or e}") from None
    except (ValueError, EOFError, zipfile.BadZipFile):  # not .npz/.npy (numpy would try it as a pickle)
        raise DataError(not_npz) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single .npy array
        raise DataError(not_npz)
    if options.get("sha256") and sha256(file) != options["sha256"]:
        raise DataError(f"npz file {path} is not the one recorded (its SHA-256 is not the option sha256)")
    with loaded as f:
        missing = [k for k in keys if k not in f]
        if missing:
            raise DataError(f"npz file {path} lacks {', '.join(missing)}")
        try:
            arrays = [f[k] for k in keys]
        except ValueError:
            raise DataError(f"npz file {path} holds object arrays, which are not read (they would be "
                            f"unpickled); save numeric arrays") from None
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read npz file {path}: {e}") from None
    return [typed_array(a) for a in arrays], None


def fingerprinted(spec: DataSpec) -> DataSpec:
    """``spec`` as a file records it: an ``npz`` dataset with its file's SHA-256 (option ``sha256``), so
    that later readers find that very file (:func:`located`) and refuse any other of the same name. A
    ``sha256`` given already must be the file's."""
    file = Path(str(spec.options.get("path", ""))).expanduser()
    if spec.name != "npz" or not spec.options.get("path") or not file.is_file():
        return spec  # (a missing file: load_data names the problem)
    digest = sha256(file)
    if spec.options.get("sha256", digest) != digest:
        raise DataError(f"npz file {spec.options['path']} is not the one recorded (its SHA-256 is not the option "
                        "sha256); give that file, or leave the option out")
    return DataSpec(spec.name, dict(spec.options, sha256=digest))


def located(spec: DataSpec, trajectory) -> DataSpec:
    """A recorded ``npz`` dataset with its path pointing to the file whose SHA-256 it records (checked
    here, and left out of the spec returned): the path as recorded (from the current folder), else beside
    the ``trajectory`` file (under that relative path or its base name: a run shared as a folder with its
    data); a DataError when none is."""
    path, digest = spec.options.get("path"), spec.options.get("sha256")
    if spec.name != "npz" or not path or not digest:
        return spec
    given = Path(str(path)).expanduser()
    beside = Path(trajectory).parent
    places = list(dict.fromkeys([given] + ([] if given.is_absolute() else [beside / given]) + [beside / given.name]))
    for file in places:
        if file.is_file() and sha256(file) == digest:  # (checked: load_data need not read it twice)
            return DataSpec(spec.name, {k: v for k, v in dict(spec.options, path=str(file)).items() if k != "sha256"})
    if not any(file.exists() for file in places):
        raise DataError(f"npz file {path} does not exist, nor beside {trajectory}")
    raise DataError(f"npz file {path} is not the one recorded (its SHA-256 differs), nor is one beside {trajectory}; "
                    "give that file, at its recorded path or beside the trajectory")


def typed_array(a: np.ndarray) -> np.ndarray:
    """Float arrays as float32, integer ones as int64 (class labels, token ids)."""
    return a.astype(np.float32 if np.issubdtype(a.dtype, np.floating) else np.int64)


def _synthetic(options: dict):
    """Gaussian class clusters: tiny and fast, for tests."""
    n_train = int(options.get("n_train", 512))
    n_test = int(options.get("n_test", 256))
    classes = int(options.get("classes", 4))
    shape = tuple(options.get("shape", (1, 24)))
    if (n_train + n_test) * prod(shape) > SYNTHETIC_MAX_VALUES:
        raise DataError(f"dataset 'synthetic': {n_train + n_test} samples of shape {list(shape)} exceed "
                        f"{SYNTHETIC_MAX_VALUES:,} input values")
    g = torch.Generator().manual_seed(int(options.get("seed", 0)))
    centers = torch.randn(classes, *shape, generator=g)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = centers[y] + float(options.get("noise", 1.0)) * torch.randn(n, *shape, generator=g)
        return x.numpy(), y.numpy()

    x_tr, y_tr = make(n_train)
    x_te, y_te = make(n_test)
    return [x_tr, y_tr, x_te, y_te], classes


def _regression(options: dict):
    """A smooth nonlinear function of ``features`` uniform inputs in [-2, 2] plus Gaussian noise:
    y = sin(x . a) + 0.5 (x . b)^2 / features + noise (a, b fixed by ``seed``). Generated offline."""
    n_train, n_test = int(options.get("n_train", 2000)), int(options.get("n_test", 1000))
    features, noise = int(options.get("features", 8)), float(options.get("noise", 0.1))
    if (n_train + n_test) * features > SYNTHETIC_MAX_VALUES:
        raise DataError(f"dataset 'regression': {n_train + n_test} samples of {features} features are too many")
    g = torch.Generator().manual_seed(int(options.get("seed", 0)))
    a, b = torch.randn(features, generator=g) / math.sqrt(features), torch.randn(features, generator=g)
    x = torch.rand(n_train + n_test, features, generator=g) * 4 - 2
    y = torch.sin(x @ a) + 0.5 * (x @ b).square() / features + noise * torch.randn(len(x), generator=g)
    return [x[:n_train].numpy(), y[:n_train].numpy(), x[n_train:].numpy(), y[n_train:].numpy()], None


def _modular(options: dict):
    """Modular addition as token sequences: every pair (a, b) of residues mod p written as
    ``a + b = c`` with c = (a + b) mod p (tokens 0..p-1, p for '+', p + 1 for '='). Inputs are the
    first four tokens, labels the next token at each position with only the answer kept (the others
    are ``IGNORE_INDEX``); a fixed random ``train_fraction`` of the pairs trains. Generated offline."""
    p, fraction = int(options.get("modulus", 23)), float(options.get("train_fraction", 0.5))
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    seq = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1), (a + b) % p], 1)
    x, y = seq[:, :-1], torch.full_like(seq[:, 1:], IGNORE_INDEX)
    y[:, -1] = seq[:, -1]
    order = torch.randperm(len(seq), generator=torch.Generator().manual_seed(int(options.get("seed", 0))))
    cut = max(2, min(len(seq) - 1, round(fraction * len(seq))))
    tr, te = order[:cut], order[cut:]
    return [x[tr].numpy(), y[tr].numpy(), x[te].numpy(), y[te].numpy()], p + 2


def _split_arrays(split, name: str, which: str):
    """One split given as an ``(x, y)`` pair or as a map-style dataset of ``(x, y)`` items."""
    if isinstance(split, torch.utils.data.TensorDataset) and len(split.tensors) == 2:
        return list(split.tensors)
    if isinstance(split, (tuple, list)) and len(split) == 2 and all(hasattr(a, "__len__") for a in split) \
            and not isinstance(split, torch.utils.data.Dataset):
        return list(split)
    if hasattr(split, "__len__") and hasattr(split, "__getitem__"):
        xs, ys = [], []
        for i in range(len(split)):
            item = split[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise DataError(f"dataset factory {name}: item {i} of the {which} set is "
                                f"{type(item).__name__}, expected an (x, y) pair")
            for what, value, items in (("inputs", item[0], xs), ("target", item[1], ys)):
                try:  # a class label, a float value or a vector: as given
                    items.append(_item_tensor(value))
                except (TypeError, ValueError, RuntimeError):
                    raise DataError(f"dataset factory {name}: item {i} of the {which} set has {what} of type "
                                    f"{type(value).__name__}; a dataset by name holds tensors or arrays (dicts of "
                                    "tensors go in data loaders given to the Python API)") from None
        if not xs:
            raise DataError(f"dataset {name!r}: the {which} set is empty")
        for what, items in (("inputs", xs), ("targets", ys)):
            if len({(t.shape, t.is_floating_point()) for t in items}) > 1:
                raise DataError(f"dataset factory {name}: the {which} set's {what} differ in shape or type "
                                "from item to item")
        y = torch.stack(ys)
        return [torch.stack(xs), y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y]  # [c] or [v]: one per sample
    raise DataError(f"dataset factory {name}: the {which} set is {type(split).__name__}, expected an "
                    "(x, y) pair or a dataset of (x, y) items")


def _item_tensor(value) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value.detach().cpu() if torch.is_tensor(value) else value))


def _user_factory(name: str, options: dict):
    fn = import_object(name, DataError, "dataset")
    try:
        out = fn(**options)
    except Exception as e:
        raise DataError(f"dataset factory {name} failed: {type(e).__name__}: {e}") from None
    if isinstance(out, dict):
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in out]
        if missing:
            raise DataError(f"dataset factory {name} returned a dict without {', '.join(missing)}")
        out = [out[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        out = _split_arrays(out[0], name, "train") + _split_arrays(out[1], name, "test")
    elif not (isinstance(out, (tuple, list)) and len(out) == 4):
        raise DataError(f"dataset factory {name} returned {type(out).__name__}; expected (x_train, y_train, "
                        "x_test, y_test), a dict with those keys, or (train, test) datasets")
    arrays = [np.asarray(t.detach().cpu() if torch.is_tensor(t) else t) for t in out]
    return [typed_array(a) for a in arrays], None


DATASETS = {"mnist1d": _mnist1d, "cifar10": _cifar10, "npz": _npz, "synthetic": _synthetic,
            "regression": _regression, "modular": _modular}
# the options each built-in dataset reads, with their types and ranges: any other is a typo, refused
# rather than recorded unused; a value from a file cannot size more than a test-sized dataset
_AUGMENT = Option("bool")
OPTIONS = {"mnist1d": {},
           "cifar10": {"root": Option("str"), "augment": _AUGMENT},
           "npz": {"path": Option("str"), "sha256": Option("str"), "augment": _AUGMENT},
           "synthetic": {"n_train": Option("int", 2, 10 ** 6), "n_test": Option("int", 1, 10 ** 6),
                         "classes": Option("int", 2, 10 ** 4), "shape": Option("ints", 1, 4096, length=3),
                         "seed": Option("int", 0, 2 ** 63 - 1), "noise": Option("float", 0, 1e6),
                         "augment": _AUGMENT},
           "regression": {"n_train": Option("int", 2, 10 ** 7), "n_test": Option("int", 1, 10 ** 7),
                          "features": Option("int", 1, 4096), "noise": Option("float", 0, 1e6),
                          "seed": Option("int", 0, 2 ** 63 - 1)},
           "modular": {"modulus": Option("int", 2, 1000), "train_fraction": Option("float", 0, 1),
                       "seed": Option("int", 0, 2 ** 63 - 1)}}
SYNTHETIC_MAX_VALUES = 1 << 27  # 512 MiB of float32 inputs


def register_dataset(name: str):
    """Decorator adding a dataset: ``fn(options) -> ([x_train, y_train, x_test, y_test], num_classes)``."""
    def deco(fn):
        DATASETS[name] = fn
        return fn
    return deco


def import_object(path: str, error, what: str):
    """Resolve ``package.module:attribute``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise error(f"unknown {what} {path!r}")
    if module_name.startswith("."):  # importlib needs a package to resolve it against
        raise error(f"cannot import {what} module {module_name!r}: a relative module name; give it from the "
                    "top, as in package.module:name")
    try:
        module = _import_module(module_name)
    except ImportError as e:
        raise error(f"cannot import {what} module {module_name!r}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise error(f"module {module_name!r} has no {what} factory {attr!r}") from None


def _import_module(module_name: str):
    """Import a user's module; like ``python -m``, also look in the current folder (the ``landscape``
    console script does not put it on ``sys.path``)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e2:
            sys.path.remove(cwd)
            if e2.name == e.name:  # not in the current folder either: report the first failure
                raise e from None
            raise


def as_data(data, device=None, task=None):
    """A :class:`Data` or :class:`StreamData` from what a user holds: one of those, the four tensors or
    arrays ``(x_train, y_train, x_test, y_test)``, or two data sources ``(train, test)`` (DataLoaders or
    functions returning iterables of batches). Integer labels are classes (their number is the
    largest label + 1), float targets are values, integer inputs are token ids. ``device``: where
    in-memory tensors go (None: where they are); ``task``: the task scoring them (None: the data's,
    classification by default).

    Example::

        data = as_data((x_train, y_train, x_test, y_test), task="regression")
    """
    if isinstance(data, (tuple, list)) and len(data) == 2:
        data = StreamData(*data)
    if not isinstance(data, (Data, StreamData)):
        if not (isinstance(data, (tuple, list)) and len(data) == 4):
            raise DataError(f"data is a {type(data).__name__}; give a landscape Data, the four tensors "
                            "(x_train, y_train, x_test, y_test) or two data sources (train, test)")
        try:
            tensors = [torch.as_tensor(np.asarray(t) if not torch.is_tensor(t) else t) for t in data]
        except (TypeError, ValueError, RuntimeError):
            kinds = ", ".join(type(t).__name__ for t in data)
            raise DataError(f"data (x_train, y_train, x_test, y_test) holds {kinds}; give tensors or arrays (two "
                            "data sources go as (train, test))") from None
        check_splits(tensors, "data")
        check_finite_values(tensors, "data")
        tensors, classes = typed(tensors)
        data = Data(*tensors, classes)
    if task is not None:
        data = replace(data, task=task) if isinstance(data, Data) else StreamData(data.train, data.test, task, data.sizes)
    return data if device is None else data.to(device)


def check_splits(tensors, name: str) -> None:
    """Refuse inputs and labels of different lengths, empty splits, train and test inputs of
    different shapes."""
    x_tr, y_tr, x_te, y_te = tensors
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te) or len(x_tr) < 2 or len(x_te) < 1:
        raise DataError(f"{name}: {len(x_tr)} train inputs with {len(y_tr)} labels and {len(x_te)} test inputs "
                        f"with {len(y_te)} labels; give equally long inputs and labels, none empty")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{name}: train inputs {tuple(x_tr.shape[1:])} and test inputs {tuple(x_te.shape[1:])} "
                        "differ in shape")


def check_finite_values(tensors, name: str, rows_per_check: int = 4096) -> None:
    """Refuse float inputs or targets holding NaN or an infinity: one such sample makes a whole
    split's loss NaN (training diverges at its first step, every point of a surface is NaN). Checked a
    few thousand rows at a time (no mask as large as the data)."""
    for what, t in zip(("x_train", "y_train", "x_test", "y_test"), tensors):
        if not (torch.is_tensor(t) and t.is_floating_point() and t.numel()):
            continue
        rows = t.reshape(len(t), -1)
        bad = [start + i for start in range(0, len(rows), rows_per_check)
               for i in (~torch.isfinite(rows[start:start + rows_per_check])).any(1).nonzero().flatten().tolist()]
        if bad:
            raise DataError(f"{name}: {what} holds NaN or infinite values in {len(bad)} sample"
                            f"{'s' * (len(bad) != 1)} (the first: {bad[0]}); no loss can be computed over them")


def typed(tensors) -> tuple:
    """``([x_train, y_train, x_test, y_test], num_classes)`` with float inputs as float32 and integer
    inputs (token ids) as int64, float targets as float32 and integer targets (classes) as int64.
    ``num_classes``: the number of classes (the largest label + 1; for labels per position of token
    inputs, a language model's, the largest token of inputs or labels + 1), or of outputs per sample for
    float targets."""
    x_tr, y_tr, x_te, y_te = (torch.as_tensor(t) for t in tensors)
    fix = lambda t: t.float() if t.is_floating_point() else t.long()  # noqa: E731
    x_tr, y_tr, x_te, y_te = fix(x_tr), fix(y_tr), fix(x_te), fix(y_te)
    if y_tr.is_floating_point():
        classes = int(np.prod(y_tr.shape[1:])) if y_tr.ndim > 1 else 1
    else:
        classes = int(max(y_tr.max(), y_te.max())) + 1
        if not x_tr.is_floating_point() and y_tr.ndim > 1:  # next-token labels: the vocabulary of both
            classes = max(classes, int(max(x_tr.max(), x_te.max())) + 1)
    return [x_tr, y_tr, x_te, y_te], classes


def _whole_labels_as_classes(tensors: list) -> list:
    """For classification: float labels (N,) that are all whole non-negative numbers (``3.0``, as a
    table or a float dataset gives them) read as class labels."""
    x_tr, y_tr, x_te, y_te = tensors
    ys = (y_tr, y_te)
    if all(y.is_floating_point() and y.ndim == 1 for y in ys) and \
            all(bool((y == y.round()).all() and (y >= 0).all()) for y in ys):
        return [x_tr, y_tr.long(), x_te, y_te.long()]
    return tensors


def load_data(spec: DataSpec, device="cpu", task=None) -> Data:
    """The dataset ``spec`` names, on ``device``, scored by ``task`` (None: classification)."""
    if spec.name in DATASETS:
        if spec.name in OPTIONS:
            check_options(spec.options, OPTIONS[spec.name], f"dataset {spec.name!r}", DataError)
        arrays, num_classes = DATASETS[spec.name](spec.options)
    elif ":" in spec.name:
        arrays, num_classes = _user_factory(spec.name, spec.options)
    else:
        raise DataError(f"unknown dataset {spec.name!r}; built-in datasets: {', '.join(DATASETS)} "
                        "(or package.module:factory)")
    x_tr, y_tr, x_te, y_te = arrays
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise DataError(f"dataset {spec.name!r}: inputs and labels differ in length")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"dataset {spec.name!r}: train inputs {x_tr.shape[1:]} and test inputs "
                        f"{x_te.shape[1:]} differ in shape")
    if len(x_tr) < 2 or len(x_te) < 1:
        raise DataError(f"dataset {spec.name!r} is empty")
    augment = bool(spec.options.get("augment", False))
    if augment and x_tr.ndim != 4:
        raise DataError(f"dataset {spec.name!r}: augment (random crop and flip) needs images (N, C, H, W), "
                        f"got inputs of shape {tuple(x_tr.shape[1:])}")
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    check_finite_values(tensors, f"dataset {spec.name!r}")
    if num_classes is None and (task is None or task == "classification" or isinstance(task, Classification)):
        tensors = _whole_labels_as_classes(tensors)
    if num_classes is None:  # a dataset of values or tokens: the count follows from the arrays' types
        tensors, num_classes = typed(tensors)
    return Data(*tensors, num_classes=num_classes, augment=augment, task=task).to(device)
