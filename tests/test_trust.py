"""Files from other people never run code: an import path a file records runs only with the user's
consent (landscape.trust), readers of arrays never import anything, and HDF5 features that reach
outside a file, or declared sizes it cannot hold, are refused before anything is read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from landscape.cli.main import main
from landscape.data import DataSpec, load_data
from landscape.errors import DataError, FileFormatError, ModelError, TrustError
from landscape.geometry import Plane
from landscape.models import ModelSpec, build_model
from landscape.store import open_surface, open_trajectory
from landscape.surface import compute_surface
from landscape.trust import RECORDED_IMPORTS, Trust, check_recorded_import

from _cli import crafted_copy, one_line_error
from landscape.rebuild import rebuild_data, rebuild_model

THREE = ("sgd", "swa/average", "swa/iterates:0")

# A module whose import, and whose factories, leave a mark: the proof that code ran. Its factories
# rebuild what the tiny run recorded (cnn1d-bn with 8 channels, the synthetic dataset), so a file that
# names them works once the user allows it.
EVIL = '''
import os, pathlib
pathlib.Path(os.environ["EVIL_MARKER"]).write_text("imported")

def make(input_shape, num_classes, **kwargs):
    pathlib.Path(os.environ["EVIL_MARKER"]).write_text("model built")
    from landscape.models import cnn1d_bn
    return cnn1d_bn(input_shape, num_classes, **kwargs)

def data(**options):
    pathlib.Path(os.environ["EVIL_MARKER"]).write_text("data built")
    from landscape.data import _synthetic
    return _synthetic(options)[0]
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A fresh module (unique name, so no earlier import hides its side effect) in the current folder,
    where user modules are looked up; returns (module name, marker path)."""
    name = f"evil_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(EVIL)
    marker = tmp_path / "marker"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    monkeypatch.delenv("LANDSCAPE_TRUST_CODE", raising=False)
    monkeypatch.delenv("LANDSCAPE_TRUSTED_MODULES", raising=False)
    monkeypatch.chdir(tmp_path)
    yield name, marker
    sys.modules.pop(name, None)


def _craft(tiny_run, path: Path, names: dict) -> Path:
    """A copy of the tiny run whose configuration names other code: {kind: import path}."""
    def rename(f):
        config = json.loads(f.attrs["config"])
        for kind, name in names.items():
            key, field = RECORDED_IMPORTS[kind]
            if field is None:  # a top-level name (the task)
                config[key] = name
            else:
                config[key][field] = name
        f.attrs["config"] = json.dumps(config, sort_keys=True)
    return crafted_copy(tiny_run, path, rename)


COMMANDS = {  # every command that rebuilds a file's model or data, with arguments after the file
    "plane": ["plane", "{f}", *THREE, "--grid", "3", "3"],
    "plane --random": ["plane", "{f}", "--origin", "sgd", "--random", "--grid", "3", "3"],
    "plane --pca": ["plane", "{f}", "--pca", "sgd", "--grid", "3", "3"],
    "plane --dir": ["plane", "{f}", "--origin", "sgd", "--dir", "swa/average", "--dir", "sgd:0", "--grid", "3", "3"],
    "plane --hessian": ["plane", "{f}", "--origin", "sgd", "--hessian", "--hessian-samples", "50",
                        "--hessian-iterations", "3", "--grid", "3", "3"],
    "line": ["line", "{f}", "sgd", "swa/average", "--points", "3"],
    "line --ray-from": ["line", "{f}", "--ray-from", "sgd", "--rays", "2", "--points", "3"],
    "sharpness": ["sharpness", "{f}", "sgd", "--top-k", "1", "--iterations", "3", "--probes", "2", "--samples", "50"],
    "average": ["average", "{f}", "--from", "sgd", "--uniform"],
}


