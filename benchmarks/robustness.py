"""The robustness campaign: real kill -9 at random moments, real full disks (a small tmpfs; needs root),
two writers of one output, malformed files. Every run either succeeds or fails in one line with a
non-zero exit; after a kill or a full disk the same command resumes and loses nothing (train: the same
bytes as an uninterrupted run; plane, line: the same values).

    python benchmarks/robustness.py [--kills 12] [--out benchmarks/results/robustness.json]

Prints a table, campaign by campaign: tried, held, failed, and how many failures were tracebacks,
crashes (death by a signal) and lost work.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TRAIN = ["train", "--dataset", "synthetic", "--model", "mlp", "--epochs", "3", "--methods", "sgd,swa",
         "--swa-start", "2", "--quiet"]
THREE = ["sgd", "swa/average", "swa/iterates:0"]


def plane_args(traj):
    return ["plane", str(traj), *THREE, "--grid", "9", "8", "--points-per-call", "2", "--quiet"]


def line_args(traj):
    return ["line", str(traj), "sgd", "swa/average", "--points", "31", "--points-per-call", "1", "--quiet"]


def start(args):
    return subprocess.Popen([sys.executable, "-m", "landscape", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))


def run(args):
    p = start(args)
    out, err = p.communicate()
    return p.returncode, err


class Tally:
    def __init__(self):
        self.rows = {}

    def add(self, campaign: str, ok: bool, rc: int, err: str, lost: bool = False, note: str = ""):
        row = self.rows.setdefault(campaign, {"tried": 0, "held": 0, "failed": 0, "tracebacks": 0, "crashes": 0,
                                              "lost work": 0, "failures": []})
        traceback = "Traceback" in err
        crash = rc < 0 and rc not in (-9, -15) or rc in (139, 134)
        held = ok and not traceback and not crash and not lost
        row["tried"] += 1
        row["held" if held else "failed"] += 1
        row["tracebacks"] += traceback
        row["crashes"] += crash
        row["lost work"] += lost
        if not held:
            row["failures"].append(f"{note} rc={rc} {err.strip().splitlines()[-1] if err.strip() else ''}")

    def print(self):
        print(f"{'campaign':<24}{'tried':>7}{'held':>7}{'failed':>8}{'tracebacks':>12}{'crashes':>9}{'lost work':>11}")
        for name, r in self.rows.items():
            print(f"{name:<24}{r['tried']:>7}{r['held']:>7}{r['failed']:>8}{r['tracebacks']:>12}{r['crashes']:>9}"
                  f"{r['lost work']:>11}")
            for f in r["failures"]:
                print(f"    {f}")


def one_line(rc, err):
    return rc == 2 and err.startswith("landscape: error: ") and err.count("\n") == 1


def sha(path):
    from landscape.store.files import sha256
    return sha256(path)


def same_values(a, b) -> bool:
    from landscape.store import open_surface
    x, y = open_surface(a), open_surface(b)
    return all(np.array_equal(x.values[k], y.values[k], equal_nan=True) for k in x.values) and bool(x.done.all())


def kill_campaign(tally, name, args, out: Path, reference, compare, kills, window, rng):
    for i in range(kills):
        for p in out.parent.glob(out.name + "*"):
            p.unlink()
        proc = start([*args, "-o", out])
        time.sleep(rng.uniform(*window))
        proc.kill()
        _, err1 = proc.communicate()
        rc, err = run([*args, "-o", out])
        lost = rc == 0 and not compare(out, reference)
        tally.add(name, rc == 0 and "Traceback" not in err1, rc, err1 + err, lost, note=f"kill {i}")


def small_disk(size: str):
    folder = Path(tempfile.mkdtemp(prefix="landscape-disk-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        return None
    return folder


def full_disk_campaign(tally, name, args, out_name, reference, compare, sizes):
    for size in sizes:
        disk = small_disk(size)
        if disk is None:
            print(f"{name}: cannot mount a tmpfs here (needs root); skipped")
            return
        try:
            out = disk / out_name
            rc, err = run([*args, "-o", out])
            ok = rc == 0 or (one_line(rc, err) and "no space left on device" in err)
            rc2, err2 = run([*args, "-o", out])  # still full: the same one line, nothing lost
            ok = ok and (rc2 == 0 or one_line(rc2, err2))
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            rc3, err3 = run([*args, "-o", out])
            lost = rc3 != 0 or not compare(out, reference)
            tally.add(name, ok and rc3 == 0, rc3 if rc3 else rc, err + err2 + err3, lost, note=f"tmpfs {size}")
        finally:
            subprocess.run(["umount", str(disk)], capture_output=True)
            shutil.rmtree(disk, ignore_errors=True)


def concurrent_campaign(tally, name, args, folder: Path, reference, compare, delays):
    for delay in delays:
        out = folder / f"{name}-{delay}.h5"
        first = start([*args, "-o", out])
        time.sleep(delay)
        second = start([*args, "-o", out])
        (_, e1), (_, e2) = first.communicate(), second.communicate()
        r1, r2 = first.returncode, second.returncode
        # one wins; the other is refused in one line naming the winner (or, started after the first
        # finished, is refused for an existing output, or resumes and finishes it)
        refused = [e for r, e in ((r1, e1), (r2, e2)) if r != 0]
        ok = (r1 == 0 or r2 == 0) and all(one_line(2, e) for e in refused)
        lost = not out.exists() or not compare(out, reference)
        tally.add(name, ok, r1 if r1 else r2, e1 + e2, lost, note=f"second after {delay} s")


def malformed_campaign(tally, folder: Path, traj: Path, plane: Path):
    import contextlib
    import io

    import h5py
    import test_robustness as t
    from landscape.cli.main import main

    def call(args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main([str(a) for a in args])
            except BaseException as e:  # a traceback: counted, not raised
                import traceback
                return 1, err.getvalue() + "Traceback\n" + "".join(traceback.format_exception_only(e))
        return rc, err.getvalue()

    cases = [("trajectory", traj, k, *t.TRAJECTORY_DAMAGE[k]) for k in sorted(t.TRAJECTORY_DAMAGE)]
    cases += [("surface", plane, k, *t.SURFACE_DAMAGE[k]) for k in sorted(t.SURFACE_DAMAGE)]
    cases += [("trajectory", traj, f"non-finite {v}", t._nonfinite(v), "non-finite weights")
              for v in (np.nan, np.inf, -np.inf)]
    for kind, src, case, edit, message in cases:
        bad = folder / f"bad-{kind}-{case.replace(' ', '-')}.h5"
        shutil.copy(src, bad)
        with h5py.File(bad, "r+") as f:
            edit(f)
        commands = ([["info", bad], ["plane", bad, *THREE, "--grid", 3, 3, "-o", folder / "p.h5"],
                     ["line", bad, "sgd", "swa/average", "--points", 3, "-o", folder / "l.h5"]]
                    if kind == "trajectory" else
                    [["plot", bad, "-o", folder / "figs"], ["explore", bad, "-o", folder / "e.html"],
                     ["info", bad]])
        for args in commands:
            rc, err = call(args)
            if kind == "surface" and args[0] == "info":  # info reads trajectories: "not a trajectory file"
                message_ok = "not a trajectory file" in err
            else:
                message_ok = message.split(", the grid")[0].split(" has shape")[0] in err and str(bad) in err
            leftovers = [p.name for p in folder.iterdir() if p.name.startswith(("p.h5", "l.h5", "e.html", "figs"))]
            if case.startswith("non-finite") and args[0] == "info":  # a diverged run is a valid file to show
                tally.add("malformed files", rc == 0 and not err, rc, err, note=f"{args[0]} {case}")
                continue
            tally.add("malformed files", one_line(rc, err) and message_ok and not leftovers, rc, err,
                      note=f"{args[0]} {case}")
            for p in leftovers:
                shutil.rmtree(folder / p, ignore_errors=True) if (folder / p).is_dir() else (folder / p).unlink()


def main_():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table as JSON")
    parser.add_argument("--only-malformed", action="store_true", help="run the malformed-files campaign only")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="landscape-robustness-") as tmp:
        tmp = Path(tmp)
        ref_run = tmp / "ref-run.h5"
        assert run([*TRAIN, "-o", ref_run])[0] == 0
        refs = {}
        for kind, make in (("plane", plane_args), ("line", line_args)):
            refs[kind] = tmp / f"ref-{kind}.h5"
            assert run([*make(ref_run), "-o", refs[kind]])[0] == 0
        same_bytes = lambda a, b: sha(a) == sha(b)  # noqa: E731
        (tmp / "k").mkdir()
        t0 = time.perf_counter()
        if args.only_malformed:
            args.kills, disk, writers = 0, False, False
        else:
            disk = writers = True
        kill_campaign(tally, "kill -9 train", TRAIN, tmp / "k" / "run.h5", ref_run, same_bytes, args.kills, (0.5, 9), rng)
        kill_campaign(tally, "kill -9 plane", plane_args(ref_run), tmp / "k" / "p.h5", refs["plane"], same_values,
                      args.kills, (0.5, 8), rng)
        kill_campaign(tally, "kill -9 line", line_args(ref_run), tmp / "k" / "l.h5", refs["line"], same_values,
                      args.kills // 2, (0.5, 8), rng)
        if disk:
            full_disk_campaign(tally, "full disk train", TRAIN, "run.h5", ref_run, same_bytes,
                               ["250k", "300k", "400k", "600k", "800k"])
            full_disk_campaign(tally, "full disk plane", plane_args(ref_run), "p.h5", refs["plane"], same_values,
                               ["20k", "60k", "100k", "150k"])
        if writers:
            concurrent_campaign(tally, "two writers train", TRAIN, tmp / "k", ref_run, same_bytes, [0.0, 2.5, 5.0])
            concurrent_campaign(tally, "two writers plane", plane_args(ref_run), tmp / "k", refs["plane"],
                                same_values, [0.0, 1.0, 3.0])
        (tmp / "m").mkdir()
        malformed_campaign(tally, tmp / "m", ref_run, refs["plane"])
        print(f"campaign took {time.perf_counter() - t0:.0f} s")
    tally.print()
    if args.out:
        Path(args.out).write_text(json.dumps(tally.rows, indent=2))


if __name__ == "__main__":
    main_()
