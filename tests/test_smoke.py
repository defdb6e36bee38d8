"""selfmoa.py stands alone: it imports and runs copied into an empty folder, with only the standard library."""

import pathlib
import shutil
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("argv, sibling, beside", [
    (["serve", "--port", "0"], "selfmoa_serve.py", []),
    (["-m", "a", "-i", "in.jsonl", "-o", "out.jsonl"], "selfmoa_batch.py", []),
    (["merge", "-m", "a", "-i", "in.jsonl", "-o", "out.jsonl", "in.jsonl"], "selfmoa_batch.py", []),
    (["eval", "--help"], "selfmoa_batch.py and selfmoa_eval.py", []),
    (["eval", "--help"], "selfmoa_batch.py", ["selfmoa_eval.py"]),  # eval imports batch: both are needed
])
def test_a_lone_copy_of_selfmoa_py_names_the_sibling_file_to_add(tmp_path, argv, sibling, beside):
    for name in ["selfmoa.py", *beside]:
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    done = subprocess.run([sys.executable, "-I", "-S", "selfmoa.py", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and f"copy {sibling} next to it" in done.stderr, done.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_selfmoa_py_run_as_a_script_finds_its_siblings_beside_it_even_in_isolated_mode(tmp_path):
    for name in ("selfmoa.py", "selfmoa_serve.py", "selfmoa_batch.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    for argv, head in ((["serve", "--help"], "usage: selfmoa serve"), (["--help"], "usage: selfmoa")):
        done = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "selfmoa.py"), *argv], cwd="/",
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith(head), done.stderr
    # one ConfigError: serve's usage error (raised by selfmoa_serve, caught by selfmoa's class) is exit 2, not a crash
    done = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "selfmoa.py"), "serve", "--port", "99999"],
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--port 99999" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_siblings_import_selfmoa_and_never_each_other():
    import ast
    for name, allowed in (("selfmoa.py", set()), ("selfmoa_batch.py", {"selfmoa"}), ("selfmoa_serve.py", {"selfmoa"})):
        nodes = list(ast.walk(ast.parse((ROOT / name).read_text(encoding="utf-8"))))
        imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        assert imported - set(sys.stdlib_module_names) - {"__future__"} == allowed, name


def test_the_siblings_use_only_the_internal_names_selfmoa_keeps_for_them():
    """Of selfmoa's internal names, the programs beside it (selfmoa_batch.py, selfmoa_serve.py, selfmoa_eval.py,
    examples/) use only those listed in selfmoa._FOR_SIBLINGS, and of selfmoa_batch's only those it lists in
    selfmoa_batch._FOR_EVAL (each of which exists), so that the coupling stays known and small."""
    import ast

    import selfmoa_batch
    kept = {"selfmoa": selfmoa._FOR_SIBLINGS, "selfmoa_batch": selfmoa_batch._FOR_EVAL}
    assert all(hasattr(selfmoa, name) for name in selfmoa._FOR_SIBLINGS)
    assert all(hasattr(selfmoa_batch, name) for name in selfmoa_batch._FOR_EVAL)
    programs = ["selfmoa_batch.py", "selfmoa_serve.py", "selfmoa_eval.py", *sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "examples").glob("*.py"))]
    assert len(programs) > 3, programs
    for name in programs:
        nodes = list(ast.walk(ast.parse((ROOT / name).read_text(encoding="utf-8"))))
        for module, allowed in kept.items():
            used = {alias.name for node in nodes if isinstance(node, ast.ImportFrom)
                    and node.module == module for alias in node.names}
            used |= {node.attr for node in nodes if isinstance(node, ast.Attribute)
                     and isinstance(node.value, ast.Name) and node.value.id == module}
            internal = {n for n in used if n.startswith("_") and not n.startswith("__")}
            assert internal <= allowed, (name, module, sorted(internal - allowed))


def test_selfmoa_py_alone_runs_the_methods_and_the_one_prompt_command_against_a_server(tmp_path):
    """What a project that only calls the methods copies: selfmoa.py alone, in an empty folder, in isolated mode,
    runs each method and the one-prompt command against a real (loopback) server."""
    from mock_models.server import MockServer

    shutil.copy(ROOT / "selfmoa.py", tmp_path / "selfmoa.py")
    with MockServer() as server:
        code = ("import sys; sys.path.insert(0, '.'); import selfmoa; "
                f"client = selfmoa.HTTPClient({server.base_url!r}); "
                "print(bool(selfmoa.self_moa('What is 2+2?', 'generalist', n=2, complete=client).answer), "
                "selfmoa.self_moa_seq('What is 2+2?', 'generalist', n=3, window=2, carry=1, complete=client).calls, "
                "selfmoa.moa('What is 2+2?', ['coder', 'generalist'], 'generalist', complete=client).calls)")
        ran = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
        assert ran.returncode == 0 and ran.stdout.split() == ["True", "5", "3"], ran.stderr
        asked = subprocess.run([sys.executable, "-I", "-S", "selfmoa.py", "--base-url", server.base_url, "-m",
                                "generalist", "-n", "2", "--json", "What is 2+2?"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
    assert asked.returncode == 0, asked.stderr
    assert '"method": "self-moa"' in asked.stdout and '"answer": ' in asked.stdout
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "__pycache__") == ["selfmoa.py"]


@pytest.mark.parametrize("name, spec", [("selfmoa_batch", "spec/batch.md"), ("selfmoa_serve", "spec/serve.md")])
def test_each_sibling_opens_with_its_manual_and_a_sorted_all(name, spec):
    """Each program beside selfmoa.py opens with its own manual: what it is, every public name of its sorted
    __all__, a runnable example (a doctest), and the spec file it implements."""
    import doctest
    import importlib

    module = importlib.import_module(name)
    assert module.__all__ == sorted(module.__all__) and all(hasattr(module, n) for n in module.__all__)
    assert [n for n in module.__all__ if f"``{n}``" not in module.__doc__] == []
    assert spec in module.__doc__ and doctest.DocTestParser().get_examples(module.__doc__)
