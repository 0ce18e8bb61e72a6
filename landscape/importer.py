"""Build a trajectory file from checkpoint files you already have (``landscape import``).

Accepted files: ``.pt``/``.pth``/``.ckpt``/``.bin`` holding a state_dict, ``{"state_dict": ...}``,
``{"model_state_dict": ...}`` or ``{"model": ...}`` (a Lightning checkpoint, a training script's
dict), and ``.safetensors``. Pickled files are read with ``torch.load(weights_only=True)``: a file
that needs code to load (a whole pickled model, a custom class) is refused with the name of what it
needs, since unpickling it could run anything. Keys may carry the ``module.`` prefix of
DataParallel/DistributedDataParallel/AveragedModel (an AveragedModel's ``n_averaged`` is recorded as a
metric), torch.compile's ``_orig_mod.``, or a wrapper's prefix (``model.`` of a LightningModule).

Checkpoints of a run are ordered by path (natural sort: ``ep2`` before ``ep10``), by the epoch
recorded in them, or as given. A file's ``epoch`` and ``global_step``/``step`` entries, when present, fill
the run's ``epoch`` and ``step`` columns; otherwise epoch is the checkpoint's position in the order.

Example::

    import_checkpoints({"sgd": ["ckpts/"]}, "run.h5", model="mynets:make_net", data="mynets:load_data")
"""
from __future__ import annotations

import json
import math
import pickle
import re
import struct
from pathlib import Path

import torch

from . import __version__
from .data import load_data
from .errors import CheckpointError, FileFormatError
from .models import build_model
from .params import Layout, match_state_dict
from .recorder import check_run_name, data_spec, model_spec, recorded_task
from .store import TrajectoryWriter
from .store.files import prepare_output

SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
STATE_KEYS = ("state_dict", "model_state_dict", "model")
ORDERS = ("name", "epoch", "given")


def natural_key(path) -> list:
    """``ep2.pt`` < ``ep10.pt``: runs of digits compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(path)) if t]


def find_checkpoints(sources) -> list:
    """Files given, plus the checkpoint files (by suffix) directly inside folders given (in natural
    order of names). A missing, unreadable or empty source is an error."""
    files = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            try:
                found = [p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()]
            except OSError as e:
                raise FileFormatError(f"cannot read folder {path}: {e.strerror or e}") from None
            if not found:
                raise FileFormatError(f"folder {path} holds no checkpoint files ({', '.join(SUFFIXES)})")
            files += sorted(found, key=natural_key)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise FileFormatError(f"{path} is neither a file nor a folder")
        else:
            raise FileFormatError(f"checkpoint {path} does not exist")
    if not files:
        raise FileFormatError("no checkpoint files given")
    return files


# -- reading one file --------------------------------------------------------------------------

def _number(value):
    """An epoch or step a checkpoint records: a finite number (NaN or infinity: not recorded)."""
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _parsed(text):
    """A number written as text (safetensors metadata holds strings), or None."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            continue
    return None


