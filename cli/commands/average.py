"""Add averaged runs made from recorded checkpoints, without training again: SWA over any window of a
run, the average of its last k checkpoints, or an exponential moving average. Each window's rows are
folded into torch.optim.swa_utils.AveragedModel one by one (--uniform: the running mean; --ema D:
w <- D w + (1 - D) row, starting from the first row); every intermediate average becomes a checkpoint
with BatchNorm statistics recomputed on the training set and train/test metrics. The output is a
new trajectory file holding every run of FILE plus the averaged runs (avg/RUN/uniform_A_B,
avg/RUN/ema_D_A_B: rows A to B-1), ready for plane, line, sharpness and plot.

A window is RUN (every row) or RUN:START:STOP, Python slice bounds over the run's rows, negative
allowed, either bound may be empty.

Examples:
  landscape average run.h5 --from sgd:100: --uniform -o run+avg.h5          # SWA from epoch 100 on
  landscape average run.h5 --from sgd:-10: --uniform -o run+lawa.h5         # the last 10 checkpoints
  landscape average run.h5 --from sgd --ema 0.9 0.97 --uniform -o run+ema.h5
"""
from __future__ import annotations

from landscape.average import Average, Window, add_averages, plan
from landscape.errors import ConfigError
from landscape.store.files import prepare_output

from ..common import add_output_flags, add_trust_arguments, open_trusted_trajectory, print_json

HELP = "add averaged runs (uniform windows, EMA) made from recorded checkpoints"


def add_arguments(p) -> None:
    p.add_argument("file", help="trajectory file (.h5)")
    p.add_argument("--from", dest="windows", action="append", required=True, metavar="RUN[:START:STOP]",
                   help="the rows to average (repeat for several windows)")
    p.add_argument("--uniform", action="store_true", help="the running mean of the window (SWA)")
    p.add_argument("--ema", nargs="+", type=float, default=[], metavar="DECAY",
                   help="exponential moving averages with these decays (per checkpoint)")
    p.add_argument("--name", default=None, help="name of the new run (only with one window and one averaging)")
    p.add_argument("-o", "--out", required=True, help="trajectory file to write (FILE's runs plus the averages)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch of the BatchNorm recompute and the metrics (default: the run's eval batch size)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_output_flags(p)
    add_trust_arguments(p)


def averages_of(args) -> list:
    modes = (["uniform"] if args.uniform else []) + [("ema", d) for d in args.ema]
    if not modes:
        raise ConfigError("say how to average: --uniform and/or --ema DECAY")
    out = []
    for text in args.windows:
        w = Window.parse(text)
        for m in modes:
            out.append(Average(w, "uniform") if m == "uniform" else Average(w, "ema", m[1]))
    if args.name is not None:
        if len(out) != 1:
            raise ConfigError(f"--name names one new run; this command makes {len(out)}")
        out = [Average(out[0].window, out[0].mode, out[0].decay, args.name)]
    if args.batch_size is not None and args.batch_size < 2:
        raise ConfigError(f"batch size must be at least 2, got {args.batch_size}")
    return out


def run(args) -> int:
    averages = averages_of(args)
    traj = open_trusted_trajectory(args)
    jobs = plan(traj, averages)
    prepare_output(args.out, args.overwrite, inputs=(traj.path,))
    res = add_averages(traj, averages, args.out, device=args.device, overwrite=args.overwrite,
                       quiet=args.quiet, batch_size=args.batch_size)
    if args.json:
        print_json(res)
        return 0
    print(f"wrote {res['path']}")
    for (a, rows, name) in jobs:
        m = res["runs"][name]
        print(f"  {name:<34} {len(rows):>4} checkpoints  train loss {m['train_loss']:.4f}  test err {m['test_err']:.2f} %")
    return 0
