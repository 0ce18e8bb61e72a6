"""Bad input to plane, line, plot, explore, import, info and demo: one `landscape: error:` line, exit
status 2, before anything is computed, and no output (nor `.partial`) left behind. An output that is
one of the command's inputs is refused even with --overwrite. An interrupted surface says what it kept."""
import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape.cli.common import seed_int
from landscape.cli.main import main
from landscape.data import DataSpec, load_data
from landscape.errors import DataError
from landscape.evaluate import Evaluator
from landscape.geometry import Plane
from landscape.store import open_surface, open_trajectory
from landscape.surface import MAX_POINTS, compute_surface

from _cli import nothing_left, one_line_error

THREE = ("sgd", "swa/average", "swa/iterates:0")
PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def surfaces(tmp_path_factory, tiny_run):
    """A 3 x 3 plane and a 3-point line of the tiny run."""
    d = tmp_path_factory.mktemp("surfaces")
    traj = open_trajectory(tiny_run)
    plane = d / "plane.h5"
    compute_surface(traj, Plane.through(traj, *THREE), (3, 3), out=plane, quiet=True, points_per_call=9)
    line = d / "line.h5"
    assert main(["line", str(tiny_run), "sgd", "swa/average", "--points", "3", "-o", str(line), "--quiet"]) == 0
    return plane, line


# ---------------------------------------------------------------------------------------------
# plane and line: options

SURFACE_CASES = [
    # too many points: refused up front, with the count and the cap
    (["plane", "{run}", *THREE, "--grid", "100000", "100000"], ["10,000,000,000 points", f"{MAX_POINTS:,}"]),
    (["plane", "{run}", *THREE, "--grid", "-3", "-3"], ["no points"]),
    (["line", "{run}", "sgd", "swa/average", "--points", "10000000000"], ["10,000,000,000 points"]),
    (["line", "{run}", "--ray-from", "sgd", "--rays", "100000", "--points", "100000"], ["10,000,000,000 points"]),
    # evaluation options no computation can use
    (["plane", "{run}", *THREE, "--batch-size", "0"], ["batch size", "at least 1"]),
    (["plane", "{run}", *THREE, "--batch-size", "-5"], ["batch size", "at least 1"]),
    (["line", "{run}", "sgd", "swa/average", "--weight-decay", "-1"], ["weight decay", "non-negative"]),
    (["line", "{run}", "sgd", "swa/average", "--weight-decay", "nan"], ["weight decay"]),
    (["plane", "{run}", *THREE, "--bn-samples", "0"], ["BatchNorm samples", "at least 2"]),
    (["plane", "{run}", *THREE, "--bn-batch-size", "0"], ["BatchNorm batch size", "at least 2"]),
    (["plane", "{run}", *THREE, "--points-per-call", "0"], ["points per call", "at least 1"]),
    (["plane", "{run}", "--origin", "sgd", "--hessian", "--hessian-samples", "0"], ["--hessian-samples", "at least 1"]),
    (["plane", "{run}", "--origin", "sgd", "--hessian", "--hessian-samples", "-1"], ["--hessian-samples"]),
    (["plane", "{run}", "--origin", "sgd", "--hessian", "--hessian-iterations", "0"], ["--hessian-iterations"]),
    # options that do not apply
    (["line", "{run}", "--ray-from", "sgd", "--range", "0", "1"], ["--range applies only to"]),
    (["line", "{run}", "sgd", "swa/average", "--rays", "3", "--seed", "5"], ["--rays applies only to --ray-from"]),
    (["line", "{run}", "sgd", "swa/average", "--seed", "5"], ["--seed applies only to --ray-from"]),
    (["line", "{run}", "sgd", "swa/average", "--max-distance", "2"], ["--max-distance applies only to --ray-from"]),
    (["line", "{run}", "sgd", "swa/average", "--filter-norm"], ["--filter-norm applies only to --ray-from"]),
    (["plane", "{run}", *THREE, "--seed", "7"], ["--seed applies only to --random and --hessian"]),
    (["plane", "{run}", *THREE, "--no-filter-norm"], ["--no-filter-norm applies only to --random"]),
    (["plane", "{run}", *THREE, "--ignore", "none"], ["--ignore applies only to --random"]),
    (["plane", "{run}", "--origin", "sgd", "--random", "--hessian-iterations", "3"], ["--hessian-iterations"]),
    (["plane", "{run}", "--origin", "sgd", "--random", "--margin", "0.1"], ["--margin applies only to"]),
    (["plane", "{run}", *THREE, "--xrange", "0", "1", "--yrange", "0", "1", "--margin", "0.1"],
     ["--margin", "no effect"]),
    (["plane", "{run}", *THREE, "--bn", "stored", "--bn-samples", "10"],
     ["--bn-samples applies only to --bn recompute"]),
    (["plane", "{run}", *THREE, "--export-out", "{tmp}/e.h5"], ["--export-out applies only to --export"]),
    (["line", "{run}", "--ray-from", "sgd", "--export", "loss-landscape"], ["rays"]),
    # outputs that are inputs, even with --overwrite
    (["plane", "{run}", *THREE, "-o", "{run}", "--overwrite"], ["is the input"]),
    (["line", "{run}", "sgd", "swa/average", "-o", "{run}", "--overwrite"], ["is the input"]),
    (["line", "{run}", "sgd", "{copy}:sgd:0", "-o", "{copy}", "--overwrite"], ["is the input"]),
    (["plane", "{run}", *THREE, "--export", "loss-landscape", "--export-out", "{run}", "--overwrite"],
     ["is the input"]),
    (["plane", "{run}", *THREE, "--export", "loss-landscape", "--export-out", "{tmp}/out.h5"],
     ["is the surface file"]),
]


