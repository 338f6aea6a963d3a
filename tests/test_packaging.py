"""What a user installing lorapro into their own environment relies on: a light import, one
version, and an error naming the extra to install when an optional package is missing.

Each case runs in a fresh interpreter: whether a module gets imported is a property of a whole
process. A package is made missing by putting None in sys.modules, which makes its import raise
ModuleNotFoundError exactly as when it is not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

import lorapro
from lorapro._extras import MissingExtraError, raise_missing_extra, require

HEAVY = ("transformers", "accelerate", "deepspeed", "matplotlib")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_import_lorapro_imports_no_optional_package() -> None:
    done = run_python(f"""
        import sys
        import lorapro, lorapro.integrations, lorapro.diagnostics
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_import_lorapro_works_without_any_optional_package() -> None:
    done = run_python(f"""
        import sys
        for name in {HEAVY!r}:
            sys.modules[name] = None
        import lorapro
        print(lorapro.__version__)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == lorapro.__version__


def test_the_version_is_written_once() -> None:
    # pyproject.toml reads it from lorapro.__version__ (dynamic), so the installed metadata agrees.
    assert metadata.version("lorapro") == lorapro.__version__


@pytest.mark.parametrize(
    ("missing", "statement", "extra"),
    [
        ("transformers", "import lorapro.integrations.trainer", "trainer"),
        ("transformers", "import lorapro.diagnostics_callback", "trainer"),
        ("matplotlib", "from lorapro.diagnostics_plot import _pyplot; _pyplot()", "plots"),
        (
            "deepspeed",
            "import lorapro.integrations.deepspeed as d; d.initialize(model=None, optimizer=None, config={})",
            "deepspeed",
        ),
    ],
)
def test_a_missing_optional_package_names_its_extra(missing: str, statement: str, extra: str) -> None:
    done = run_python(f"""
        import sys
        sys.modules[{missing!r}] = None
        from lorapro._extras import MissingExtraError
        try:
            {statement}
        except MissingExtraError as exc:
            print("MISSING:", exc)
    """)
    assert done.returncode == 0, done.stderr
    assert "MISSING: " in done.stdout
    assert f"needs {missing}, which is not installed" in done.stdout
    assert f"pip install '.[{extra}]' in a clone of lorapro" in done.stdout


def test_the_cli_without_the_bench_packages_names_the_bench_extra() -> None:
    done = run_python("""
        import sys
        sys.modules["matplotlib"] = None
        from lorapro.cli import main
        code = main(["bench", "--help"])
        print("EXIT", code)
        print("VERSION-EXIT", main(["--version"]))
    """)
    assert done.returncode == 0, done.stderr
    assert "EXIT 2" in done.stdout
    assert f"lorapro {lorapro.__version__}" in done.stdout and "VERSION-EXIT 0" in done.stdout
    assert "the lorapro command needs matplotlib" in done.stderr
    assert "pip install '.[bench]' in a clone of lorapro" in done.stderr


def test_only_a_missing_optional_package_becomes_a_missing_extra() -> None:
    # A submodule missing from an installed package, or an unrelated module, is a different
    # problem: the original error propagates unchanged.
    for name in ("transformers.no_such_module", "some_unrelated_package"):
        original = ModuleNotFoundError(f"No module named {name!r}", name=name)
        with pytest.raises(ModuleNotFoundError) as caught:
            raise_missing_extra(original, "a feature")
        assert caught.value is original
    with pytest.raises(MissingExtraError, match=r"lorapro\[trainer\]"):
        raise_missing_extra(ModuleNotFoundError("No module named 'accelerate'", name="accelerate"), "x")


def test_require_checks_without_importing() -> None:
    require(("torch", "peft"), "the core")  # installed: nothing raised
    with pytest.raises(MissingExtraError, match=r"x needs no_such_pkg_abc.*lorapro\[bench\]"):
        require(("no_such_pkg_abc",), "x", extra="bench")
