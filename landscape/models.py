"""Architectures: ``mlp``, ``cnn1d``, ``cnn1d-bn``, ``resnet20``, ``vgg16``, or a user model by
import path ``package.module:factory`` (called with ``input_shape``, ``num_classes`` when it accepts
them, plus the user's keyword arguments).

Example::

    model = build_model(ModelSpec("cnn1d"), input_shape=(1, 40), num_classes=10)
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from math import prod

import torch
from torch import nn

from .data import import_object
from .errors import ModelError
from .options import Option, check_options


@dataclass(frozen=True)
class ModelSpec:
    name: str = "cnn1d"
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(d["name"], dict(d.get("kwargs", {})))


MLP_MAX_WEIGHTS = 1 << 28  # 1 GiB of float32 weights: a width from a file cannot ask for more


def mlp(input_shape, num_classes, hidden=(100, 100)):
    widths = [prod(input_shape), *hidden, num_classes]
    if sum(a * b for a, b in zip(widths, widths[1:])) > MLP_MAX_WEIGHTS:
        raise ModelError(f"mlp with hidden widths {list(hidden)} would hold more than {MLP_MAX_WEIGHTS:,} weights")
    layers, width = [nn.Flatten()], prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def _flat_size(features: nn.Module, input_shape) -> int:
    with torch.no_grad():
        features.eval()
        return features(torch.zeros(2, *input_shape)).flatten(1).shape[1]


def cnn1d(input_shape, num_classes, channels=25, batchnorm=False):
    """The MNIST-1D paper's CNN: three Conv1d layers of 25 channels (kernel 5/3/3, stride 2), ReLU,
    one linear layer. 5,210 parameters on MNIST-1D."""
    if len(input_shape) != 2:
        raise ModelError(f"cnn1d expects inputs shaped (channels, length), got {tuple(input_shape)}")
    cin, layers = input_shape[0], []
    for k in (5, 3, 3):
        layers.append(nn.Conv1d(cin, channels, k, stride=2, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm1d(channels))
        layers.append(nn.ReLU())
        cin = channels
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(*features, nn.Linear(_flat_size(features, input_shape), num_classes))


def cnn1d_bn(input_shape, num_classes, channels=25):
    return cnn1d(input_shape, num_classes, channels, batchnorm=True)


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + short


class PreResNet(nn.Module):
    """Pre-activation ResNet for 32x32 images (He et al. 2016), depth 6n+2."""

    def __init__(self, input_shape, num_classes, depth=20, width=16):
        super().__init__()
        if len(input_shape) != 3:
            raise ModelError(f"resnet20 expects images shaped (channels, H, W), got {tuple(input_shape)}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False)
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(PreActBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(out.mean((2, 3)))


def resnet20(input_shape, num_classes):
    return PreResNet(input_shape, num_classes, depth=20)


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(input_shape, num_classes):
    """VGG-16 without BatchNorm, CIFAR variant of the SWA paper's code (512-512 classifier, dropout)."""
    if len(input_shape) != 3:
        raise ModelError(f"vgg16 expects images shaped (channels, H, W), got {tuple(input_shape)}")
    layers, cin = [], input_shape[0]
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    features = nn.Sequential(*layers, nn.Flatten())
    return nn.Sequential(*features, nn.Dropout(), nn.Linear(_flat_size(features, input_shape), 512),
                         nn.ReLU(True), nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True),
                         nn.Linear(512, num_classes))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions <= t (plain matrix products, so
    that ``torch.func.vmap`` batches it over weights)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN x), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A small decoder-only transformer language model: token ids (n, T) -> next-token logits
    (n, T, vocab), learned position embeddings, ``layers`` pre-norm blocks."""

    def __init__(self, input_shape, num_classes, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        if len(input_shape) != 1 or dim % heads:
            raise ModelError(f"transformer expects token sequences (T,) and dim divisible by heads; got inputs "
                             f"{tuple(input_shape)}, dim {dim}, heads {heads}")
        context = input_shape[0]
        self.tokens, self.positions = nn.Embedding(num_classes, dim), nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, ids):
        x = self.tokens(ids.long()) + self.positions[:ids.shape[1]]
        return self.head(self.ln(self.blocks(x)))


MODELS = {"mlp": mlp, "cnn1d": cnn1d, "cnn1d-bn": cnn1d_bn, "resnet20": resnet20, "vgg16": vgg16,
          "transformer": Transformer}
# the keyword arguments each built-in model takes, with types and ranges (they may come from a file)
_WIDTH = 1 << 14
OPTIONS = {"mlp": {"hidden": Option("ints", 1, _WIDTH, length=16)},
           "cnn1d": {"channels": Option("int", 1, _WIDTH), "batchnorm": Option("bool")},
           "cnn1d-bn": {"channels": Option("int", 1, _WIDTH)},
           "resnet20": {}, "vgg16": {},
           "transformer": {"dim": Option("int", 1, 4096), "heads": Option("int", 1, 64), "layers": Option("int", 1, 64)}}


def register_model(name: str):
    """Decorator adding an architecture: ``fn(input_shape, num_classes, **kwargs) -> nn.Module``."""
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def build_model(spec: ModelSpec, input_shape, num_classes: int) -> nn.Module:
    """Build the model and check, with one forward pass, that it takes the data's inputs and
    returns one logit per class (``num_classes`` outputs per sample, or per position of a sequence)."""
    input_shape = tuple(input_shape)
    if spec.name in MODELS:
        factory = MODELS[spec.name]
        if spec.name in OPTIONS:
            check_options(spec.kwargs, OPTIONS[spec.name], f"model {spec.name!r}", ModelError)
    elif ":" in spec.name:
        factory = import_object(spec.name, ModelError, "model")
    else:
        raise ModelError(f"unknown model {spec.name!r}; built-in models: {', '.join(MODELS)} "
                         "(or package.module:factory)")
    kwargs = dict(spec.kwargs)
    try:
        params = inspect.signature(factory).parameters
        accepts_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, accepts_all = {}, True
    for key, value in (("input_shape", input_shape), ("num_classes", num_classes)):
        if key in params or accepts_all:
            kwargs.setdefault(key, value)
    try:
        model = factory(**kwargs)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot build model {spec.name!r}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    check_model_fits(model, spec.name, input_shape, num_classes)
    return model


def check_model_fits(model: nn.Module, name: str, input_shape, num_classes: int) -> None:
    """One forward pass on two zero inputs (float; integer token ids when the model refuses floats):
    the model must take them and return ``num_classes`` values per sample (or per position)."""
    was_training = model.training
    model.eval()
    p = next(model.parameters(), None)
    error = None
    try:
        with torch.no_grad():
            for dtype in (torch.float32, torch.long):
                try:
                    out = model(torch.zeros(2, *input_shape, dtype=dtype, device=p.device if p is not None else "cpu"))
                    break
                except Exception as e:
                    error = error or e
            else:
                raise ModelError(f"model {name!r} does not accept inputs of shape {list(input_shape)}: "
                                 f"{type(error).__name__}: {str(error).splitlines()[0]}")
    finally:
        model.train(was_training)
    if torch.is_tensor(out) and (out.ndim < 2 or out.shape[-1] != num_classes):
        raise ModelError(f"model {name!r} returns outputs of shape {list(out.shape[1:])}, "
                         f"expected {num_classes} values per sample (a classifier's logits, one per class; a "
                         "regression's outputs, one per target value)")
