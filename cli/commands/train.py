"""Train one or more methods from the same initialization and data order and record every
checkpoint to an HDF5 trajectory file. Defaults are the measured MNIST-1D recipe. The methods and
their options are described with their sources in docs/METHODS.md. SWAP runs its workers as real
processes when launched with torchrun, e.g. `torchrun --nproc_per_node 4 -m landscape train
--methods swap` (gloo on CPU, NCCL on GPU; rank 0 writes the file)."""
from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from dataclasses import fields

from landscape.config import GRAFTING_VARY, LOOKAHEAD_INNER_STATE, TrainConfig
from landscape.data import DataSpec
from landscape.errors import ConfigError
from landscape.models import ModelSpec
from landscape.train import METHODS, SwapThresholdWarning, train

from ..common import add_output_flags, parse_key_values, print_json, seed_int

HELP = "train SGD/SWA/SWAP/Lookahead/Filter Grafting and record the trajectory file"


def add_arguments(p) -> None:
    d = TrainConfig()
    p.add_argument("-o", "--out", default="run.h5", help="trajectory file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated methods, trained from one initialization ({', '.join(METHODS)})")
    p.add_argument("--model", default=d.model.name,
                   help="mlp, cnn1d, cnn1d-bn, resnet20, vgg16, or package.module:factory")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="keyword argument of the model factory")
    p.add_argument("--dataset", default=d.data.name, help="mnist1d, cifar10, npz, synthetic, or package.module:factory")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE",
                   help="dataset option, e.g. root=DIR and augment=true (cifar10), path=FILE (npz)")
    p.add_argument("--task", default=d.task, help="loss and metrics: classification, regression, language-model, model-loss, or package.module:obj")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epoch budget of every method")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="mini-batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="initial learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--lr-ratio", type=float, default=d.lr_ratio, help="sgd: final lr as a fraction of --lr")
    p.add_argument("--swa-start", type=int, default=None,
                   help=f"swa: first averaged epoch (default: 2/3 of --epochs, {d.swa_start} of {d.epochs})")
    p.add_argument("--swa-lr", type=float, default=d.swa_lr, help="swa: learning rate while averaging")
    p.add_argument("--swa-c", type=int, default=d.swa_c, help="swa: average every c epochs")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="ema: w_ema <- d w_ema + (1 - d) w after every SGD step")
    p.add_argument("--seed", type=seed_int, default=d.seed, help="seed of initialization and data order")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="also record every N steps (0: once per epoch)")
    g = p.add_argument_group("lookahead and lookahead-adam (Zhang et al. 2019)")
    g.add_argument("--lookahead-k", type=int, default=d.lookahead_k, help="inner steps between synchronizations")
    g.add_argument("--lookahead-alpha", type=float, default=d.lookahead_alpha,
                   help="slow step size in (0, 1]: phi <- phi + alpha (theta - phi)")
    g.add_argument("--lookahead-inner-state", default=d.lookahead_inner_state, choices=LOOKAHEAD_INNER_STATE,
                   help="inner momentum at a synchronization: keep, zero, or interpolate like the weights")
    g.add_argument("--lookahead-fast-from", type=int, default=d.lookahead_fast_from,
                   help="first epoch whose every inner step is recorded in <method>/fast (-1: epochs // 2, "
                        "the last epoch at the full learning rate)")
    g.add_argument("--lookahead-fast-epochs", type=int, default=d.lookahead_fast_epochs,
                   help="number of epochs recorded step by step (0: no fast run)")
    g.add_argument("--adam-lr", type=float, default=d.adam_lr,
                   help="lookahead-adam: initial learning rate of the inner Adam (sgd's schedule)")
    g = p.add_argument_group("swap (Gupta et al. 2020): budget at most phase-1 cap + workers x phase-2 epochs")
    g.add_argument("--swap-workers", type=int, default=d.swap_workers,
                   help="W workers; phase 1 uses batches of W x --batch-size")
    g.add_argument("--swap-phase1-lr", type=float, default=d.swap_phase1_lr, help="phase-1 (large-batch) learning rate")
    g.add_argument("--swap-threshold", type=float, default=d.swap_threshold,
                   help="training accuracy (%%) that ends phase 1")
    g.add_argument("--swap-phase1-epochs", type=int, default=d.swap_phase1_epochs,
                   help="phase-1 epoch cap (a warning if the threshold is not reached)")
    g.add_argument("--swap-phase2-lr", type=float, default=d.swap_phase2_lr,
                   help="phase-2 learning rate of every worker, decayed linearly toward 0 (epoch e of E at lr (1 - e/E), the last at lr/E)")
    g.add_argument("--swap-phase2-epochs", type=int, default=d.swap_phase2_epochs, help="phase-2 epochs of every worker")
    g = p.add_argument_group("grafting (Meng et al. 2020)")
    g.add_argument("--grafting-nets", type=int, default=d.grafting_nets,
                   help="N networks in a ring; net i receives from net i-1 after every epoch")
    g.add_argument("--grafting-vary", default=d.grafting_vary, choices=GRAFTING_VARY,
                   help="what differs between the nets: learning rate (the reference's rule), seed, or both")
    g.add_argument("--grafting-a", type=float, default=d.grafting_a, help="A in w = A/pi arctan(c (H_own - H_other)) + 0.5")
    g.add_argument("--grafting-c", type=float, default=d.grafting_c, help="c in the same rule")
    g.add_argument("--grafting-baseline", action=argparse.BooleanOptionalAction, default=d.grafting_baseline,
                   help="also train the same nets without grafting (runs grafting/baseline<i>)")
    add_output_flags(p)


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        model=ModelSpec(args.model, parse_key_values(args.model_arg, "--model-arg")),
        data=DataSpec(args.dataset, parse_key_values(args.data_option, "--data-option")),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        task=args.task,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, lr_ratio=args.lr_ratio,
        swa_start=args.swa_start,  # None: the library's default, 2/3 of --epochs
        swa_lr=args.swa_lr, swa_c=args.swa_c, ema_decay=args.ema_decay, seed=args.seed, device=args.device,
        checkpoint_every=args.checkpoint_every,
        lookahead_k=args.lookahead_k, lookahead_alpha=args.lookahead_alpha,
        lookahead_inner_state=args.lookahead_inner_state, lookahead_fast_from=args.lookahead_fast_from,
        lookahead_fast_epochs=args.lookahead_fast_epochs, adam_lr=args.adam_lr,
        swap_workers=args.swap_workers, swap_phase1_lr=args.swap_phase1_lr, swap_threshold=args.swap_threshold,
        swap_phase1_epochs=args.swap_phase1_epochs, swap_phase2_lr=args.swap_phase2_lr,
        swap_phase2_epochs=args.swap_phase2_epochs,
        grafting_nets=args.grafting_nets, grafting_vary=args.grafting_vary, grafting_a=args.grafting_a,
        grafting_c=args.grafting_c, grafting_baseline=args.grafting_baseline)


