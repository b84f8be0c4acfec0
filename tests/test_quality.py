"""The code-quality gates run with the tests, so CI enforces them on every change."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True)


def test_ruff_lint_is_clean() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_on_the_shared_package() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_worker_and_ingest_never_import_torch() -> None:
    for folder in ("worker", "ingest"):
        for path in (REPO / folder).rglob("*.py"):
            source = path.read_text()
            assert "import torch" not in source and "from torch" not in source, path
            if folder == "ingest":
                assert "onnxruntime" not in source, path
            assert "from export" not in source and "import export" not in source, path
