"""Regenerate the README's generated sections: the settings table and the benchmark table."""

from __future__ import annotations

from pathlib import Path

from bench.report import update_readme as update_bench_table
from rawwave.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- settings-table -->", "<!-- /settings-table -->"


def update_settings_table() -> None:
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + settings_table() + "\n" + text[end:])


if __name__ == "__main__":
    update_settings_table()
    if "<!-- bench-table -->" in README.read_text():
        update_bench_table()
