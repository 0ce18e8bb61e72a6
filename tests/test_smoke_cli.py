from _cli import run_cli


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "train" in r.stdout and "info" in r.stdout


def test_info_of_tiny_run(tiny_run):
    r = run_cli("info", tiny_run)
    assert r.returncode == 0, r.stderr
    assert "swa/average" in r.stdout and "sgd" in r.stdout


# the command, with a Ctrl-C of its own arriving while torch is imported (a meta-path finder sends it
# as the import of torch starts), and SIGINT first set as the script asks
_CTRL_C_IN_IMPORT = """
import os, signal, sys
# as a command started from a terminal, or as a script's background job: whatever the test run was started as
signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == "ignored" else signal.default_int_handler)
sys.argv = ["landscape", "--help"]  # what the command's own script is called


class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None


sys.meta_path.insert(0, CtrlC())
from landscape.cli.main import main
print("imported")
"""


def test_ctrl_c_while_the_command_imports_torch_is_one_line():
    """A Ctrl-C while the command imports torch (its first second or two) was the import's traceback, or
    an abort inside a C++ extension: now the one line every command's Ctrl-C gives, after the imports;
    a command started with SIGINT ignored (a script's background job) still ignores it."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _CTRL_C_IN_IMPORT, "default"], capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stderr, r.stdout) == (130, "landscape: interrupted\n", "")
    r = subprocess.run([sys.executable, "-c", _CTRL_C_IN_IMPORT, "ignored"], capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "imported\n")
