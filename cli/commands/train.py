"""Train one or more methods from the same initialization and data order and record every
checkpoint to an HDF5 trajectory file. Defaults are the measured MNIST-1D recipe."""
from __future__ import annotations

from landscape.config import TrainConfig
from landscape.data import DataSpec
from landscape.models import ModelSpec
from landscape.train import METHODS, train

from ..common import add_output_flags, parse_key_values, print_json

HELP = "train SGD/SWA/... and record the trajectory file"


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
    p.add_argument("--epochs", type=int, default=d.epochs, help="epoch budget of every method")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="mini-batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="initial learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--lr-ratio", type=float, default=d.lr_ratio, help="sgd: final lr as a fraction of --lr")
    p.add_argument("--swa-start", type=int, default=d.swa_start, help="swa: first averaged epoch")
    p.add_argument("--swa-lr", type=float, default=d.swa_lr, help="swa: learning rate while averaging")
    p.add_argument("--swa-c", type=int, default=d.swa_c, help="swa: average every c epochs")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of initialization and data order")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="also record every N steps (0: once per epoch)")
    add_output_flags(p)


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        model=ModelSpec(args.model, parse_key_values(args.model_arg, "--model-arg")),
        data=DataSpec(args.dataset, parse_key_values(args.data_option, "--data-option")),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, lr_ratio=args.lr_ratio, swa_start=args.swa_start,
        swa_lr=args.swa_lr, swa_c=args.swa_c, seed=args.seed, device=args.device,
        checkpoint_every=args.checkpoint_every)


def run(args) -> int:
    summary = train(config_from_args(args), args.out, overwrite=args.overwrite, quiet=args.quiet)
    if args.json:
        print_json(summary)
        return 0
    print(f"wrote {summary['path']} in {summary['seconds']:.1f} s")
    for run_name, m in summary["final"].items():
        print(f"  {run_name:<16} epoch {m['epoch']:>6g}  train loss {m['train_loss']:.4f}  "
              f"test err {m['test_err']:.2f}%")
    return 0
