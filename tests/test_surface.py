"""compute_surface and the plane/line commands: the file, resume after an interruption, refusal of a
different spec, the loss-landscape export, one-line errors, and torchrun sharding."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from landscape.device import can_fork
from landscape.errors import FileFormatError
from landscape.evaluate import Evaluator
from landscape.geometry import Line, Plane
from landscape.store import open_surface, open_trajectory
from landscape.store.surface import open_partial_surface
from landscape.surface import compute_surface

from _cli import one_line_error, run_cli

THREE = ("sgd", "swa/average", "swa/iterates:0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




@pytest.fixture(scope="module")
def traj(tiny_run):
    return open_trajectory(tiny_run)


@pytest.fixture(scope="module")
def reference(traj):
    """An uninterrupted in-memory 5 x 4 plane (two points per call)."""
    return compute_surface(traj, Plane.through(traj, *THREE), (5, 4), quiet=True, points_per_call=2)


def test_plane_file(traj, reference, tmp_path):
    out = tmp_path / "plane.h5"
    surf = compute_surface(traj, Plane.through(traj, *THREE), (5, 4), out=out, quiet=True, points_per_call=2)
    assert out.exists() and not (tmp_path / "plane.h5.partial").exists()
    assert surf.kind == "plane" and surf.done.all() and surf.x.shape == (5,) and surf.y.shape == (4,)
    for m in ("train_loss", "train_err", "test_loss", "test_err"):
        assert surf.values[m].shape == (5, 4) and surf.values[m].dtype == np.float64
        np.testing.assert_array_equal(surf.values[m], reference.values[m])
    spec = surf.spec
    assert spec["kind"] == "plane" and spec["method"] == "through" and spec["origin"] == "sgd:6"
    assert spec["checkpoints"] == {"a": "sgd:6", "b": "swa/average:3", "c": "swa/iterates:0"}
    assert spec["bn"]["policy"] == "recompute" and spec["grid"]["x"][2] == 5 and spec["grid"]["y"][2] == 4
    assert spec["dataset"]["name"] == "synthetic" and "points" in spec["derived"]
    assert set(surf.paths) == set(traj.runs) and "swa/average:3" in surf.points
    basis = surf.basis()
    assert abs(float(basis["u"].astype(np.float64) @ basis["v"])) < 1e-6
    assert surf.trajectory_sha256 == traj.sha256()
    # the same spec again: the finished file is not overwritten by accident
    with pytest.raises(FileFormatError, match="already exists"):
        compute_surface(traj, Plane.through(traj, *THREE), (5, 4), out=out, quiet=True)


def test_a_surface_in_memory_is_never_saved_over_its_trajectory(traj, reference):
    with pytest.raises(FileFormatError, match="is the input"):
        reference.save(traj.path, overwrite=True)
    assert open_trajectory(traj.path).runs == traj.runs


def _points_evaluated(monkeypatch, log: Path):
    """Count the points evaluated, by this process and by the worker processes forked from it (each
    call appends its count to ``log``); returns a function giving the total so far."""
    call = Evaluator.__call__

    def counted(self, w, b):
        with open(log, "a") as f:
            f.write(f"{len(w)}\n")
        return call(self, w, b)
    monkeypatch.setattr(Evaluator, "__call__", counted)
    return lambda: sum(map(int, log.read_text().split())) if log.exists() else 0


def test_interrupted_run_resumes_to_the_same_file(traj, reference, tmp_path, monkeypatch, two_workers):
    """Ctrl-C while the workers have points under way: they are stopped, the points written stay in
    OUT.partial, and the same command evaluates only the rest, into the uninterrupted file."""
    import multiprocessing
    out = tmp_path / "plane.h5"
    plane = Plane.through(traj, *THREE)
    writes = []
    evaluated = _points_evaluated(monkeypatch, tmp_path / "evaluated")

    def stop_after_two(done, total):
        writes.append(done)
        if len(writes) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_surface(traj, plane, (5, 4), out=out, quiet=True, points_per_call=2, write_every=0,
                        on_write=stop_after_two)
    assert not out.exists() and (tmp_path / "plane.h5.partial").exists() and not multiprocessing.active_children()
    with h5py.File(tmp_path / "plane.h5.partial", "r") as f:
        first = int(f["done"][()].sum())
        assert first == writes[-1] and 0 < first < 20 and not f.attrs["complete"]  # both flushes kept
    kept = open_partial_surface(tmp_path / "plane.h5.partial")  # what `landscape info` shows of it
    assert int(kept.done.sum()) == first
    for m in reference.values:
        np.testing.assert_array_equal(kept.values[m][kept.done], reference.values[m][kept.done])
    before = evaluated()
    resumed = []
    surf = compute_surface(traj, plane, (5, 4), out=out, quiet=True, points_per_call=2, write_every=0,
                           on_write=lambda done, total: resumed.append(done))
    assert resumed[-1] == 20 and evaluated() - before == 20 - first  # only the missing points
    for m in reference.values:
        np.testing.assert_array_equal(surf.values[m], reference.values[m])


def test_a_computation_resumed_on_another_device_chooses_its_points_per_call_again(traj, tmp_path, monkeypatch):
    """The points per call a partial keeps are those of the device they were chosen for: on the same
    kind of device they are kept (the same values to the bit), on another (a GPU's 64 resumed on a
    smaller GPU would run out of memory) they are measured again; every value computed stays."""
    import landscape.surface as surface_module
    out = tmp_path / "plane.h5"
    plane = Plane.through(traj, *THREE)
    measured = []
    measure = surface_module._measure
    monkeypatch.setattr(surface_module, "_measure", lambda *a: measured.append(1) or measure(*a))

    def stop(done, total):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        compute_surface(traj, plane, (5, 4), out=out, quiet=True, write_every=0, on_write=stop)
    with h5py.File(tmp_path / "plane.h5.partial", "r+") as f:
        assert f.attrs["computed_on"] == "cpu" and len(measured) == 1
        kept, k = f["done"][()].copy(), int(f.attrs["points_per_call"])
        f.attrs["points_per_call"], f.attrs["computed_on"] = 64, "cuda (NVIDIA H200)"  # as a big GPU left it
    surf = compute_surface(traj, plane, (5, 4), out=out, quiet=True, write_every=0)
    assert len(measured) == 2 and surf.points_per_call == k and surf.done[kept].all()
    with h5py.File(out, "r") as f:
        assert f.attrs["computed_on"] == "cpu"


@pytest.mark.parametrize("forked", [True, False])
def test_workers_do_not_change_the_values(traj, reference, monkeypatch, forked):
    """On a CPU, torch.get_num_threads() single-threaded workers share the points: processes forked from
    this one (Linux, data in memory) or threads of it; each point sees the same calls, so one worker or
    three write the same numbers, and none is left running."""
    import multiprocessing
    import landscape.surface as surface_module
    from landscape.device import can_fork
    if forked and not can_fork():
        pytest.skip("workers are forked on Linux")
    monkeypatch.setattr(surface_module, "can_fork", lambda: forked)
    made = []
    evaluator = surface_module._PointEvaluator.__enter__
    monkeypatch.setattr(surface_module._PointEvaluator, "__enter__",
                        lambda self: made.append(type(evaluator(self).pool).__name__) or self)
    n = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            surf = compute_surface(traj, Plane.through(traj, *THREE), (5, 4), quiet=True, points_per_call=2)
            assert torch.get_num_threads() == threads  # restored
            for m in reference.values:
                np.testing.assert_array_equal(surf.values[m], reference.values[m])
            assert not multiprocessing.active_children()
    finally:
        torch.set_num_threads(n)
    assert made == ["NoneType", "ForkedWorkers" if forked else "ThreadPoolExecutor"]


def test_a_worker_processs_error_is_raised_as_it_is_and_the_finished_points_stay(traj, reference, tmp_path,
                                                                                monkeypatch, two_workers):
    """A user's model that raises in a forked worker: the same exception here, one line with what was
    kept, no worker left running; the same command then finishes the plane with the values of one
    uninterrupted."""
    import multiprocessing
    out, plane, here, calls = tmp_path / "plane.h5", Plane.through(traj, *THREE), os.getpid(), []
    call = Evaluator.__call__

    def third_call_fails(self, w, b):  # in each worker: its third call
        calls.append(1)
        if os.getpid() != here and len(calls) == 3:
            raise ValueError("the model's own error")
        return call(self, w, b)
    with monkeypatch.context() as m:
        m.setattr(Evaluator, "__call__", third_call_fails)
        with pytest.raises(ValueError, match="the model's own error") as e:
            compute_surface(traj, plane, (5, 4), out=out, quiet=True, points_per_call=2, write_every=0)
    assert not calls and not multiprocessing.active_children()  # (this process evaluated nothing)
    assert "points kept in" in str(e.value.__notes__) and (tmp_path / "plane.h5.partial").exists()
    surf = compute_surface(traj, plane, (5, 4), out=out, quiet=True, points_per_call=2)
    for m in reference.values:
        np.testing.assert_array_equal(surf.values[m], reference.values[m])


def test_a_worker_process_killed_is_one_line_and_the_same_command_finishes(traj, reference, tmp_path, monkeypatch,
                                                                          two_workers):
    """A forked worker killed (out of memory: SIGKILL) mid-plane: ProcessDied naming it and what was
    kept (it was a wait for ever), the other worker stopped; run again, the plane is the uninterrupted
    one."""
    import multiprocessing
    from landscape.errors import ProcessDied
    out, plane, here, calls = tmp_path / "plane.h5", Plane.through(traj, *THREE), os.getpid(), []
    call = Evaluator.__call__

    def killed_at_third_call(self, w, b):
        calls.append(1)
        if os.getpid() != here and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return call(self, w, b)
    with monkeypatch.context() as m:
        m.setattr(Evaluator, "__call__", killed_at_third_call)
        with pytest.raises(ProcessDied, match=r"worker process \d \(pid \d+\) stopped: killed by SIGKILL \(out of "
                                              r"memory\?\); \d+ of 20 points kept in .*plane.h5.partial"):
            compute_surface(traj, plane, (5, 4), out=out, quiet=True, points_per_call=2, write_every=0)
    assert not multiprocessing.active_children()
    surf = compute_surface(traj, plane, (5, 4), out=out, quiet=True, points_per_call=2)
    for m in reference.values:
        np.testing.assert_array_equal(surf.values[m], reference.values[m])


def test_different_spec_is_refused(traj, tmp_path):
    out = tmp_path / "plane.h5"
    with pytest.raises(KeyboardInterrupt):
        compute_surface(traj, Plane.through(traj, *THREE), (5, 4), out=out, quiet=True, points_per_call=2,
                        write_every=0, on_write=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(FileFormatError, match="different spec"):
        compute_surface(traj, Plane.through(traj, *THREE), (5, 4), out=out, bn="stored", quiet=True)
    with pytest.raises(FileFormatError, match="different spec"):
        compute_surface(traj, Plane.through(traj, *THREE), (4, 5), out=out, quiet=True)
    surf = compute_surface(traj, Plane.through(traj, *THREE), (4, 5), out=out, quiet=True, overwrite=True,
                           points_per_call=4)
    assert surf.done.shape == (4, 5) and surf.done.all()


def test_a_checkpoint_of_another_file_is_recorded_by_its_sha256_and_resumes_only_with_that_file(traj, tmp_path):
    """Checkpoint names carry another file's base name only: a run resumed with a different file of the
    same name is refused, not finished with the other file's weights."""
    import shutil
    from landscape.store.files import sha256
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(traj.path, tmp_path / folder / "other.h5")
    with h5py.File(tmp_path / "b" / "other.h5", "r+") as f:  # b's checkpoints moved a little
        f["runs/swa/average/params"][-1] = f["runs/swa/average/params"][-1] * 1.01
    out, ranges = tmp_path / "plane.h5", dict(xrange=(-1, 2), yrange=(-1, 2))  # (the same grid)
    through = lambda folder: Plane.through(traj, "sgd", f"{tmp_path / folder / 'other.h5'}:swa/average", "swa/iterates:0")  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        compute_surface(traj, through("a"), (5, 4), out=out, **ranges, quiet=True, points_per_call=2, write_every=0,
                        on_write=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(FileFormatError, match="another file for checkpoint other.h5:swa/average:3"):
        compute_surface(traj, through("b"), (5, 4), out=out, **ranges, quiet=True, points_per_call=2)
    surf = compute_surface(traj, through("a"), (5, 4), out=out, **ranges, quiet=True, points_per_call=2)
    assert surf.spec["other_files"] == {"other.h5:swa/average:3": sha256(tmp_path / "a" / "other.h5")}


def test_lines_and_rays(traj, tmp_path):
    line = compute_surface(traj, Line.through(traj, "sgd", "swa/average"), (7,), out=tmp_path / "l.h5",
                           quiet=True, points_per_call=3, weight_decay=5e-4)
    assert line.kind == "line" and not line.rays and line.values["train_loss"].shape == (7,)
    assert line.spec["derived"]["length"] > 0 and line.spec["range"] == [-0.5, 1.5]
    assert line.points["swa/average:3"].coords[0] == pytest.approx(line.spec["derived"]["length"], rel=1e-5)
    assert "train_loss_l2" in line.values and np.all(line.values["train_loss_l2"] > line.values["train_loss"])
    rays = compute_surface(traj, Line.random_rays(traj, "swa/average", n=3, max_distance=2.0), (4,),
                           out=tmp_path / "r.h5", quiet=True, points_per_call=5)
    assert rays.rays and rays.values["test_err"].shape == (3, 4) and rays.done.all()
    assert rays.spec["method"] == "ray" and rays.spec["rays"] == 3 and rays.x[-1] == 2.0
    # x = 0 is the origin on every ray (to float32 rounding: the rays sit at different places in a batch)
    np.testing.assert_allclose(rays.values["train_loss"][:, 0], rays.values["train_loss"][0, 0], rtol=1e-6)
    assert rays.basis()["u"].shape == (3, traj.layout.num_params)


def test_cli_plane_export_non_square(tiny_run, tmp_path):
    from landscape.cli.main import main
    out = tmp_path / "p.h5"
    assert main(["plane", str(tiny_run), *THREE, "-o", str(out), "--grid", "5", "4", "--export", "loss-landscape",
                 "--quiet", "--points-per-call", "4"]) == 0
    surf = open_surface(out)
    with h5py.File(tmp_path / "p.loss-landscape.h5", "r") as f:
        assert f["train_loss"].shape == (4, 5) and f["test_acc"].shape == (4, 5)  # [iy, ix]
        np.testing.assert_array_equal(f["train_loss"][()], surf.values["train_loss"].T)
        np.testing.assert_array_equal(f["test_acc"][()], 100 - surf.values["test_err"].T)
        np.testing.assert_array_equal(f["xcoordinates"][()], surf.x)
        np.testing.assert_array_equal(f["ycoordinates"][()], surf.y)


@pytest.mark.parametrize("args, message", [
    (["sgd", "swa/average", "swa/iterates:42"], "not found"),
    (["sgd", "swa/average:0", "swa/iterates:0"], "same point"),
    (["sgd", "swa/average", "swa/iterates:0", "--grid", "0", "4"], "no points"),
    (["sgd", "swa/average"], "three"),
    (["--origin", "sgd", "--random", "--bn", "interpolate"], "interpolate"),
])
def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys, args, message):
    from landscape.cli.main import main
    assert main(["plane", str(tiny_run), *args, "-o", str(tmp_path / "p.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("landscape: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "p.h5").exists()


def test_cli_not_a_trajectory(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_text("hello")
    one_line_error(capsys, ["line", bad, "sgd", "swa/average", "-o", tmp_path / "l.h5"], "not an HDF5 file")


@pytest.mark.slow
def test_cli_killed_and_run_again(tiny_run, tmp_path):
    """SIGTERM mid-way keeps the .partial file; the same command finishes it; the result equals an
    uninterrupted run."""
    out = tmp_path / "p.h5"
    args = ["plane", tiny_run, *THREE, "-o", out, "--grid", 30, 30, "--points-per-call", 1, "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "landscape", *map(str, args)], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "p.h5.partial"
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial.exists():
            try:  # the writer may be midway through a flush: read again later
                with h5py.File(partial, "r", locking=False) as f:
                    if "done" in f and f["done"][()].any():
                        break
            except (OSError, RuntimeError, KeyError):
                pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and partial.exists() and not out.exists()
    with h5py.File(partial, "r") as f:
        first = int(f["done"][()].sum())
    assert 0 < first < 900
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    surf = open_surface(out)
    whole = run_cli(*[a if a != out else tmp_path / "whole.h5" for a in args], env=env)
    assert whole.returncode == 0, whole.stderr
    ref = open_surface(tmp_path / "whole.h5")
    for m in ref.values:
        np.testing.assert_array_equal(surf.values[m], ref.values[m])


@pytest.mark.distributed
def test_torchrun_two_cpu_processes_write_the_single_process_file(tiny_run, tmp_path):
    args = ["plane", tiny_run, *THREE, "--grid", 5, 4, "--points-per-call", 2, "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = run_cli(*args, "-o", tmp_path / "single.h5", env=env)
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "landscape", *map(str, args), "-o", str(tmp_path / "dist.h5")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)  # its own process group, so a hang is cleaned up
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err
    assert out.count("wrote") == 1  # one rank writes and reports
    a, b = open_surface(tmp_path / "single.h5"), open_surface(tmp_path / "dist.h5")
    assert a.spec == b.spec and b.done.all()
    for m in a.values:
        np.testing.assert_array_equal(a.values[m], b.values[m])
    for run in a.paths:
        np.testing.assert_array_equal(a.paths[run].coords, b.paths[run].coords)


def test_torchrun_with_more_processes_than_gpus_is_refused_before_nccl(monkeypatch):
    """NCCL takes one GPU per process; 4 processes on a machine with 2 GPUs (or all on cuda:1) failed
    at the first collective, reported as a dead peer. They are refused when the group is joined."""
    from landscape.dist import Group
    from landscape.errors import ConfigError
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("a GPU was taken"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"4 processes on this machine, which has 2 GPUs.*--nproc_per_node 2"):
        Group.join(torch.device("cuda"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 processes on this machine, all on cuda:1.*--device cuda"):
        Group.join(torch.device("cuda:1"))


@pytest.mark.distributed
def test_a_torchrun_process_killed_mid_plane_is_one_line_saying_what_was_kept(tiny_run, tmp_path):
    """kill -9 of one rank: the rank left says in one line that a process of the group stopped and how
    many points were kept where (it was gloo's 30-line traceback), and the same command finishes."""
    # a grid that outlasts the first save point on a fast machine too
    args = ["plane", tiny_run, *THREE, "--grid", 81, 61, "--points-per-call", 2, "--quiet", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "landscape", *map(str, args), "-o", str(tmp_path / "dist.h5")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        deadline, saved = time.time() + 120, 0
        while time.time() < deadline and not saved:
            time.sleep(0.2)
            try:
                with h5py.File(tmp_path / "dist.h5.partial", "r", locking=False) as f:
                    saved = int(f["done"][()].sum())
            except (OSError, KeyError):
                pass
        assert saved, "no point was saved"
        ranks = [pid for pid in _descendants(proc.pid) if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
        os.kill(ranks[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    ours = [line for line in err.splitlines() if line.startswith("landscape:")]
    # what rank 0 meets first: the collective failing, or torchrun's SIGTERM after it saw the death
    assert len(ours) == 1 and ("another process of the torchrun group stopped" in ours[0]
                               or ours[0].startswith("landscape: interrupted: ")), err
    assert "points kept in" in ours[0] and "run the same command again" in ours[0], err
    assert not [line for line in err.splitlines() if line.startswith("[rank0]")], err  # no traceback of ours
    again = run_cli(*args, "-o", tmp_path / "dist.h5", env=env)
    assert again.returncode == 0, again.stderr
    assert open_surface(tmp_path / "dist.h5").done.all()


def _descendants(pid: int) -> list:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child)] + _descendants(int(child))
    return found



def test_only_a_peer_gone_is_called_so():
    """A collective's RuntimeError says another process stopped only when the backend says a peer is
    gone; this process's own errors (its out-of-memory) stay as they are."""
    import re

    import torch

    from landscape.dist import _peers
    from landscape.errors import ProcessDied
    with pytest.raises(ProcessDied, match=r"^another process of the torchrun group stopped \(Connection closed "
                                          r"by peer \[127\.0\.0\.1\]:16046\)$"):
        with _peers():
            raise RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                               "by peer [127.0.0.1]:16046. This is typically caused by a remote worker crashing.")
    for own in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("shape '[2, 3]' is invalid for input of size 7")):
        with pytest.raises(type(own), match=re.escape(str(own))):
            with _peers():
                raise own


@pytest.mark.skipif(not can_fork(), reason="forked workers are Linux's")
@pytest.mark.parametrize("kernel_kills", [True, False])
def test_forked_workers_end_with_their_parent_killed(tmp_path, kernel_kills):
    """``kill -9`` of the evaluating process alone (the out-of-memory killer's way): its workers ended
    with it, where they slept on forever holding the output's lock, and the same command was refused.
    Linux kills them (PR_SET_PDEATHSIG); without that, each reads the end of its pipe, since none holds
    the parent's ends any more."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        import landscape.device as device
        if not {kernel_kills}:
            device._die_with_parent = lambda parent: None
        with device.ForkedWorkers(lambda j, x: time.sleep(x), 2) as pool:
            print(" ".join(str(p.pid) for p in pool.procs), flush=True)
            for _ in pool.map([0.2] * 1000):
                pass
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2
        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # (a zombie has ended; init reaps it)
    except FileNotFoundError:
        return False