def _as_flags(message: str) -> str:
    """The configuration's field names in a message as this command's flags (swa_start -> --swa-start)."""
    names = "|".join(f.name for f in fields(TrainConfig) if f.name not in ("model", "data", "methods"))
    return re.sub(rf"\b({names})\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def run(args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SwapThresholdWarning)
        try:
            summary = train(config_from_args(args), args.out, overwrite=args.overwrite, quiet=args.quiet)
        except ConfigError as e:
            raise ConfigError(_as_flags(str(e))) from None
    for w in caught:  # our warnings as one line each; anything else as Python shows it
        if issubclass(w.category, SwapThresholdWarning):
            print(f"landscape: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if "rank" in summary:  # torchrun: rank 0 reports
        return 0
    if args.json:
        print_json(summary)
        return 0
    diverged = [r for r, m in summary["final"].items() if not math.isfinite(m["train_loss"])]
    if diverged:
        print(f"landscape: warning: training diverged (final train loss not finite) in {', '.join(diverged)}; "
              "try a smaller --lr", file=sys.stderr)
    print(f"wrote {summary['path']} in {summary['seconds']:.1f} s")
    for run_name, m in summary["final"].items():
        print(f"  {run_name:<16} epoch {m['epoch']:>6g}  train loss {m['train_loss']:.4f}  "
              + (f"test err {m['test_err']:.2f}%" if "test_err" in m else f"test loss {m['test_loss']:.4f}"))
    return 0
