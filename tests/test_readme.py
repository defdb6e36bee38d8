"""The README's command-line reference is exactly `selfmoa --help`.

To refresh the README after changing a flag: python tests/test_readme.py --update
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- help:start -->\n```\n)(.*?)(```\n<!-- help:end -->)", re.DOTALL)


def current_help() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    sys.path.insert(0, str(README.parent))
    import selfmoa

    return selfmoa.build_parser().format_help()


def test_readme_usage_matches_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    found = BLOCK.search(README.read_text(encoding="utf-8"))
    assert found, "README.md lost its <!-- help:start --> ... <!-- help:end --> block"
    assert found.group(2) == current_help(), "README.md's usage is stale: run python tests/test_readme.py --update"


def test_readme_shows_the_ci_test_command():
    text = README.read_text(encoding="utf-8")
    assert "\n    $ python -m pip install -e '.[test]' && python -m pytest -q\n" in text
    assert "\n    $ python -m mock_models demo\n" in text


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    text = README.read_text(encoding="utf-8")
    README.write_text(BLOCK.sub(lambda m: m.group(1) + current_help() + m.group(3), text), encoding="utf-8")
    print("README.md updated")
