from _cli import run_cli


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "train" in r.stdout and "info" in r.stdout


def test_info_of_tiny_run(tiny_run):
    r = run_cli("info", tiny_run)
    assert r.returncode == 0, r.stderr
    assert "swa/average" in r.stdout and "sgd" in r.stdout