def _needs_code(message: str) -> str | None:
    """What a pickle refused by ``weights_only=True`` wanted to import (None: it was not that)."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return m.group(1)
    return "" if re.search(r"Unsupported (global|class)", message) else None


def _read_safetensors(path: Path):
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise FileFormatError(f"reading {path.name} needs the safetensors package "
                              "(pip install 'landscape[safetensors]')") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"cannot read checkpoint {path}: not a safetensors file ({_first_line(e)})") from None
    meta = {}
    try:  # the JSON header's __metadata__ may carry epoch/step as strings
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n)).get("__metadata__") or {}
    except (ValueError, OSError, struct.error, TypeError, AttributeError):
        header = {}
    for key in ("epoch", "step", "global_step"):  # each on its own: one that does not parse leaves the others
        value = _number(_parsed(header.get(key)))
        if value is not None:
            meta[key] = value
    return tensors, meta


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_checkpoint(path) -> tuple:
    """``(state_dict, meta)``: the tensors of one file and its ``epoch``/``step`` if it records them."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        tensors, meta = _read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            what = _needs_code(str(e))
            if what is None:
                m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
                reason = m.group(1).strip() if m else _first_line(e)
                raise FileFormatError(f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                                      f"(unpickling failed: {reason})") from None
            raise FileFormatError(
                f"checkpoint {path} needs code to load{f' ({what})' if what else ''}; refused, because "
                "unpickling it could run anything (files are read with torch.load(weights_only=True)). "
                "Save the model's state_dict instead: torch.save(model.state_dict(), PATH)") from None
        except (OSError, IsADirectoryError) as e:
            raise FileFormatError(f"cannot read checkpoint {path}: {e.strerror or _first_line(e)}") from None
        except Exception as e:  # zip errors, truncated files, not a torch file at all
            raise FileFormatError(f"cannot read checkpoint {path}: not a PyTorch checkpoint "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
        tensors, meta = _state_dict_of(obj, path)
    return tensors, meta


def _state_dict_of(obj, path: Path):
    if not isinstance(obj, dict):
        raise FileFormatError(f"checkpoint {path} holds {type(obj).__name__}, not a state_dict")
    meta = {}
    for key, name in (("epoch", "epoch"), ("global_step", "step"), ("step", "step")):
        value = _number(obj.get(key))
        if value is not None:
            meta.setdefault(name, value)
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return dict(obj), {}
    for key in STATE_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and any(torch.is_tensor(v) for v in inner.values()):
            return {k: v for k, v in inner.items() if torch.is_tensor(v)}, meta
    keys = ", ".join(map(str, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
    raise FileFormatError(f"checkpoint {path} holds a dict without a state_dict (keys: {keys}); expected a "
                          f"state_dict or a dict with one under {', '.join(repr(k) for k in STATE_KEYS)}")


def _vector(tensors: dict, width: int) -> torch.Tensor:
    if not tensors:
        return torch.zeros(width)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors.values()])


# -- the whole import --------------------------------------------------------------------------

def import_checkpoints(runs: dict, out, model, data, *, model_kwargs=None, data_options=None,
                       order: str = "name", overwrite: bool = False, evaluate: bool = False,
                       task=None, config=None, progress=None) -> dict:
    """Write ``out`` with one run per entry of ``runs`` (``{run name: [files or folders]}``); ``task``
    (a name, as for :class:`~landscape.recorder.Recorder`) scores the model, in ``evaluate`` and in
    every later evaluation of the file.

    Returns a summary ``{"path", "runs": {run: {"checkpoints", "files"}}}``. On any bad input nothing
    is left behind: no ``out``, no ``out.partial``. ``progress(done, total)`` is called per file."""
    if order not in ORDERS:
        raise CheckpointError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    mspec, dspec = model_spec(model, model_kwargs), data_spec(data, data_options)
    task_name, task = recorded_task(task, dict(config or {}))
    names = []
    for run in runs:
        check_run_name(run, names)
        names.append(run)
    files = {run: find_checkpoints(sources) for run, sources in runs.items()}
    sources = [s for srcs in runs.values() for s in srcs] + [p for paths in files.values() for p in paths]
    if isinstance((data_options or {}).get("path"), str):  # a dataset file (npz)
        sources.append(data_options["path"])
    out = prepare_output(out, overwrite, inputs=sources)
    d = load_data(dspec, "cpu", task)
    reference = build_model(mspec, d.input_shape, d.num_classes)
    layout = Layout.of(reference)
    if order == "name":
        files = {run: sorted(paths, key=natural_key) for run, paths in files.items()}
    elif order == "epoch":
        files = {run: _by_epoch(paths) for run, paths in files.items()}
    file_config = dict(config or {}, model=mspec.to_dict(), data=dspec.to_dict(), source="import",
                       num_classes=d.num_classes, input_shape=list(d.input_shape), landscape_version=__version__,
                       imported={run: [str(p) for p in paths] for run, paths in files.items()}, order=order)
    if task_name is not None:
        file_config["task"] = task_name
    total, done = sum(len(p) for p in files.values()), 0
    evaluate_fn = None
    if evaluate:
        from .evaluate import evaluate_model as evaluate_fn
    with TrajectoryWriter(out, file_config, layout, overwrite=overwrite) as writer:
        for run, paths in files.items():
            for i, path in enumerate(paths):
                state, meta = read_checkpoint(path)
                params, buffers, extra = match_state_dict(state, reference, path, mspec.name)
                metrics = dict(extra)
                if evaluate_fn is not None:
                    layout.load(reference, _vector(params, layout.num_params), _vector(buffers, layout.num_buffers))
                    metrics.update(evaluate_fn(reference, d, int(file_config.get("eval_batch_size", 1000))))
                epoch = meta.get("epoch", i)
                writer.append(run, _vector(params, layout.num_params), _vector(buffers, layout.num_buffers),
                              epoch=float(epoch), step=int(meta.get("step", -1)), **metrics)
                if writer.unsaved >= writer.MEMORY_BYTES:  # on the disk: memory does not grow with the runs
                    writer.flush()
                done += 1
                if progress is not None:
                    progress(done, total)
            writer.set_attrs(run, files=[str(p) for p in paths])
    return {"path": str(out), "runs": {run: {"checkpoints": len(p), "files": [str(x) for x in p]}
                                       for run, p in files.items()}}


def _by_epoch(paths: list) -> list:
    keyed = []
    for path in paths:
        _, meta = read_checkpoint(path)
        if "epoch" not in meta:
            raise CheckpointError(f"--order epoch: checkpoint {path} records no epoch; order by name instead")
        keyed.append((meta["epoch"], meta.get("step", -1), natural_key(path), path))
    return [k[-1] for k in sorted(keyed, key=lambda k: k[:3])]