@pytest.mark.parametrize("kind", sorted(RECORDED_IMPORTS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_recorded_import_and_runs_nothing(tiny_run, tmp_path, evil, capsys, kind, command):
    module, marker = evil
    path = f"{module}:{'make' if kind == 'model' else 'data'}"
    crafted = _craft(tiny_run, tmp_path / "crafted.h5", {kind: path})
    out = tmp_path / "out.h5"
    argv = [a.format(f=crafted) for a in COMMANDS[command]] + ["-o", out, "--quiet"]
    one_line_error(capsys, argv, str(crafted), repr(path), "--trust-code", f"--{kind} {path}")
    assert not marker.exists(), marker.read_text()
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_the_attack_as_a_user_tried_it(tiny_run, tmp_path, capsys, monkeypatch):
    """A dataset recorded as a standard-library function that runs a shell command."""
    monkeypatch.delenv("LANDSCAPE_TRUST_CODE", raising=False)
    marker = tmp_path / "pwned"
    crafted = _craft(tiny_run, tmp_path / "crafted.h5", {"dataset": "subprocess:call"})
    with h5py.File(crafted, "r+") as f:
        config = json.loads(f.attrs["config"])
        config["data"]["options"] = {"args": ["touch", str(marker)]}
        f.attrs["config"] = json.dumps(config)
    one_line_error(capsys, ["line", crafted, "sgd:0", "sgd", "-o", tmp_path / "l.h5"], "'subprocess:call'")
    assert not marker.exists()


@pytest.mark.parametrize("consent", ["--trust-code", "typed", "env", "modules"])
def test_with_consent_the_recorded_code_runs(tiny_run, tmp_path, evil, capsys, monkeypatch, consent):
    module, marker = evil
    names = {"model": f"{module}:make", "dataset": f"{module}:data"}
    crafted = _craft(tiny_run, tmp_path / "crafted.h5", names)
    argv = ["line", crafted, "sgd", "swa/average", "--points", "3", "-o", tmp_path / "line.h5", "--quiet"]
    if consent == "--trust-code":
        argv.append("--trust-code")
    elif consent == "typed":
        argv += ["--model", names["model"], "--dataset", names["dataset"]]
    elif consent == "env":
        monkeypatch.setenv("LANDSCAPE_TRUST_CODE", "1")
    else:
        monkeypatch.setenv("LANDSCAPE_TRUSTED_MODULES", f"numpy,{module}")
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert marker.read_text() == "model built"
    # the crafted file's code rebuilt the very model of the original file: the same surface
    ref = tmp_path / "ref.h5"
    assert main(["line", str(tiny_run), "sgd", "swa/average", "--points", "3", "-o", str(ref), "--quiet"]) == 0
    a, b = open_surface(tmp_path / "line.h5"), open_surface(ref)
    for k in b.values:
        np.testing.assert_array_equal(a.values[k], b.values[k])


def test_allowing_one_kind_does_not_allow_the_other(tiny_run, tmp_path, evil, capsys):
    module, marker = evil
    names = {"model": f"{module}:make", "dataset": f"{module}:data"}
    crafted = _craft(tiny_run, tmp_path / "crafted.h5", names)
    one_line_error(capsys, ["line", crafted, "sgd", "swa/average", "--model", names["model"], "-o", tmp_path / "l.h5"],
             "dataset", repr(names["dataset"]))
    one_line_error(capsys, ["line", crafted, "sgd", "swa/average", "--model", "othermod:make", "-o", tmp_path / "l.h5"],
             "--model othermod:make does not match", repr(names["model"]))
    assert not marker.exists()


def test_python_api_has_the_same_rule(tiny_run, tmp_path, evil):
    module, marker = evil
    crafted = _craft(tiny_run, tmp_path / "crafted.h5", {"model": f"{module}:make"})
    traj = open_trajectory(crafted)
    plane = Plane.through(traj, *THREE)  # geometry reads arrays only
    for build in (lambda: rebuild_model(traj), lambda: rebuild_data(traj),
                  lambda: compute_surface(traj, plane, (2, 2), quiet=True, points_per_call=4)):
        with pytest.raises(TrustError, match=f"{module}:make"):
            build()
    assert not marker.exists()
    trusted = open_trajectory(crafted, trust_code=True)
    assert isinstance(rebuild_model(trusted), torch.nn.Module) and marker.read_text() == "model built"
    assert rebuild_model(open_trajectory(crafted, allow=[module])) is not None


def test_readers_never_import_what_a_file_names(tiny_run, tmp_path, evil, capsys):
    """info, plot and explore read arrays and JSON: whatever the trajectory and surface files name, and
    even when the user passes nothing, no module is imported."""
    module, marker = evil
    names = {"model": f"{module}:make", "dataset": f"{module}:data"}
    crafted = _craft(tiny_run, tmp_path / "crafted.h5", names)
    surface = tmp_path / "line.h5"
    assert main(["line", str(tiny_run), "sgd", "swa/average", "--points", "3", "-o", str(surface), "--quiet"]) == 0
    with h5py.File(surface, "r+") as f:  # a surface's spec records the dataset and model too
        spec = json.loads(f.attrs["spec"])
        spec["model"]["name"], spec["dataset"]["name"] = names["model"], names["dataset"]
        f.attrs["spec"] = json.dumps(spec)
    assert main(["info", str(crafted)]) == 0
    assert main(["info", str(crafted), "--json"]) == 0
    assert main(["plot", str(surface), "--trajectory", str(crafted), "-o", str(tmp_path / "fig"),
                 "--format", "png"]) == 0
    assert main(["explore", str(surface), "-o", str(tmp_path / "x.html")]) == 0
    capsys.readouterr()
    assert not marker.exists()
    assert module not in sys.modules


def test_demo_does_not_reuse_a_foreign_run(tiny_run, tmp_path, evil):
    """The demo reuses its folder's run.h5 only when it records the demo's own built-in configuration;
    deciding that imports nothing."""
    from landscape.demo import DemoConfig
    from landscape.train import trained_with
    module, marker = evil
    crafted = _craft(tiny_run, tmp_path / "run.h5", {"model": f"{module}:make"})
    assert not trained_with(crafted, DemoConfig().quick().train)
    assert not marker.exists()


def test_the_rule_itself():
    assert Trust(allow=("lab",)).permits("lab.nets:make") and Trust(allow=("lab",)).permits("lab:make")
    assert not Trust(allow=("lab",)).permits("laboratory:make")
    assert Trust(allow=("lab.nets:make",)).permits("lab.nets:make")
    assert not Trust(allow=("lab.nets:make",)).permits("lab.nets:other")
    assert Trust(code=True).permits("anything:at_all")
    check_recorded_import("cnn1d", what="model", file="f.h5", trust=Trust())  # built-in names are data
    with pytest.raises(TrustError, match="f.h5 names the model 'os:system'"):
        check_recorded_import("os:system", what="model", file="f.h5", trust=Trust(allow=("o",)))


# -- options that a file hands to built-in models and datasets --------------------------------------

@pytest.mark.parametrize("spec, message", [
    (ModelSpec("cnn1d", {"channels": 10 ** 9}), "channels=1000000000 must be from 1 to 16384"),
    (ModelSpec("cnn1d", {"channels": "8; rm -rf"}), "must be a whole number"),
    (ModelSpec("cnn1d", {"channels": True}), "must be a whole number"),
    (ModelSpec("cnn1d", {"batchnorm": "yes"}), "must be true or false"),
    (ModelSpec("cnn1d", {"__class__": 1}), "has no option '__class__'"),
    (ModelSpec("mlp", {"hidden": [16384] * 16}), "more than 268,435,456 weights"),
    (ModelSpec("mlp", {"hidden": [0]}), "must be from 1"),
    (ModelSpec("resnet20", {"depth": 1000}), "has no option 'depth'"),
])
def test_built_in_model_options_are_checked(spec, message):
    with pytest.raises(ModelError, match=message):
        build_model(spec, (1, 24), 4)


@pytest.mark.parametrize("options, message", [
    ({"n_train": 10 ** 12}, "n_train=1000000000000 must be from 2 to"),
    ({"shape": [1, 10 ** 6]}, "must be from 1 to 4096"),
    ({"n_train": 10 ** 6, "shape": [3, 64, 64]}, "exceed 134,217,728 input values"),
    ({"noise": float("nan")}, "must be a finite number"),
    ({"shape": "1,24"}, "must be a list"),
    ({"classes": 1}, "must be from 2"),
])
def test_built_in_dataset_options_are_checked(options, message):
    with pytest.raises(DataError, match=message):
        load_data(DataSpec("synthetic", options))


def test_a_recorded_huge_model_is_one_line(tiny_run, tmp_path, capsys):
    crafted = tmp_path / "huge.h5"
    crafted.write_bytes(tiny_run.read_bytes())
    with h5py.File(crafted, "r+") as f:
        config = json.loads(f.attrs["config"])
        config["model"]["kwargs"] = {"channels": 10 ** 9}
        f.attrs["config"] = json.dumps(config)
    one_line_error(capsys, ["line", crafted, "sgd", "swa/average", "-o", tmp_path / "l.h5"], "channels=1000000000")


# -- HDF5 features that reach outside the file, and declared sizes ---------------------------------

def _outside_link(f, tmp_path):
    with h5py.File(tmp_path / "elsewhere.h5", "w") as g:
        g["x"] = np.zeros(3)
    f["runs/sgd/elsewhere"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "/x")


def _external_storage(f, tmp_path):
    (tmp_path / "raw.bin").write_bytes(np.zeros(len(f["runs/sgd/epoch"]), np.float64).tobytes())
    n = len(f["runs/sgd/epoch"])
    del f["runs/sgd/test_err"]
    f.create_dataset("runs/sgd/test_err", (n,), np.float64, external=[(str(tmp_path / "raw.bin"), 0, n * 8)])


def _virtual(f, tmp_path):
    with h5py.File(tmp_path / "source.h5", "w") as g:
        g["params"] = np.zeros(f["runs/sgd/params"].shape, np.float32)
    layout = h5py.VirtualLayout(f["runs/sgd/params"].shape, np.float32)
    layout[:] = h5py.VirtualSource(str(tmp_path / "source.h5"), "params", shape=f["runs/sgd/params"].shape)
    del f["runs/sgd/params"]
    f.create_virtual_dataset("runs/sgd/params", layout)


def _huge(f, tmp_path):
    width = f["runs/sgd/params"].shape[1]
    del f["runs/sgd/params"]
    f.create_dataset("runs/sgd/params", (10 ** 9, width), np.float32, chunks=(1, width))  # nothing written


def _huge_compressed(f, tmp_path):
    del f["runs/sgd/epoch"]
    f.create_dataset("runs/sgd/epoch", (1, 10 ** 13), np.float64, chunks=(1, 10 ** 5), compression="gzip")


@pytest.mark.parametrize("craft, words", [
    (_outside_link, ["external link", "elsewhere.h5"]),
    (_external_storage, ["external file", "raw.bin"]),
    (_virtual, ["virtual dataset"]),
    (_huge, ["declares (1000000000,", "more than the file holds"]),
    (_huge_compressed, ["declares (1, 10000000000000)", "in memory"]),
])
def test_files_that_reach_outside_or_declare_too_much_are_refused(tiny_run, tmp_path, capsys, craft, words):
    crafted = tmp_path / "crafted.h5"
    crafted.write_bytes(tiny_run.read_bytes())
    with h5py.File(crafted, "r+") as f:
        craft(f, tmp_path)
    with pytest.raises(FileFormatError, match="is refused"):
        open_trajectory(crafted)
    for argv in (["info", crafted], ["line", crafted, "sgd", "swa/average", "-o", tmp_path / "l.h5"],
                 ["plane", crafted, *THREE, "-o", tmp_path / "p.h5"]):
        one_line_error(capsys, argv, str(crafted), *words)
    assert not (tmp_path / "l.h5").exists() and not (tmp_path / "p.h5.partial").exists()


def test_surface_files_are_held_to_the_same_rule(tiny_run, tmp_path, capsys):
    surface = tmp_path / "line.h5"
    assert main(["line", str(tiny_run), "sgd", "swa/average", "--points", "3", "-o", str(surface), "--quiet"]) == 0
    with h5py.File(tmp_path / "other.h5", "w") as g:
        g["v"] = np.zeros(3)
    with h5py.File(surface, "r+") as f:
        f["values/elsewhere"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/v")
    with pytest.raises(FileFormatError, match="external link"):
        open_surface(surface)
    for argv in (["plot", surface, "-o", tmp_path / "fig"], ["explore", surface, "-o", tmp_path / "x.html"]):
        one_line_error(capsys, argv, "external link")


def test_a_file_found_self_contained_is_checked_again_once_it_changes(tiny_run, tmp_path, monkeypatch):
    """The check runs once per version of a file in a process: reading an unchanged trajectory
    checkpoint by checkpoint does not walk it again, and a file changed in place after it passed is
    walked again and refused. A file changed within the last two seconds (a change then may not move
    the times of a filesystem that keeps them to the second) is walked at every opening."""
    from landscape.store import files
    crafted = tmp_path / "crafted.h5"
    crafted.write_bytes(tiny_run.read_bytes())
    walks = []
    walk = files._walk
    monkeypatch.setattr(files, "_walk", lambda f, size: walks.append(f.filename) or walk(f, size))
    open_trajectory(crafted).params("sgd", 0)
    assert walks == [str(crafted)] * 2  # just written
    monkeypatch.setattr(files, "_SETTLED_NS", 0)  # (its times are nanoseconds here: settled at once)
    walks.clear()
    traj = open_trajectory(crafted)
    for i in range(3):
        traj.params("sgd", i)
    assert walks == [str(crafted)]
    time.sleep(0.05)  # past the file system's timestamp granularity (a jiffy on kernels without fine-grained ctimes)
    with h5py.File(crafted, "r+") as f:
        _outside_link(f, tmp_path)
    with pytest.raises(FileFormatError, match="external link"):
        traj.params("sgd", 0)
    with pytest.raises(FileFormatError, match="external link"):
        open_trajectory(crafted)
    assert len(walks) == 3


@pytest.mark.slow
def test_the_refusal_is_one_line_from_the_installed_command(tiny_run, tmp_path):
    """The console command, as a user runs it: exit 2, one line, no traceback, nothing imported."""
    name = f"evil_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(EVIL)
    crafted = _craft(tiny_run, tmp_path / "crafted.h5", {"model": f"{name}:make"})
    env = dict(os.environ, EVIL_MARKER=str(tmp_path / "marker"))
    env.pop("LANDSCAPE_TRUST_CODE", None)
    r = subprocess.run([sys.executable, "-m", "landscape", "line", str(crafted), "sgd:0", "sgd", "-o", "l.h5"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "marker").exists()