@pytest.mark.parametrize("args, words", SURFACE_CASES)
def test_surface_options_are_one_line_errors(tiny_run, tmp_path, capsys, monkeypatch, args, words):
    import landscape.surface
    monkeypatch.setattr(landscape.surface, "_fill", lambda *a, **k: pytest.fail("computed despite bad input"))
    monkeypatch.setattr(Plane, "hessian", classmethod(lambda *a, **k: pytest.fail("Hessian despite bad input")))
    copy = tmp_path / "copy.h5"
    shutil.copy(tiny_run, copy)
    argv = [a.format(run=tiny_run, tmp=tmp_path, copy=copy) for a in args]
    if "-o" not in argv:
        argv += ["-o", tmp_path / "out.h5"]
    sha = open_trajectory(tiny_run).sha256()
    before = set(tmp_path.iterdir())
    one_line_error(capsys, argv + ["--quiet"], *words)
    nothing_left(tmp_path, before)
    assert open_trajectory(tiny_run).sha256() == sha


def test_seed_must_fit_64_bits(tiny_run, tmp_path, capsys):
    assert seed_int("0") == 0 and seed_int(str(2 ** 63 - 1)) == 2 ** 63 - 1
    for bad in ("-1", str(2 ** 63), "99999999999999999999", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="seed"):
            seed_int(bad)
    for argv in (["plane", tiny_run, "--origin", "sgd", "--random"], ["line", tiny_run, "--ray-from", "sgd"]):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv] + ["--seed", "99999999999999999999", "-o", str(tmp_path / "o.h5")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--seed" in err and "2**63" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_a_gpu_this_machine_lacks_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    """``cuda:N`` past the machine's GPUs is refused when the command starts (not as CUDA's "invalid
    device ordinal" once work is under way); here a machine with two GPUs, as torch would report it."""
    import torch

    from landscape.device import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    one_line_error(capsys, ["plane", str(tiny_run), "sgd", "swa/average", "sgd:0", "--device", "cuda:2",
                            "-o", str(tmp_path / "p.h5")], "cuda:2", "2 GPUs", "cuda:0 to cuda:1")
    assert not list(tmp_path.iterdir())


def test_a_users_model_that_raises_mid_run_is_one_line_saying_where_and_what_was_kept(tmp_path, capsys,
                                                                                      monkeypatch):
    """The user's own forward raising after some epochs: one line with its error and its place in their
    file, and the epochs kept (it was a traceback); fixed, the same command goes on."""
    (tmp_path / "flaky_net.py").write_text(
        "from torch import nn\n"
        "calls, limit = [0], [40]\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 4))\n"
        "    def forward(self, x):\n"
        "        calls[0] += 1\n"
        "        if limit[0] and calls[0] > limit[0]:\n"
        "            raise ValueError(f'exploded at call {calls[0]}')\n"
        "        return self.body(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["train", "--model", "flaky_net:Net", "--dataset", "synthetic", "--data-option", "n_train=200",
            "--data-option", "shape=[1,24]", "--methods", "sgd", "--epochs", "8", "--quiet", "-o", str(tmp_path / "r.h5")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("landscape: error: ValueError: exploded at call 41 (in forward, flaky_net.py:10); ") and \
        err.count("\n") == 1, err
    assert "sgd up to epoch" in err and "kept in" in err and "--debug" in err and "Traceback" not in err
    assert (tmp_path / "r.h5.partial").exists() and not (tmp_path / "r.h5").exists()
    import flaky_net
    flaky_net.limit[0] = 0
    assert main(argv) == 0 and (tmp_path / "r.h5").exists()


# ---------------------------------------------------------------------------------------------
# places that cannot be written

@PROC
@pytest.mark.parametrize("args, words", [
    (["plane", "{run}", *THREE, "--grid", "2", "2", "-o", "/proc/out.h5"],
     ["cannot write /proc/out.h5", "No such file"]),
    (["plane", "{run}", *THREE, "--grid", "2", "2", "-o", "/proc/x/out.h5"], ["cannot write /proc/x/out.h5"]),
    (["plane", "{run}", *THREE, "--grid", "2", "2", "-o", "{tmp}/p.h5", "--export", "loss-landscape",
      "--export-out", "/proc/e.h5"], ["cannot write /proc/e.h5"]),
    (["plane", "{run}", *THREE, "--grid", "2", "2", "-o", "{tmp}/p.h5", "--export", "loss-landscape",
      "--export-out", "/proc/x/e.h5"], ["cannot write /proc/x/e.h5"]),
    (["plot", "{plane}", "-o", "/proc/figs"], ["cannot create /proc/figs"]),
    (["plot", "{plane}", "-o", "/proc/x/figs"], ["cannot create /proc/x/figs"]),
    (["explore", "{plane}", "-o", "/proc/e.html"], ["cannot write /proc/e.html"]),
    (["explore", "{plane}", "-o", "/proc/x/e.html"], ["cannot write /proc/x/e.html"]),
    (["demo", "-o", "/proc/d"], ["cannot create /proc/d"]),
    (["demo", "-o", "/proc/x/d"], ["cannot create /proc/x/d"]),
    (["demo", "-o", "{run}"], ["not a directory"]),
])
def test_unwritable_outputs_are_refused_before_work(tiny_run, surfaces, tmp_path, capsys, monkeypatch, args, words):
    import landscape.cli.commands.demo
    import landscape.surface
    monkeypatch.setattr(landscape.surface, "_fill", lambda *a, **k: pytest.fail("computed despite bad output"))
    monkeypatch.setattr(landscape.cli.commands.demo, "run_demo", lambda *a, **k: pytest.fail("demo ran despite bad output"))
    argv = [a.format(run=tiny_run, tmp=tmp_path, plane=surfaces[0]) for a in args]
    one_line_error(capsys, argv, *words)
    assert not list(tmp_path.iterdir())


def test_info_shows_a_surface_file(surfaces, capsys):
    """info reads every file the tool writes (a surface was refused as 'not a trajectory file')."""
    import json
    plane = open_surface(surfaces[0])
    assert main(["info", str(surfaces[0])]) == 0
    assert "plane of 3 x 3 points (9 computed)" in capsys.readouterr().out
    assert main(["info", str(surfaces[1]), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["kind"] == "line" and line["shape"] == [3]
    assert main(["info", str(surfaces[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["values"]["train_loss"] == [plane.values["train_loss"].min(), plane.values["train_loss"].max()]
    assert set(info["points"]) == set(plane.points)


def test_misleading_messages(tiny_run, tmp_path, capsys, monkeypatch):
    one_line_error(capsys, ["info", tmp_path], f"{tmp_path} is a directory, not a file\n")  # (said "a file file")
    with pytest.raises(DataError, match=r"cifar10: .*one\.npy is not a directory$"):  # (said it did not exist)
        np.save(tmp_path / "one.npy", np.zeros(3))
        load_data(DataSpec("cifar10", {"root": str(tmp_path / "one.npy")}))
    from landscape.recorder import Recorder
    with pytest.raises(Exception, match="already exists; pass overwrite=True"):  # (a Python call: not --overwrite)
        Recorder(tmp_path / "one.npy", model="mlp", data="synthetic")
    from landscape.data import DATASETS
    from landscape.models import MODELS
    monkeypatch.setenv("COLUMNS", "1000")
    for command in ("train", "import"):  # every built-in model and dataset named (three were missing)
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        assert all(f"{name}," in shown for name in (*MODELS, *DATASETS))
    text = tmp_path / "notnpz.npz"
    text.write_text("x_train,y_train\n1,2\n")
    np.save(tmp_path / "one.npy", np.zeros(3))
    for path in (text, tmp_path / "one.npy"):
        with pytest.raises(DataError, match=r"is not an \.npz file with x_train, y_train, x_test, y_test") as e:
            load_data(DataSpec("npz", {"path": str(path)}))
        assert "pickle" not in str(e.value)
    np.savez(tmp_path / "obj.npz", x_train=np.array([{}], dtype=object), y_train=np.zeros(1), x_test=np.zeros(1),
             y_test=np.zeros(1))
    with pytest.raises(DataError, match="object arrays"):
        load_data(DataSpec("npz", {"path": str(tmp_path / "obj.npz")}))


# ---------------------------------------------------------------------------------------------
# plot, explore, import: inputs kept, bounds checked first

@pytest.mark.parametrize("extra, words", [
    (["--levels", "100000"], ["contour levels", "1 to 50"]),
    (["--levels", "0"], ["contour levels"]),
    (["--smooth", "1e9"], ["smoothing", "3 x 3", "at most 3"]),
    (["--smooth", "-1"], ["smoothing", "non-negative"]),
    (["--smooth", "inf"], ["smoothing"]),
    (["--train-metric", "nope"], ["no 'nope' values"]),
])
def test_plot_bounds_leave_no_figures(surfaces, tmp_path, capsys, extra, words):
    out = tmp_path / "figs"
    one_line_error(capsys, ["plot", surfaces[0], "-o", out, *extra], *words)
    assert not out.exists()


def test_plot_failure_keeps_the_previous_set(surfaces, tmp_path, capsys, monkeypatch):
    from landscape.plot import figures
    out = tmp_path / "figs"
    assert main(["plot", str(surfaces[0]), "-o", str(out), "--levels", "3"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "numbers.json" in before and "plane-landscape.png" in before
    calls = []
    real = figures.save

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(figures, "save", fail_second)
    one_line_error(capsys, ["plot", surfaces[0], surfaces[1], "-o", out, "--levels", "9"], "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new figure next to the old numbers


def test_a_second_plot_into_a_folder_keeps_the_numbers_of_the_figures_already_there(surfaces, tmp_path):
    """Two plots into one folder (as the notebook guide does: the planes, then the sharpness): the
    folder's numbers.json holds the numbers of every figure in it, the later values winning."""
    import json
    import shutil
    out, other = tmp_path / "figs", tmp_path / "other-plane.h5"
    shutil.copy(surfaces[0], other)
    assert main(["plot", str(surfaces[0]), "-o", str(out), "--format", "png"]) == 0
    first = json.loads((out / "numbers.json").read_text())
    assert main(["plot", str(other), "-o", str(out), "--format", "png", "--rise", "0.2"]) == 0
    both = json.loads((out / "numbers.json").read_text())
    assert set(both["offset"]) == set(first["offset"]) | {str(other)} and len(both["offset"]) == 2
    assert both["offset"][str(other)] == both["offset"][next(iter(first["offset"]))]  # (the same plane)
    assert both["rises"] == [0.2]


def test_plot_does_not_replace_its_input(surfaces, tmp_path, capsys):
    out = tmp_path / "figs"
    out.mkdir()
    named = out / "numbers.json"  # a surface file that happens to have the name of the numbers file
    shutil.copy(surfaces[0], named)
    data = named.read_bytes()
    one_line_error(capsys, ["plot", named, "-o", out], "would replace the input")
    assert named.read_bytes() == data and [p.name for p in out.iterdir()] == ["numbers.json"]


def test_explore_and_import_do_not_replace_their_input(surfaces, tiny_run, tmp_path, capsys):
    plane = tmp_path / "plane.h5"
    shutil.copy(surfaces[0], plane)
    one_line_error(capsys, ["explore", plane, "-o", plane, "--overwrite"], "is the input")
    assert open_surface(plane).done.all()
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    traj = open_trajectory(tiny_run)
    for i in range(2):
        torch.save({"w": traj.checkpoint(f"sgd:{i}").params[:3].clone()}, ckpts / f"epoch{i}.pt")
    data = (ckpts / "epoch1.pt").read_bytes()
    for out in (ckpts / "epoch1.pt", ckpts):
        one_line_error(capsys, ["import", ckpts, "--model", "mlp", "--dataset", "synthetic", "-o", out, "--overwrite",
                        "--quiet"], "is the input")
    assert (ckpts / "epoch1.pt").read_bytes() == data and len(list(ckpts.iterdir())) == 2


# ---------------------------------------------------------------------------------------------
# interruption

def test_interruption_says_what_was_kept(tiny_run, tmp_path, capsys, monkeypatch):
    traj = open_trajectory(tiny_run)
    out = tmp_path / "p.h5"
    with pytest.raises(KeyboardInterrupt, match=r"^2 of 9 points kept in .*p\.h5\.partial; run the same command "
                                                r"again to finish$"):
        compute_surface(traj, Plane.through(traj, *THREE), (3, 3), out=out, quiet=True, points_per_call=2,
                        write_every=0, on_write=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    out.with_name("p.h5.partial").unlink()

    # through the CLI, Ctrl-C during the third call: the two points computed before it are kept too,
    # although the file was not due for a flush yet
    calls = []
    real = Evaluator.__call__

    def third_interrupts(self, w, b):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, w, b)

    monkeypatch.setattr(Evaluator, "__call__", third_interrupts)
    argv = ["plane", str(tiny_run), *THREE, "--grid", "3", "3", "--points-per-call", "1", "-o", str(out), "--quiet"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err == f"landscape: interrupted: 2 of 9 points kept in {out}.partial; run the same command again to finish\n"
    monkeypatch.setattr(Evaluator, "__call__", real)
    assert main(argv) == 0 and open_surface(out).done.all()


def test_damaged_metadata_and_run_names_that_are_not_runs_are_one_line(tiny_run, tmp_path, capsys):
    """A copy whose HDF5 metadata was damaged (flipped bytes of an object header) is named as damaged,
    not a traceback; `landscape average --name` takes only names that are runs of their own."""
    data = bytearray(Path(tiny_run).read_bytes())
    at = data.find(b"OHDR", 100)
    data[at + 8:at + 24] = bytes(b ^ 0x5A for b in data[at + 8:at + 24])
    (tmp_path / "damaged.h5").write_bytes(bytes(data))
    one_line_error(capsys, ["info", tmp_path / "damaged.h5"], "damaged.h5 is damaged")
    for name, words in (("sgd/x", "cannot sit beside run 'sgd'"), ("swa", "cannot sit beside run 'swa/"),
                        (".", "is not valid"), ("trail/", "is not valid")):
        one_line_error(capsys, ["average", tiny_run, "--from", "sgd:1:", "--uniform", "--name", name, "--quiet",
                                "-o", tmp_path / "a.h5"], words)
    assert not (tmp_path / "a.h5").exists()


@pytest.mark.parametrize("attr, value, words", [
    ("complete", "false", "is incomplete"),  # a string is true to Python: it read as a finished file
    ("config", {"eval_batch_size": "big"}, "the config's 'eval_batch_size' is 'big', not a whole number"),
    ("config", {"eval_batch_size": 0}, "the config's 'eval_batch_size' is 0, not a whole number"),
])
def test_a_trajectory_edited_by_hand_is_refused_in_one_line(tiny_run, tmp_path, capsys, attr, value, words):
    """Attributes a hand changed: read by their type, and refused before any work (an eval_batch_size of
    "big" stopped plane with int()'s ValueError, one of 0 stopped average in range())."""
    import h5py
    import json
    path = tmp_path / "edited.h5"
    shutil.copy(tiny_run, path)
    with h5py.File(path, "r+") as f:
        if attr == "config":
            value = json.dumps(dict(json.loads(f.attrs["config"]), **value))
        f.attrs[attr] = value
    for argv in (["info", path], ["average", path, "--from", "sgd:1:", "--uniform", "-o", tmp_path / "a.h5"],
                 ["plane", path, "sgd", "swa/average", "sgd:0", "--grid", "3", "3", "-o", tmp_path / "p.h5"]):
        one_line_error(capsys, argv, words)
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "p.h5").exists()


def test_ctrl_c_while_the_command_starts_is_one_line(monkeypatch, capsys):
    """Building the parser imports torch (seconds): a Ctrl-C there printed the imports' traceback."""
    import landscape.cli.main as cli_main

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_main, "build_parser", interrupted)
    assert cli_main.main(["info", "x.h5"]) == 130
    assert capsys.readouterr().err == "landscape: interrupted\n"
