"""selfmoa.py stands alone: it imports and runs copied into an empty folder, with only the standard library."""

import pathlib
import shutil
import subprocess
import sys

import selfmoa

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_version_is_a_string():
    assert isinstance(selfmoa.__version__, str) and selfmoa.__version__[0].isdigit()


def test_all_is_sorted_and_complete():
    assert selfmoa.__all__ == sorted(selfmoa.__all__)
    assert all(hasattr(selfmoa, name) for name in selfmoa.__all__)


def test_selfmoa_py_works_alone_in_an_empty_folder_without_site_packages(tmp_path):
    shutil.copy(ROOT / "selfmoa.py", tmp_path / "selfmoa.py")
    code = ("import sys; sys.path.insert(0, '.'); import selfmoa, doctest; "
            "assert 'requests' not in sys.modules and 'mock_models' not in sys.modules; "
            "failed, tried = doctest.testmod(selfmoa); assert tried > 20 and failed == 0, (failed, tried); "
            "print(selfmoa.__version__)")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == selfmoa.__version__
    helped = subprocess.run([sys.executable, "-I", "-S", "selfmoa.py", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "usage: selfmoa" in helped.stdout


def test_the_manual_names_every_public_name():
    """The module docstring (the manual) shows every name of __all__: in its API table, the error tree or the
    examples, so that a public addition cannot go undocumented."""
    manual = selfmoa.__doc__
    missing = [name for name in selfmoa.__all__ if name not in manual]
    assert missing == [], f"the module docstring does not mention {missing}"
