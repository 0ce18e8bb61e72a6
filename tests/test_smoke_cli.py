from _cli import run_cli


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "train" in r.stdout and "info" in r.stdout


def test_info_of_tiny_run(tiny_run):
    r = run_cli("info", tiny_run)
    assert r.returncode == 0, r.stderr
    assert "swa/average" in r.stdout and "sgd" in r.stdout


def test_ctrl_c_while_the_command_starts_is_one_line():
    """A Ctrl-C while the command imports torch (its first second or two) was the import's traceback,
    or an abort inside a C++ extension: now the one line every command's Ctrl-C gives."""
    import signal
    import subprocess
    import sys
    import time
    for delay in (0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-m", "landscape", "--help"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        assert (proc.returncode, err) == (130, "landscape: interrupted\n")
