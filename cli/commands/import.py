"""Build a trajectory file from checkpoint files saved by your own training, so that `landscape
plane`, `line`, `plot` and `explore` work on them.

Sources are checkpoint files or folders of them (.pt, .pth, .ckpt, .bin, .safetensors). A file holds a
state_dict, or a dict with one under "state_dict", "model_state_dict" or "model" (a Lightning
checkpoint, a training script's dict); "module." prefixes (DataParallel, AveragedModel) and a
wrapper's prefix (e.g. "model.") are removed. Files are read with torch.load(weights_only=True): a file
that needs code to load is refused. The model is rebuilt by name or import path (the file records it,
with the dataset, for later commands); every checkpoint must match it key for key and shape for shape.
A file's own "epoch" and "global_step" entries fill the run's epoch and step columns (else epoch is the
checkpoint's position).

Examples:
  landscape import ckpts/ --model mynets:make_net --dataset mynets:load_data --run sgd -o run.h5
  landscape import ckpts/sgd --run sgd --add swa/average ckpts/swa.pt --model cnn1d --dataset mnist1d -o run.h5
  landscape import lightning_logs/version_0/checkpoints --order epoch --model mynets:make_net --model-arg width=64 \\
      --dataset cifar10 --data-option root=~/data -o run.h5
"""
from __future__ import annotations

from landscape.data import DATASETS
from landscape.importer import ORDERS, import_checkpoints
from landscape.models import MODELS

from ..common import add_output_flags, parse_key_values, print_json

HELP = "build a trajectory file from saved checkpoints (.pt/.pth/.ckpt/.bin/.safetensors)"


def add_arguments(p) -> None:
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="checkpoint files or folders, for the run --run")
    p.add_argument("-o", "--out", default="run.h5", help="trajectory file to write")
    p.add_argument("--run", default="imported", help="run name of the SOURCE checkpoints (e.g. sgd)")
    p.add_argument("--add", nargs="+", action="append", metavar=("RUN", "SOURCE"),
                   help="RUN SOURCE [SOURCE ...]: a further run; repeat for more (e.g. --add swa/average swa.pt)")
    p.add_argument("--model", required=True,
                   help=f"{', '.join(MODELS)}, or package.module:factory (found on PYTHONPATH "
                        "or in the current folder)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="keyword argument of the model factory")
    p.add_argument("--dataset", required=True,
                   help=f"{', '.join(DATASETS)}, or package.module:factory returning train and test data")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE", help="dataset option")
    p.add_argument("--task", default=None,
                   help="what scores the model: classification (the default), regression, language-model, "
                        "model-loss or package.module:obj; recorded for every later evaluation")
    p.add_argument("--order", choices=ORDERS, default="name",
                   help="checkpoint order within a run: by path (natural sort), by the epoch each file records, "
                        "or as given")
    p.add_argument("--evaluate", action="store_true",
                   help="also record train/test loss and error of every checkpoint (as landscape train does)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_output_flags(p)


def run(args) -> int:
    from landscape.errors import ConfigError
    runs = {}
    if args.sources:
        runs[args.run] = list(args.sources)
    for entry in args.add or []:
        if len(entry) < 2:
            raise ConfigError(f"--add {entry[0]} needs at least one SOURCE after the run name")
        if entry[0] in runs:
            raise ConfigError(f"run {entry[0]!r} is given twice")
        runs[entry[0]] = entry[1:]
    if not runs:
        raise ConfigError("no checkpoints given: name files or folders (and/or --add RUN SOURCE ...)")
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(desc="import", unit="ckpt", leave=False)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = import_checkpoints(runs, args.out, args.model, args.dataset,
                                     model_kwargs=parse_key_values(args.model_arg, "--model-arg"),
                                     data_options=parse_key_values(args.data_option, "--data-option"),
                                     order=args.order, overwrite=args.overwrite, evaluate=args.evaluate,
                                     task=args.task,
                                     progress=progress if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print_json(summary)
        return 0
    print(f"wrote {summary['path']}")
    for name, r in summary["runs"].items():
        print(f"  {name:<16} {r['checkpoints']} checkpoints")
    return 0
