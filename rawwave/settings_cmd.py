"""Print the settings: the documented table, or the values this environment resolves to."""

from __future__ import annotations

import argparse
import sys

from rawwave.settings import Settings, settings_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", action="store_true", help="print the README's markdown table")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.table:
        sys.stdout.write(settings_table() + "\n")
        return 0
    for name, value in settings.model_dump(mode="json").items():
        shown = "********" if name == "auth_token" and value else value
        sys.stdout.write(f"RAWWAVE_{name.upper()}={shown}\n")
    return 0
