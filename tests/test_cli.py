"""The CLI: `clipjax --help` and every subcommand's `--help` work."""

import subprocess
import sys

import pytest

from clipjax import cli


def test_top_level_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli._available():
        assert name in out


@pytest.mark.parametrize("name", sorted(cli._available()))
def test_each_command_has_help(name):
    r = subprocess.run([sys.executable, "-m", "clipjax", name, "--help"], capture_output=True,
                       text=True, env={"CLIPJAX_ALLOCATOR": "system", "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    assert f"clipjax {name}" in r.stdout


def test_unknown_command_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_config_arguments_are_split_off():
    rest, cfg = cli._split_config_args(
        ["--workdir", "w", "--config", "c.py:x", "--config.a.b=1", "--config.c", "2"])
    assert rest == ["--workdir", "w"]
    assert cfg == ["--config=c.py:x", "--config.a.b=1", "--config.c=2"]
