"""Never crash, never lose work, never mislead: kills at any moment, full disks, two writers of one
output, malformed files. Every failure is one line (`landscape: error: ...`), a non-zero exit, and a
rerun of the same command loses nothing: a resumed trajectory is byte-identical to an uninterrupted one,
a resumed surface holds the same values.

Kills are made deterministic: a small wrapper ends the process with ``os._exit`` (no cleanup, like
kill -9) at the k-th save point of its output file, either before the save starts or half way through
writing it into the file (after its journal is complete)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from landscape.cli.main import main
from landscape.store import open_surface
from landscape.store.files import OutputLock, lock_path, sha256
from landscape.store.journal import JournaledFile, journal_path

ROOT = Path(__file__).resolve().parents[1]
THREE = ["sgd", "swa/average", "swa/iterates:0"]
# two methods trained one after the other (sgd and swa would share their steps, as one part)
TRAIN = ["train", "--dataset", "synthetic", "--model", "mlp", "--epochs", "3", "--methods", "sgd,lookahead", "--quiet"]

# runs a landscape command that dies (os._exit(9), no cleanup) at the k-th save of a file: "before" the
# save, or "mid" way through copying a complete journal into the file
CRASH = r"""
import os, sys
import landscape.store.journal as J
k, where = int(sys.argv[1]), sys.argv[2]
calls, commit, apply = [0], J.JournaledFile.commit, J._apply
def half_apply(fd, size, kept, pages):
    pages = list(pages)
    apply(fd, size, kept, pages[:len(pages) // 2])
    os._exit(9)
def crashing_commit(self):
    calls[0] += 1
    if calls[0] == k and where == "before":
        os._exit(9)
    if calls[0] == k and where == "mid" and self.pages:
        J._apply = half_apply
    commit(self)
J.JournaledFile.commit = crashing_commit
from landscape.cli.main import main
sys.exit(main(sys.argv[3:]))
"""


def cli(*args, crash=None, env=None):
    """Run ``landscape ARGS`` in a fresh process; ``crash=(k, where)`` kills it at its k-th save."""
    pre = ["-c", CRASH, str(crash[0]), crash[1]] if crash else ["-m", "landscape"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *pre, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env)


def one_line_error(r, *fragments):
    """The run failed with exit 2 and one line on stderr that holds every fragment, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("landscape: error: ") and r.stderr.count("\n") == 1, r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, r.stderr


def run_main(capsys, *args):
    """``landscape ARGS`` in this process (fast): (exit code, stderr)."""
    code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


def surface_values(path) -> dict:
    s = open_surface(path)
    return {**s.values, "done": s.done}


def assert_same_values(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------------------------
# the journal itself

def _commit_crashing(j: JournaledFile, monkeypatch, where: str):
    """Commit ``j`` but stop (as a kill would) at ``where``."""
    import landscape.store.journal as J

    class Killed(BaseException):
        pass

    real_apply = J._apply

    def stop(*args, **kwargs):
        raise Killed

    def half(fd, size, kept, pages):
        pages = list(pages)
        real_apply(fd, size, kept, pages[:len(pages) // 2])
        raise Killed
    if where == "journal":
        monkeypatch.setattr(J, "_write_journal", lambda path, *a: (path.write_bytes(b"landscape-journal-1\ntorn"),
                                                                   stop()))
    else:
        monkeypatch.setattr(J, "_apply", half if where == "apply" else stop)
    with pytest.raises(Killed):
        j.commit()
    monkeypatch.undo()


@pytest.mark.parametrize("where, expect", [("journal", "old"), ("apply", "new"), ("after-journal", "new")])
def test_journal_a_kill_at_any_step_of_a_commit_leaves_the_old_or_the_new_file(tmp_path, monkeypatch, where, expect):
    path = tmp_path / "f"
    j = JournaledFile(path, create=True)
    old = os.urandom(300_000)
    j.write(old)
    j.commit()
    new = bytearray(old)
    new[70_000:70_010] = b"x" * 10
    new += os.urandom(200_000)
    j.seek(0)
    j.write(new)
    _commit_crashing(j, monkeypatch, where)
    j.close()
    JournaledFile(path).close()  # the next opening replays a complete journal, drops a torn one
    assert not journal_path(path).exists()
    assert path.read_bytes()[:len(new) if expect == "new" else len(old)] == (bytes(new) if expect == "new" else old)


def test_journal_full_disk_keeps_the_last_commit(tmp_path, monkeypatch):
    import landscape.store.journal as J
    path = tmp_path / "f"
    j = JournaledFile(path, create=True)
    j.write(b"a" * 100_000)
    j.commit()
    j.write(b"b" * 100_000)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(J, "_write_journal", full)
    with pytest.raises(OSError):
        j.commit()
    j.close()
    assert path.read_bytes() == b"a" * 100_000 and not journal_path(path).exists()


# ----------------------------------------------------------------------------------------------
# kills at many moments: train

@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run.h5"
    r = cli(*TRAIN, "-o", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
# this run saves 9 times: sgd's 3 epochs, sgd finished, lookahead's 3 epochs, lookahead finished, the complete file
@pytest.mark.parametrize("crash", [(1, "before"), (2, "mid"), (6, "mid"), (8, "before"), (9, "mid")])
def test_train_killed_at_any_save_resumes_to_the_same_bytes(uninterrupted_run, tmp_path, crash):
    out = tmp_path / "run.h5"
    first = cli(*TRAIN, "-o", out, crash=crash)
    assert first.returncode == 9 and not out.exists()
    again = cli(*TRAIN, "-o", out)
    assert again.returncode == 0, again.stderr
    assert sha256(out) == sha256(uninterrupted_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]  # no partial, journal or lock left


@pytest.mark.slow
def test_train_replaces_a_partial_without_work(tmp_path):
    """A partial cut off before its first save (empty, or not HDF5) holds nothing: it is replaced, not
    mistaken for another configuration's work."""
    out = tmp_path / "run.h5"
    for junk in (b"", b"\x89HDF\r\n\x1a\n" + bytes(100)):
        (tmp_path / "run.h5.partial").write_bytes(junk)
        r = cli("train", "--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--methods", "sgd", "--quiet",
                "-o", out)
        assert r.returncode == 0, r.stderr
        assert "another configuration" not in r.stderr
        out.unlink()


@pytest.mark.slow
def test_train_refuses_a_partial_of_another_configuration(tmp_path):
    out = tmp_path / "run.h5"
    first = cli(*TRAIN, "-o", out, crash=(3, "before"))
    assert first.returncode == 9
    r = cli(*TRAIN, "--lr", "0.01", "-o", out)
    one_line_error(r, "holds interrupted work with another configuration", "--overwrite")
    assert (tmp_path / "run.h5.partial").exists()


# ----------------------------------------------------------------------------------------------
# kills at many moments: plane and line

def _surface_args(kind, traj):
    if kind == "plane":
        return ["plane", traj, *THREE, "--grid", 7, 6, "--points-per-call", 3, "--quiet"]
    return ["line", traj, "sgd", "swa/average", "--points", 15, "--points-per-call", 2, "--quiet"]


@pytest.fixture(scope="module")
def uninterrupted_surfaces(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("surfaces")
    out = {}
    for kind in ("plane", "line"):
        out[kind] = folder / f"{kind}.h5"
        r = cli(*_surface_args(kind, tiny_run), "-o", out[kind])
        assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind, crash", [("plane", (1, "mid")), ("plane", (2, "before")), ("plane", (3, "mid")),
                                         ("line", (2, "mid")), ("line", (3, "before"))])
def test_surface_killed_at_any_save_resumes_to_the_same_values(tiny_run, uninterrupted_surfaces, tmp_path,
                                                               kind, crash):
    out = tmp_path / "s.h5"
    args = _surface_args(kind, tiny_run)
    first = cli(*args, "-o", out, crash=crash)
    if first.returncode == 0:  # fewer saves than k: nothing to interrupt
        return
    assert first.returncode == 9 and not out.exists()
    again = cli(*args, "-o", out)
    assert again.returncode == 0, again.stderr
    assert_same_values(surface_values(out), surface_values(uninterrupted_surfaces[kind]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_demo_resumes_an_interrupted_surface_instead_of_recomputing_it(tiny_run, tmp_path, monkeypatch):
    from landscape import demo
    from landscape.geometry import Plane
    from landscape.store import SurfaceWriter, open_trajectory
    traj = open_trajectory(tiny_run)
    path, written, real = tmp_path / "plane-swa.h5", [], SurfaceWriter.write

    def write(self, flat, values, stop_after=None):
        real(self, flat, values)
        written.append(np.asarray(flat).copy())
        if len(written) == stop_after:
            raise KeyboardInterrupt
    # interrupted after the first save (the points measured for the points per call)
    monkeypatch.setattr(SurfaceWriter, "write", lambda self, flat, values: write(self, flat, values, 1))
    with pytest.raises(KeyboardInterrupt, match="points kept in"):
        demo._evaluate(traj, Plane.through(traj, *THREE), (7, 6), path, quiet=True, device="cpu")
    kept = set(np.concatenate(written).tolist())
    written.clear()
    monkeypatch.setattr(SurfaceWriter, "write", lambda self, flat, values: write(self, flat, values))
    demo._evaluate(traj, Plane.through(traj, *THREE), (7, 6), path, quiet=True, device="cpu")
    again = set(np.concatenate(written).tolist())
    assert kept and not kept & again and len(kept | again) == 42
    assert open_surface(path).done.all()


def test_a_surface_refused_before_any_work_leaves_nothing_and_the_corrected_command_runs(tiny_run, tmp_path,
                                                                                        capsys):
    out = tmp_path / "p.h5"
    r = run_main(capsys, "plane", tiny_run, *THREE, "--grid", 3, 3, "--xrange", "-1e308", "1e308", "--quiet", "-o", out)
    one_line_error(r, "not finite")
    assert list(tmp_path.iterdir()) == []
    r = run_main(capsys, "plane", tiny_run, *THREE, "--grid", 3, 3, "--xrange", "-1", "1", "--quiet", "-o", out)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_sigterm_says_what_was_kept(tmp_path):
    out = tmp_path / "run.h5"
    args = ["train", "--dataset", "synthetic", "--model", "mlp", "--epochs", "400", "--methods", "sgd", "--quiet",
            "-o", out]
    proc = subprocess.Popen([sys.executable, "-m", "landscape", *map(str, args)], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    partial = tmp_path / "run.h5.partial"
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size):  # a first epoch saved
        time.sleep(0.1)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.startswith("landscape: interrupted: sgd up to epoch ") and "kept in" in err, err
    assert err.count("\n") == 1


LOST_IN_A_CALLBACK = """
import os, signal, sys, time, weakref
from landscape.cli.main import _interrupt_again, _terminate_as_interrupt
_terminate_as_interrupt()
if sys.argv[1] == "hook":
    sys.unraisablehook = _interrupt_again(sys.unraisablehook)
class A: pass
a = A()
def callback(_):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handler runs in here: Python prints its KeyboardInterrupt as ignored
r = weakref.ref(a, callback)
try:
    del a
    time.sleep(2)
    print("lost")
except KeyboardInterrupt:
    print("delivered")
"""


@pytest.mark.parametrize("hook, expect", [("none", "lost"), ("hook", "delivered")])
def test_a_sigterm_that_lands_in_a_weakref_callback_is_delivered_again(hook, expect):
    """A SIGTERM (or Ctrl-C) whose KeyboardInterrupt is raised inside a finalizer or weakref callback is
    lost by Python, and the command would run to its end (seen once: `train` ran all 400 epochs); the
    command's unraisable hook sends it again, to the main code."""
    r = subprocess.run([sys.executable, "-c", LOST_IN_A_CALLBACK, hook], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.stdout.strip() == expect, r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------
# full disks: simulated in every run, a real small tmpfs where this process may mount one

def _enospc_at(k: int) -> str:
    """Python that makes the k-th save of a file fail with "No space left on device"."""
    return CRASH.replace('os._exit(9)\n    if calls[0] == k and where == "mid"',
                         'raise OSError(28, "No space left on device")\n    if False')


def cli_full_disk(k, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", _enospc_at(k), str(k), "before", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 6, 9])
def test_train_full_disk_is_one_line_and_the_rerun_loses_nothing(uninterrupted_run, tmp_path, k):
    out = tmp_path / "run.h5"
    r = cli_full_disk(k, *TRAIN, "-o", out)
    one_line_error(r, f"no space left on device writing {out}")
    assert ("nothing kept" in r.stderr) == (k == 1)
    assert r.returncode == 2 and not out.exists()
    again = cli(*TRAIN, "-o", out)
    assert again.returncode == 0, again.stderr
    assert sha256(out) == sha256(uninterrupted_run)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3])
def test_plane_full_disk_is_one_line_and_the_rerun_loses_nothing(tiny_run, uninterrupted_surfaces, tmp_path, k):
    """Save 1 creates the file, 2 and later save points."""
    out = tmp_path / "p.h5"
    r = cli_full_disk(k, *_surface_args("plane", tiny_run), "-o", out)
    if r.returncode == 0:
        return
    one_line_error(r, f"no space left on device writing {out}")
    assert ("nothing was computed yet" in r.stderr) == (k == 1)
    assert ("no point was saved yet" in r.stderr) == (k == 2)
    assert ("points kept in" in r.stderr) == (k > 2)
    if k <= 2:
        assert list(tmp_path.iterdir()) == []
    again = cli(*_surface_args("plane", tiny_run), "-o", out)
    assert again.returncode == 0, again.stderr
    assert_same_values(surface_values(out), surface_values(uninterrupted_surfaces["plane"]))


@pytest.fixture
def small_disk(tmp_path):
    """A 700 kB tmpfs (skipped where mounting is not allowed); ``grow()`` frees space by resizing it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    class Disk:
        path = mount

        @staticmethod
        def grow():
            subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
    yield Disk
    subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.slow
def test_real_full_disk_train_and_plane(small_disk, uninterrupted_run, uninterrupted_surfaces, tiny_run):
    out = small_disk.path / "run.h5"
    r = cli(*TRAIN, "-o", out)
    one_line_error(r, f"no space left on device writing {out}", "kept in", "free space and run the same command")
    filler = small_disk.path / "filler"
    with open(filler, "wb", buffering=0) as f:  # whatever space training left
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
    plane = small_disk.path / "p.h5"
    r = cli(*_surface_args("plane", tiny_run), "-o", plane)
    one_line_error(r, f"no space left on device writing {plane}", "nothing was computed yet")
    assert not (small_disk.path / "p.h5.partial").exists()
    filler.unlink()
    small_disk.grow()
    assert cli(*TRAIN, "-o", out).returncode == 0
    assert sha256(out) == sha256(uninterrupted_run)
    assert cli(*_surface_args("plane", tiny_run), "-o", plane).returncode == 0
    assert_same_values(surface_values(plane), surface_values(uninterrupted_surfaces["plane"]))


# ----------------------------------------------------------------------------------------------
# one writer per output

def test_a_second_writer_is_refused_naming_the_first(tiny_run, tmp_path, capsys):
    out = tmp_path / "p.h5"
    with OutputLock(out):
        assert main(["plane", str(tiny_run), *THREE, "--grid", "3", "3", "--quiet", "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{out} is being written by process {os.getpid()} since " in err and err.count("\n") == 1
        r = run_main(capsys, *TRAIN, "-o", out)
        one_line_error(r, f"is being written by process {os.getpid()} since")
    assert list(tmp_path.iterdir()) == []
    assert main(["plane", str(tiny_run), *THREE, "--grid", "3", "3", "--quiet", "-o", str(out)]) == 0


def test_a_second_writer_of_an_explorer_page_is_refused(good_plane, tmp_path, monkeypatch):
    """A second explorer into the same output, started while the first builds its page: it shared the
    first one's staging file (one of them failed, or a page could be another's)."""
    from landscape.errors import FileFormatError
    from landscape.plot import interactive
    out, build, second = tmp_path / "e.html", interactive.explorer_html, []

    def second_writer_meanwhile(*args, **kwargs):
        if not second:
            second.append(1)
            with pytest.raises(FileFormatError, match=f"{out} is being written by process {os.getpid()}"):
                interactive.write_explorer([good_plane], out)
        return build(*args, **kwargs)
    monkeypatch.setattr(interactive, "explorer_html", second_writer_meanwhile)
    interactive.write_explorer([good_plane], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.html"]


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_run, tmp_path, capsys):
    out = tmp_path / "p.h5"
    lock_path(out).write_text("999999999 somewhere 2020-01-01 00:00:00 UTC\n")  # nobody holds it
    r = run_main(capsys, "plane", tiny_run, *THREE, "--grid", 3, 3, "--quiet", "-o", out)
    assert r.returncode == 0, r.stderr
    assert not lock_path(out).exists()


@pytest.mark.slow
def test_two_concurrent_trains_on_one_output(uninterrupted_run, tmp_path):
    out = tmp_path / "run.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "landscape", *TRAIN, "-o", str(out)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not lock_path(out).exists() and first.poll() is None:
        time.sleep(0.05)
    second = cli(*TRAIN, "-o", out)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    # refused while the first writes, or (if it started late) because the first finished the output
    one_line_error(second)
    assert f"is being written by process {first.pid} since" in second.stderr or "already exists" in second.stderr
    assert sha256(out) == sha256(uninterrupted_run)


# ----------------------------------------------------------------------------------------------
# malformed files: one line naming the file and what is wrong, before any work

def _copy(src, dst, edit):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _layout_edit(key, change):
    def edit(f):
        entries = json.loads(f["layout"].attrs[key])
        change(entries)
        f["layout"].attrs[key] = json.dumps(entries)
    return edit


def _replace(name, data):
    def edit(f):
        del f[name]
        f[name] = data
    return edit


TRAJECTORY_DAMAGE = {
    "version 0": (lambda f: f.attrs.__setitem__("version", 0), "trajectory format version 0"),
    "version -1": (lambda f: f.attrs.__setitem__("version", -1), "trajectory format version -1"),
    "version 2": (lambda f: f.attrs.__setitem__("version", 2), "a newer landscape"),
    "version text": (lambda f: f.attrs.__setitem__("version", "1"), "trajectory format version '1'"),
    "offset beyond width": (_layout_edit("params", lambda e: e[-1].__setitem__("offset", 10 ** 9)),
                            "does not follow the one before it"),
    "shape disagrees": (_layout_edit("params", lambda e: e[0].__setitem__("shape", [3, 3, 3, 3])),
                        "does not follow the one before it"),
    "layout not JSON": (lambda f: f["layout"].attrs.__setitem__("params", "[{"), "not JSON"),
    "config not an object": (lambda f: f.attrs.__setitem__("config", "[1, 2]"), "not a JSON object"),
    "params too narrow": (_replace("runs/sgd/params", np.zeros((7, 5), np.float32)), "values per row"),
    "rows disagree": (_replace("runs/sgd/epoch", np.zeros(2)), "epoch has 2 rows"),
    "missing step": (lambda f: f.__delitem__("runs/sgd/step"), "has no step"),
    # readable files edited by hand: each was accepted, hid a run or crashed a later command
    "missing params": (lambda f: f.__delitem__("runs/sgd/params"), "run 'sgd' has no params"),
    "group in a run": (lambda f: f.create_group("runs/sgd/extra"), "/runs/sgd/extra is a group"),
    "epoch of strings": (_replace("runs/sgd/epoch", np.array([b"a"] * 7)), "/runs/sgd/epoch holds strings"),
    "integer params": (_replace("runs/sgd/params", np.zeros((7, 5), np.int32)), "/runs/sgd/params holds int32"),
    # attributes a reader took for JSON (tracebacks, or Python's RecursionError)
    "config nested too deep": (lambda f: f.attrs.__setitem__("config", "[" * 100000 + "]" * 100000),
                               "attribute 'config' is not JSON"),
    "buffer dtype unknown": (_layout_edit("buffers", lambda e: e[-1].__setitem__("dtype", "nn")),
                             "has dtype 'nn', not a torch dtype"),
    "model not an object": (lambda f: f.attrs.__setitem__("config", json.dumps(
        dict(json.loads(f.attrs["config"]), model="mlp"))), "the config's 'model' is not an object"),
}


def test_a_note_added_to_a_run_with_h5py_is_read_as_it_is(tiny_run, tmp_path, capsys):
    """Run attributes are JSON facts; one that is not (text or a number someone added) is kept as it is,
    not a reason to refuse the file (run() took every attribute for JSON: a traceback)."""
    from landscape.store import open_trajectory

    def notes(f):
        f["runs/sgd"].attrs["note"] = "a good run"
        f["runs/sgd"].attrs["count"] = np.int64(3)
    noted = _copy(tiny_run, tmp_path / "noted.h5", notes)
    attrs = open_trajectory(noted).run("sgd").attrs
    assert attrs["note"] == "a good run" and attrs["count"] == 3
    assert run_main(capsys, "info", noted).returncode == 0


@pytest.fixture(scope="module")
def killed_training(tmp_path_factory):
    """The folder of a training killed in lookahead's second epoch (sgd finished): run.h5.partial and its
    resume state."""
    folder = tmp_path_factory.mktemp("killed")
    assert cli(*TRAIN, "-o", folder / "run.h5", crash=(6, "before")).returncode == 9
    return folder


def _attrs(**attrs):
    return lambda f: f.attrs.update(attrs)


PARTIAL_DAMAGE = {
    "save point not a number": (_attrs(progress_state="abc"), "attribute 'progress_state' is not the number of a save point"),
    "more rows than held": (_attrs(progress_rows='{"lookahead/fast": 1000}'), "attribute 'progress_rows' does not count rows"),
    "rows not JSON": (_attrs(progress_rows="nope"), "attribute 'progress_rows' is not JSON"),
    "finished parts a list": (_attrs(finished='["sgd"]'), "attribute 'finished' is not a JSON object"),
    "finished run unknown": (_attrs(finished='{"sgd": ["nope"]}'), "attribute 'finished' does not list runs"),
    "no runs": (lambda f: f.__delitem__("runs"), "it has no /runs group"),
}


@pytest.mark.parametrize("case", sorted(PARTIAL_DAMAGE))
def test_a_partial_whose_bookkeeping_is_damaged_is_one_line(killed_training, tmp_path, capsys, case):
    """What a resumed run goes on from (finished parts, rows of the part under way, its save point), edited
    or damaged: tracebacks, or a run that went on from rows the file does not hold."""
    edit, message = PARTIAL_DAMAGE[case]
    folder = tmp_path / "run"
    shutil.copytree(killed_training, folder)
    with h5py.File(folder / "run.h5.partial", "r+") as f:
        assert {"finished", "progress_rows", "progress_state"} <= set(f.attrs)
        edit(f)
    one_line_error(run_main(capsys, *TRAIN, "-o", folder / "run.h5"), f"run.h5.partial is damaged: {message}",
                   "--overwrite")
    assert run_main(capsys, *TRAIN, "-o", folder / "run.h5", "--overwrite").returncode == 0


@pytest.mark.parametrize("case", sorted(TRAJECTORY_DAMAGE))
def test_malformed_trajectory_is_one_line_for_every_reader(tiny_run, tmp_path, case, capsys):
    edit, message = TRAJECTORY_DAMAGE[case]
    bad = _copy(tiny_run, tmp_path / "bad.h5", edit)
    for args in (["info", bad], ["plane", bad, *THREE, "--grid", 3, 3, "-o", tmp_path / "p.h5"],
                 ["line", bad, "sgd", "swa/average", "--points", 3, "-o", tmp_path / "l.h5"]):
        r = run_main(capsys, *args)
        one_line_error(r, str(bad), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


def _nonfinite(value):
    def edit(f):
        params = f["runs/swa/average/params"]
        row = params[-1]
        row[:3] = value
        params[-1] = row
    return edit


@pytest.mark.parametrize("value, name", [(np.nan, "NaN"), (np.inf, "inf")])
def test_checkpoint_with_non_finite_weights_is_refused_by_name(tiny_run, tmp_path, value, name, capsys):
    bad = _copy(tiny_run, tmp_path / "bad.h5", _nonfinite(value))
    r = run_main(capsys, "plane", bad, *THREE, "--grid", 3, 3, "-o", tmp_path / "p.h5")
    one_line_error(r, "checkpoint 'swa/average:", "non-finite weights", "3 of")
    assert "identical weights" not in r.stderr and not (tmp_path / "p.h5.partial").exists()


def test_pca_of_a_run_with_non_finite_checkpoints_is_refused_by_name(tiny_run, tmp_path, capsys):
    def edit(f):
        params = f["runs/sgd/params"]
        row = params[2]
        row[0] = np.nan
        params[2] = row
    bad = _copy(tiny_run, tmp_path / "bad.h5", edit)
    r = run_main(capsys, "plane", bad, "--pca", "sgd", "--grid", 3, 3, "-o", tmp_path / "p.h5")
    one_line_error(r, "checkpoints sgd:2 of", "non-finite weights")


@pytest.fixture(scope="module")
def good_plane(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("plane") / "p.h5"
    assert main(["plane", str(tiny_run), *THREE, "--grid", "4", "3", "--quiet", "-o", str(out)]) == 0
    return out


SURFACE_DAMAGE = {
    "version 0": (lambda f: f.attrs.__setitem__("version", 0), "surface format version 0"),
    "version -1": (lambda f: f.attrs.__setitem__("version", -1), "surface format version -1"),
    "spec not JSON": (lambda f: f.attrs.__setitem__("spec", "{kind: plane"), "'spec' is not JSON"),
    "missing grid x": (lambda f: f.__delitem__("grid/x"), "missing /grid/x"),
    "values shape": (_replace("values/test_err", np.zeros((3, 4))), "/values/test_err has shape [3, 4]"),
    "done shape": (_replace("done", np.ones((4, 4), bool)), "/done has shape [4, 4]"),
    "grid too short": (_replace("grid/y", np.arange(2.0)), "/done has shape [4, 3], the grid 4 x 2"),
    # readable files edited by hand: each crashed a reader, or drew a plane as rays
    "plane without y": (lambda f: f.__delitem__("grid/y"), "spec says 'plane' but /grid/y is missing"),
    "NaN coordinate": (_replace("grid/x", np.array([0.0, np.nan, 1.0, 2.0])), "/grid/x holds NaN"),
    "axis reversed": (_replace("grid/y", np.array([1.0, 0.0, -1.0])), "/grid/y is not in increasing order"),
    "values of strings": (_replace("values/train_loss", np.full((4, 3), b"a")), "/values/train_loss holds strings"),
    "done of integers": (_replace("done", np.ones((4, 3), np.int8)), "/done holds int8"),
    # readable files edited by hand: each crashed a reader with a traceback
    "task not an object": (lambda f: f.attrs.__setitem__("spec", json.dumps(
        dict(json.loads(f.attrs["spec"]), task="regression"))), "the spec's task is not an object"),
    "point of 5 coordinates": (_replace("points/sgd:6", np.zeros(5)), "/points/sgd:6 has shape [5]"),
    "path of 5 coordinates": (_replace("paths/sgd", np.zeros((7, 5))), "/paths/sgd has shape [7, 5]"),
    "distances too few": (_replace("path_distances/sgd", np.zeros(2)), "not one value per checkpoint of /paths/sgd"),
}


@pytest.mark.parametrize("case", sorted(SURFACE_DAMAGE))
def test_malformed_surface_is_one_line_for_every_reader(good_plane, tmp_path, case, capsys):
    edit, message = SURFACE_DAMAGE[case]
    bad = _copy(good_plane, tmp_path / "bad.h5", edit)
    for args in (["plot", bad, "-o", tmp_path / "figs"], ["explore", bad, "-o", tmp_path / "e.html"],
                 ["export", bad, "--to", "csv", "-o", tmp_path / "v.csv"]):
        r = run_main(capsys, *args)
        one_line_error(r, str(bad), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


@pytest.fixture(scope="module")
def good_sharpness(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharpness") / "s.h5"
    assert main(["sharpness", str(tiny_run), "sgd", "--top-k", "1", "--iterations", "3", "--probes", "2",
                 "--ascent-steps", "1", "--samples", "50", "--quiet", "-o", str(out)]) == 0
    return out


SHARPNESS_DAMAGE = {
    "version text": (lambda f: f.attrs.__setitem__("version", "abc"), "sharpness format version 'abc'"),
    "spec nested too deep": (lambda f: f.attrs.__setitem__("spec", "[" * 100000 + "]" * 100000),
                             "attribute 'spec' is not JSON"),
    "spec without options": (lambda f: f.attrs.__setitem__("spec", "{}"), "attribute 'spec' has no 'sharpness'"),
    "task not an object": (lambda f: f.attrs.__setitem__("spec", json.dumps(
        dict(json.loads(f.attrs["spec"]), task="regression"))), "the spec's task is not an object"),
    "task's percent a number": (lambda f: f.attrs.__setitem__("spec", json.dumps(
        dict(json.loads(f.attrs["spec"]), task={"name": "classification", "percent": 5}))),
        "the spec's task is not an object"),
    "no values of the task's primary metric": (lambda f: f.attrs.__setitem__("spec", json.dumps(
        dict(json.loads(f.attrs["spec"]), task={"name": "x", "primary": "foo"}))), "missing /metrics/test_foo"),
    "missing trace": (lambda f: f.__delitem__("trace"), "missing /trace"),
    "eigenvalues of strings": (_replace("eigenvalues", np.array([[b"a"]])), "/eigenvalues holds strings"),
    # a 15 KB file declaring 3 GiB of eigenvalues took 19 GB of memory to read as Python floats
    "rows longer than the spec": (_replace("eigenvalues", np.zeros((1, 50))),
                                  "/eigenvalues has rows of 50 values; the spec's top_k is 1"),
    "a row too many": (_replace("trace", np.zeros(2)), "/trace has shape (2,), not (1,) for 1 checkpoints"),
    "metrics not a group": (lambda f: (f.__delitem__("metrics"), f.__setitem__("metrics", np.zeros(1))),
                            "/metrics is not a group"),
}


@pytest.mark.parametrize("case", sorted(SHARPNESS_DAMAGE))
def test_malformed_sharpness_file_is_one_line_for_every_reader(good_sharpness, good_plane, tmp_path, case, capsys):
    edit, message = SHARPNESS_DAMAGE[case]
    bad = _copy(good_sharpness, tmp_path / "bad.h5", edit)
    for args in (["info", bad], ["plot", "--sharpness", bad, "-o", tmp_path / "figs"],
                 ["explore", good_plane, "--sharpness", bad, "-o", tmp_path / "e.html"]):
        r = run_main(capsys, *args)
        one_line_error(r, str(bad), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "run.h5"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "landscape", "info", str(fifo)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)  # (in this process, a regression would wait for ever)
    one_line_error(r, f"{fifo} is not a regular file")


@pytest.mark.parametrize("attribute, message", [("format", "is damaged: its HDF5 metadata cannot be read"),
                                                ("spec", "attribute 'spec' cannot be read")])
def test_attribute_bytes_hdf5_cannot_read_are_one_line(good_plane, tmp_path, monkeypatch, capsys, attribute, message):
    """A byte flipped in an attribute's heap: h5py raises OSError ("bad heap pointer") when it is read."""
    from h5py._hl.attrs import AttributeManager
    get = AttributeManager.__getitem__

    def damaged(self, name):
        if name == attribute:
            raise OSError("Can't synchronously read data (bad heap pointer, heap object = {1b3, 1})")
        return get(self, name)
    monkeypatch.setattr(AttributeManager, "__getitem__", damaged)
    for args in (["info", good_plane], ["plot", good_plane, "-o", tmp_path / "figs"]):
        one_line_error(run_main(capsys, *args), str(good_plane), message)


def test_dataset_bytes_hdf5_cannot_read_are_one_line(good_plane, tiny_run, monkeypatch, capsys):
    """Damaged compressed bytes (h5py's OSError) where a reader reads a file whole, and where a command
    reads rows later (the last resort of every command: one line in HDF5's words)."""
    import h5py._hl.dataset
    monkeypatch.setattr(h5py._hl.dataset.Dataset, "__getitem__", lambda self, *a: (_ for _ in ()).throw(
        OSError("Can't synchronously read data (inflate() failed)")))
    one_line_error(run_main(capsys, "info", good_plane), f"{good_plane} is not a valid surface file: Can't "
                   "synchronously read data (inflate() failed)")
    one_line_error(run_main(capsys, "info", tiny_run), "Can't synchronously read data (inflate() failed)")


def test_compressed_datasets_that_fit_in_memory_one_by_one_but_not_together_are_refused(tiny_run, tmp_path, capsys):
    """Each passes the check of its own declared size; ``info`` read them all at once (a 15 KB file took
    gigabytes)."""
    from landscape.store.files import available_memory
    crafted = tmp_path / "crafted.h5"
    crafted.write_bytes(tiny_run.read_bytes())
    with h5py.File(crafted, "r+") as f:
        rows = f["runs/sgd/params"].shape[0]
        width = int(0.6 * available_memory() / 8 / rows)
        for name in ("foo", "bar"):
            f.create_dataset(f"runs/sgd/{name}", (rows, width), np.float64, chunks=(1, 1 << 20), compression="gzip")
    one_line_error(run_main(capsys, "info", crafted), str(crafted), "2 compressed datasets declare", "together")


@pytest.mark.parametrize("files, room", [
    ({"memory.max": "max\n", "memory.current": "123\n"}, None),                     # v2 without a limit
    ({"memory.max": "1000\n", "memory.current": "400\n"}, 600),                     # v2, a container's limit
    ({"memory.max": "1000\n", "memory.current": "1500\n"}, 0),
    ({"memory.max": "1000\n", "memory.current": "900\n",                          # page cache counts as free
      "memory.stat": "anon 300\ninactive_file 500\nactive_file 100\n"}, 600),
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"}, None),
    ({"memory/memory.limit_in_bytes": "2048\n", "memory/memory.usage_in_bytes": "48\n"}, 2000),  # v1
    ({"memory/memory.limit_in_bytes": "2048\n", "memory/memory.usage_in_bytes": "2000\n",
      "memory/memory.stat": "cache 1900\ntotal_inactive_file 1000\n"}, 1048),
    ({}, None),                                                                      # no cgroup files
])
def test_available_memory_stays_within_a_containers_limit(tmp_path, monkeypatch, files, room):
    """Memory checks (a file's declared sizes, the Hessian graphs kept) count what the memory cgroup
    still allows, not only the host's MemAvailable."""
    from landscape.store import files as store_files
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert store_files.cgroup_room(tmp_path) == room
    monkeypatch.setattr(store_files, "CGROUP", tmp_path)
    if room is not None:  # a few bytes: far below what the host has available
        assert store_files.available_memory() == room
