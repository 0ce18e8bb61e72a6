"""Flat parameter vectors <-> modules.

A :class:`Layout` records, for one architecture, the name, shape and offset of every parameter
and every buffer. Every other part of the library (the store, training, geometry, the evaluator)
goes through it, so "row i of /runs/sgd/params" always means the same weights.

Example::

    layout = Layout.of(model)
    w = layout.params_to_vector(model)        # (P,) float32
    layout.vector_to_params(w * 0.5, model)   # load it back
    named = layout.split_params(w)            # {name: view with its shape}, for functional_call
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from math import prod

import torch
from torch import nn

from .errors import ModelError


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple
    offset: int
    dtype: str = "float32"  # the module's own dtype, so integer buffers load back as integers
    # a parameter the model does not train (requires_grad=False): directions, Hessians and the
    # sharpness ball leave it where it is; not part of the architecture, so not compared
    frozen: bool = field(default=False, compare=False)

    @property
    def numel(self) -> int:
        return prod(self.shape)


def _entries(named) -> tuple:
    out, offset = [], 0
    for name, t in named:
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise ModelError(f"{name} is not initialized yet (a lazy module): run the model once on a batch first")
        out.append(Entry(name, tuple(t.shape), offset, str(t.dtype).replace("torch.", ""),
                         frozen=isinstance(t, nn.Parameter) and not t.requires_grad))
        offset += t.numel()
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    params: tuple  # of Entry, in module.named_parameters() order
    buffers: tuple  # of Entry, in module.named_buffers() order

    @classmethod
    def of(cls, module: nn.Module) -> "Layout":
        layout = cls(_entries(module.named_parameters()), _entries(module.named_buffers()))
        # (with_frozen says what is frozen: nothing, for a model that trains nothing)
        return layout.with_frozen(layout.frozen) if layout.frozen else layout

    # sizes -----------------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(e.numel for e in self.params)

    @property
    def num_buffers(self) -> int:
        return sum(e.numel for e in self.buffers)

    # parameters the model trains -------------------------------------------------------------
    @property
    def frozen(self) -> list:
        """The names of the parameters the model does not train (``requires_grad=False``)."""
        return [e.name for e in self.params if e.frozen]

    @property
    def num_trained(self) -> int:
        """The number of values of the parameters the model trains."""
        return sum(e.numel for e in self.params if not e.frozen)

    def with_frozen(self, names) -> "Layout":
        """This layout with exactly the parameters ``names`` frozen (as a file's run records them); none
        when they are all of them (a model that trains nothing: ``requires_grad_(False)`` for an
        analysis, an EMA copy)."""
        names = set(names)
        if {e.name for e in self.params} <= names:
            names = set()
        return replace(self, params=tuple(replace(e, frozen=e.name in names) for e in self.params))

    def trainable_mask(self, device="cpu") -> torch.Tensor | None:
        """A (P,) float64 vector, 1 at every trained parameter's entries and 0 at frozen ones; None when
        the model trains every parameter."""
        if not self.frozen:
            return None
        mask = torch.ones(self.num_params, dtype=torch.float64, device=device)
        for e, sl in self.param_slices():
            if e.frozen:
                mask[sl] = 0.0
        return mask

    # serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def enc(entries):
            return [{"name": e.name, "shape": list(e.shape), "offset": e.offset, "dtype": e.dtype} for e in entries]
        return {"params": enc(self.params), "buffers": enc(self.buffers)}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        def dec(entries):
            return tuple(Entry(e["name"], tuple(e["shape"]), int(e["offset"]), e.get("dtype", "float32")) for e in entries)
        return cls(dec(d["params"]), dec(d["buffers"]))

    def check_module(self, module: nn.Module) -> None:
        """Raise ModelError naming the first parameter or buffer that does not match."""
        other = Layout.of(module)
        for kind, mine, theirs in (("parameter", self.params, other.params), ("buffer", self.buffers, other.buffers)):
            for a, b in zip(mine, theirs):
                if a.name != b.name or a.shape != b.shape:
                    raise ModelError(f"{kind} mismatch: layout has {a.name} {list(a.shape)}, "
                                     f"model has {b.name} {list(b.shape)}")
            if len(mine) != len(theirs):
                raise ModelError(f"{kind} count mismatch: layout has {len(mine)}, model has {len(theirs)}")

    # module <-> vector -----------------------------------------------------------------------
    def params_to_vector(self, module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])

    def buffers_to_vector(self, module: nn.Module) -> torch.Tensor:
        for name, b in module.named_buffers():
            check_exact_in_float32(name, b)
        bufs = [b.detach().reshape(-1).float() for b in module.buffers()]
        if not bufs:
            return torch.zeros(0, device=next(module.parameters()).device)
        return torch.cat(bufs)

    @torch.no_grad()
    def vector_to_params(self, vector: torch.Tensor, module: nn.Module) -> nn.Module:
        for p, e in zip(module.parameters(), self.params):
            p.copy_(vector[e.offset:e.offset + e.numel].view(e.shape))
        return module

    @torch.no_grad()
    def vector_to_buffers(self, vector: torch.Tensor, module: nn.Module) -> nn.Module:
        for b, e in zip(module.buffers(), self.buffers):
            b.copy_(vector[e.offset:e.offset + e.numel].view(e.shape).to(b.dtype))
        return module

    def load(self, module: nn.Module, params: torch.Tensor, buffers: torch.Tensor | None = None) -> nn.Module:
        """Load a checkpoint's parameter (and buffer) vectors into ``module``."""
        self.vector_to_params(params, module)
        if buffers is not None and self.buffers:
            self.vector_to_buffers(buffers, module)
        return module

    # vector -> named views (for torch.func.functional_call) ----------------------------------
    def split_params(self, vector: torch.Tensor) -> dict:
        """Named views into a (..., P) vector; leading batch dimensions are kept."""
        lead = vector.shape[:-1]
        return {e.name: vector[..., e.offset:e.offset + e.numel].reshape(tuple(lead) + e.shape) for e in self.params}

    def split_buffers(self, vector: torch.Tensor) -> dict:
        lead = vector.shape[:-1]
        out = {}
        for e in self.buffers:
            t = vector[..., e.offset:e.offset + e.numel].reshape(tuple(lead) + e.shape)
            out[e.name] = t if e.dtype.startswith("float") else t.to(getattr(torch, e.dtype))
        return out

    # structure used by geometry (filter normalization) --------------------------------------
    def param_slices(self):
        """Yield (entry, slice) for every parameter tensor."""
        for e in self.params:
            yield e, slice(e.offset, e.offset + e.numel)


# ----------------------------------------------------------------------------------------------
# live objects: wrapped modules and state_dicts

def copy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, also of a module that keeps a tensor computed from its parameters as a
    plain attribute (old-style ``nn.utils.weight_norm`` and ``spectral_norm`` keep the weight so, with its
    graph, which deepcopy refuses): such a tensor is copied detached, and the copy computes it again at
    its next forward as the module does."""
    memo = {id(v): v.detach().clone() for m in module.modules() for v in vars(m).values()
            if torch.is_tensor(v) and not v.is_leaf}
    return copy.deepcopy(module, memo)


def unwrap(module: nn.Module):
    """(the trained module inside wrappers, extra metrics): AveragedModel -> its ``module`` (and
    ``n_averaged``), DataParallel/DistributedDataParallel -> ``module``, torch.compile -> ``_orig_mod``."""
    from torch.optim.swa_utils import AveragedModel
    extra = {}
    while True:
        if isinstance(module, AveragedModel):
            extra.setdefault("n_averaged", int(module.n_averaged))
            module = module.module
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module, extra


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _model_entries(model: torch.nn.Module) -> list:
    """(name, tensor, required): every parameter and buffer; non-persistent buffers are not in a
    state_dict and keep the freshly built model's values."""
    persistent = set(model.state_dict().keys())
    out = [(n, t, True) for n, t in model.named_parameters()]
    out += [(n, t, n in persistent) for n, t in model.named_buffers()]
    return out


def check_exact_in_float32(name: str, buffer: torch.Tensor) -> None:
    """Refuse an integer buffer float32 cannot hold exactly (past 2**24): flat vectors, planes and
    files keep buffers as float32, and such a value would come back as another number."""
    if buffer.is_floating_point() or buffer.dtype == torch.bool or not buffer.numel():
        return
    if name.endswith("num_batches_tracked"):  # a step counter (16.7 M steps to reach it), not a weight
        return
    largest = int(buffer.detach().abs().max())
    if largest > 2 ** 24:
        raise ModelError(f"buffer {name!r} holds the integer {largest:,}, which float32 cannot hold exactly; "
                         "landscape keeps buffers as float32 (make it a Python attribute or a float buffer)")


def _tied_names(model: torch.nn.Module) -> dict:
    """Second names of tied tensors (an embedding shared with the output layer: a state_dict holds it
    under both names, ``named_parameters`` under the first): name -> the first name."""
    first, tied = {}, {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) in first:
            tied[name] = first[id(t)]
        else:
            first[id(t)] = name
    return tied


def match_state_dict(state: dict, model: torch.nn.Module, path, model_name: str = "the model") -> tuple:
    """Map a checkpoint's tensors onto ``model``'s parameters and buffers. Returns ``(params,
    buffers, extra)``: name -> tensor dicts in the model's order, and metrics found on the way
    (``n_averaged``). Raises ModelError naming the first key that does not match."""
    extra = {}
    state = dict(state)
    if "n_averaged" in state and any(k.startswith("module.") for k in state):  # AveragedModel
        extra["n_averaged"] = int(state.pop("n_averaged").item())
    stripped = {}
    for k, v in state.items():
        stripped.setdefault(_strip(k), v)
    entries = _model_entries(model)
    required = [n for n, _, req in entries if req]
    prefix = ""
    if required and not all(n in stripped for n in required):
        first = required[0]
        for k in stripped:  # a wrapper's prefix, e.g. "model." of a LightningModule
            if k.endswith("." + first):
                candidate = k[:-len(first)]
                if all(candidate + n in stripped for n in required):
                    prefix = candidate
                    break
    keys = {k[len(prefix):]: v for k, v in stripped.items() if k.startswith(prefix)}
    tied = _tied_names(model)
    for second, first in tied.items():  # a tied tensor saved under another of its names only
        if first not in keys and second in keys:  # (safetensors' save_model keeps one, by name)
            keys[first] = keys[second]
    where = f"checkpoint {path} does not match model {model_name!r}"
    for name, tensor, req in entries:
        if name not in keys:
            if not req:
                continue
            sample = ", ".join(list(keys)[:5]) + (", ..." if len(keys) > 5 else "")
            raise ModelError(f"{where}: key {name!r} {list(tensor.shape)} is missing from the checkpoint "
                             f"(its keys: {sample or 'none'})")
        if tuple(keys[name].shape) != tuple(tensor.shape):
            raise ModelError(f"{where}: key {name!r} has shape {list(keys[name].shape)} in the checkpoint, "
                             f"{list(tensor.shape)} in the model")
    known = {n for n, _, _ in entries}
    for k in keys:
        if k in tied and tied[k] in keys and not torch.equal(keys[k], keys[tied[k]]):
            raise ModelError(f"{where}: key {prefix + k!r} is tied to {prefix + tied[k]!r} in the model (one tensor), "
                             "but the checkpoint holds other values for it")
        if k not in known and k not in tied:
            raise ModelError(f"{where}: key {prefix + k!r} is not in the model")
    params = {n: keys[n] for n, _, _ in entries[:len(list(model.parameters()))]}
    buffers = {n: (keys[n] if n in keys else t) for n, t, _ in entries[len(params):]}
    for name, t in buffers.items():
        check_exact_in_float32(name, t)
    return params, buffers, extra
