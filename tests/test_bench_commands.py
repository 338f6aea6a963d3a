"""The bench's shape: no import cycle inside lorapro.bench; demo, bench and diagnose run the same
opening checks and map errors to exit codes in one place; whether the gradient monitor can
diagnose a method is a property of the method."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest

import lorapro.bench
from lorapro import cli
from lorapro.bench.errors import (
    EXIT_INTERRUPTED,
    EXIT_SETUP,
    MethodUnavailableError,
    MissingAssetError,
    SetupError,
    exit_code,
    run_command,
)

BENCH = Path(lorapro.bench.__file__).parent


def import_graph(root: Path = BENCH, package: str = "lorapro.bench") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports: every import statement, at any depth
    (inside functions and ``if TYPE_CHECKING:`` too, since those are dependencies all the same)."""
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([package, *parts])] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
                target = ".".join(x for x in (base, node.module or "") if x)
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c != name}
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each an import cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_the_bench():
    graph = import_graph()
    assert "lorapro.bench.report" in graph and "lorapro.bench.tasks.gsm" in graph
    assert graph["lorapro.bench.harness"] >= {"lorapro.bench.report", "lorapro.bench.train"}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("leaf", ["errors", "records", "stats"])
def test_shared_types_and_statistics_live_in_leaf_modules(leaf):
    assert import_graph()[f"lorapro.bench.{leaf}"] == set()


def test_one_mapping_from_errors_to_exit_codes():
    assert exit_code(SetupError("x")) == exit_code(MissingAssetError("x")) == EXIT_SETUP == 2
    assert exit_code(MethodUnavailableError("x")) == EXIT_SETUP
    assert exit_code(KeyboardInterrupt()) == EXIT_INTERRUPTED == 130
    assert exit_code(RuntimeError("a bug")) is None
    err = io.StringIO()
    assert (
        run_command("bench", lambda: (_ for _ in ()).throw(SetupError("--seeds must be >= 1")), stderr=err)
        == 2
    )
    assert err.getvalue() == "lorapro bench: error: --seeds must be >= 1\n"
    assert run_command("bench", lambda: None) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_command("bench", lambda: 1 // 0)


def test_every_command_error_class_is_a_setup_error():
    from lorapro.bench.config import BenchConfigError
    from lorapro.bench.demo import DemoConfigError
    from lorapro.bench.diagnose import DiagnoseConfigError
    from lorapro.bench.options import OutputFolderError

    for cls in (BenchConfigError, DemoConfigError, DiagnoseConfigError, OutputFolderError):
        assert issubclass(cls, SetupError) and issubclass(cls, ValueError)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--methods", "lora,nope"], "unknown method 'nope'"),
        (["bench", "--task", "mr", "--methods", "lora,nope"], "unknown method 'nope'"),
        (["diagnose", "--method", "nope"], "unknown method 'nope'"),
        (["diagnose", "--method", "lora,full"], "full: no plain LoRA pairs"),
        (["diagnose", "--method", "lora", "--task", "nope"], "unknown task 'nope'"),
    ],
)
def test_opening_checks_refuse_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    import lorapro.bench.train as train

    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("trained"))
    code = cli.main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"lorapro {argv[0]}: error: ") and message in err, err


def test_diagnosable_is_a_property_of_the_method():
    from lorapro.bench.methods import METHODS

    able = {name for name, spec in METHODS.items() if spec.diagnosable}
    assert {"lora", "lorapro", "lorapro-full", "rslora", "pissa", "loraplus", "loraga"} <= able
    assert not able & {"full", "dora", "adalora", "lorafa"}
