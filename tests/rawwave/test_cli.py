import subprocess
import sys

import pytest

from rawwave.cli import COMMANDS, main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_bad_setting_is_one_line_not_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rawwave.cli", "settings"],
        env={"RAWWAVE_CHUNK_MS": "3", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("rawwave: bad setting: RAWWAVE_CHUNK_MS")
    assert "Traceback" not in result.stderr


def test_shared_package_imports_no_heavy_libraries() -> None:
    code = (
        "import sys, rawwave.cli, rawwave.streams, rawwave.contract, rawwave.model_dir, rawwave.up; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'aiortc') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
