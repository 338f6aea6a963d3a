"""Every code block of README.md and docs/*.md runs, or is checked against the code, in CI.

The convention (also in docs/maintainers.md). A block's language is its fence's: every fenced
block names one (``text`` for output and listings, which are not code). A *marker*, an HTML
comment on the line right above the opening fence (invisible on GitHub and PyPI), says how a
block is tested:

``python`` blocks
    * no marker: **run**, in a fresh namespace, in an empty temporary folder, after the hidden
      prelude ``tiny`` (below): a tiny random PEFT Llama and the names a snippet usually assumes.
    * ``<!-- snippet: setup=NAME -->``: run after the prelude ``NAME`` of :data:`PRELUDES`
      instead (``base`` gives a model that is not wrapped by PEFT yet).
    * ``<!-- snippet: fragment: REASON -->``: **not run** (it needs several processes, DeepSpeed, a
      GPU, or has ``...`` placeholders); the REASON says which. It is checked like every python
      block: it parses, every ``lorapro`` name it imports or reaches exists, a name reached as
      ``lorapro.X`` after ``import lorapro`` is one that ``import lorapro`` provides, and the
      keywords it passes to lorapro's functions and classes are ones they accept.

``bash`` blocks
    * ``<!-- snippet: run: ARGS -->``: **run**, line by line, in a temporary folder holding the
      small files the README's commands name (``my_data.csv``, ``train.jsonl``, ``held-out.jsonl``,
      ``./my-llm``, ``./my-encoder``, ``results`` linked to the repository's); ARGS (small sizes)
      are appended to every ``lorapro bench`` and ``lorapro diagnose`` line.
    * ``<!-- snippet: not run: REASON -->``: **not run** (a download, the full benchmark, a GPU);
      checked: every ``lorapro`` command parses with the command's own argument parser, every
      ``make`` target is one of the Makefile's, every ``scripts/``, ``benchmarks/`` or ``examples/``
      path exists, and every extra in ``pip install 'lorapro[...]'`` is one that pyproject.toml
      defines.
    * A bash block without a marker fails the test.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import json
import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import lorapro

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Languages that are not code (never run).
NOT_CODE = {"text", "json", "yaml", "toml", "csv", "diff"}

# --------------------------------------------------------------------------- preludes

_TINY_MODEL = """
import torch, peft, lorapro
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
_ids = torch.randint(0, 32, (4, 12))
batch = {"input_ids": _ids, "labels": _ids}
loader = [batch, batch]
train_dataset = ds = [{"input_ids": row, "labels": row} for row in _ids]
args = TrainingArguments(output_dir="trainer-output", max_steps=2, per_device_train_batch_size=2,
                         use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
"""

#: Hidden set-ups a python block runs after (``<!-- snippet: setup=NAME -->``; default ``tiny``).
PRELUDES = {
    # A model not wrapped by PEFT yet (``model``), a ``batch`` and a ``loader``.
    "base": _TINY_MODEL,
    # ``model`` (= ``peft_model``): the tiny Llama with LoRA (r=4) on q_proj and v_proj; ``batch``,
    # ``loader``, ``train_dataset`` (= ``ds``), TrainingArguments ``args`` for 2 steps, ``optimizer``
    # (= ``opt``, a LoRAProAdamW), ``scheduler`` (= ``sched``), ``scaler``, ``loss`` (of ``batch``),
    # ``max_norm``, ``path`` (a file name in the temporary folder); torch, peft, lorapro, Trainer and
    # TrainingArguments imported.
    "tiny": _TINY_MODEL
    + """
_lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
model = peft_model = peft.get_peft_model(model, _lora)
optimizer = opt = lorapro.LoRAProAdamW(model, lr=1e-3)
scheduler = sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
scaler = torch.amp.GradScaler("cpu")
loss = model(**batch).loss
max_norm = 1.0
path = "checkpoint.pt"
""",
}

# --------------------------------------------------------------------------- collecting


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    marker: str  # the marker's text after "snippet:", "" without one
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        return self.marker.split(":", 1)[0].split("=", 1)[0].strip()

    @property
    def argument(self) -> str:
        rest = self.marker.split(":", 1)[1] if ":" in self.marker else self.marker.split("=", 1)[-1]
        return rest.strip()


_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")


def collect(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        found = _FENCE.match(lines[i])
        if not found:
            i += 1
            continue
        indent, fence, language = found.groups()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            j += 1
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j]]
        previous = lines[i - 1] if i > 0 else ""
        marker = _MARKER.match(previous)
        blocks.append(
            Block(path, i + 1, language.lower(), marker.group(1) if marker else "", "\n".join(body))
        )
        i = j + 1
    return blocks


BLOCKS = [block for path in DOCS for block in collect(path)]
PYTHON = [b for b in BLOCKS if b.language == "python"]
SHELL = [b for b in BLOCKS if b.language in ("bash", "sh", "shell")]


def _ids(blocks: list[Block]) -> list[str]:
    return [b.name for b in blocks]


# --------------------------------------------------------------------------- the rules


def test_every_block_names_its_language_and_a_known_marker():
    problems = []
    for b in BLOCKS:
        if not b.language:
            problems.append(f"{b.name}: the fence names no language (```text for output, ```bash, ```python)")
        elif b.language not in {"python", "bash", "sh", "shell", *NOT_CODE}:
            problems.append(f"{b.name}: unknown language {b.language!r}")
        if b.marker and b.kind not in (
            {"setup", "fragment"} if b.language == "python" else {"run", "not run"}
        ):
            problems.append(f"{b.name}: unknown marker {b.marker!r} for a {b.language} block")
        if b.kind == "setup" and b.argument not in PRELUDES:
            problems.append(f"{b.name}: no prelude {b.argument!r}; known: {', '.join(PRELUDES)}")
        if b.kind in ("fragment", "not run") and not b.argument:
            problems.append(f"{b.name}: '{b.kind}' needs a reason")
        if b in SHELL and not b.marker:
            problems.append(
                f"{b.name}: a bash block needs <!-- snippet: run: ARGS --> or "
                "<!-- snippet: not run: REASON -->"
            )
    assert not problems, "\n".join(problems)


def test_the_collector_finds_blocks_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n<!-- snippet: fragment: needs two processes -->\n```python\nx = 1\n```\n\n"
        "```bash\nls\n```\n\n  ```text\n  out\n  ```\n",
        encoding="utf-8",
    )
    found = collect(page)
    assert [(b.line, b.language, b.kind, b.argument, b.code) for b in found] == [
        (4, "python", "fragment", "needs two processes", "x = 1"),
        (8, "bash", "", "", "ls"),
        (12, "text", "", "", "out"),
    ]
    assert len(PYTHON) >= 10 and len(SHELL) >= 10  # the repository's docs are collected


# --------------------------------------------------------------------------- python: static checks


def _lorapro_object(dotted: str):
    """The object a dotted lorapro name stands for (importing modules on the way), or raise."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))  # a submodule
    return obj


def _attribute_chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _mark_parents(tree: ast.AST) -> None:
    """Give each node its parent, so that only the outermost node of an attribute chain is checked."""
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child._parent = node  # type: ignore[attr-defined]


def static_problems(code: str, names: dict[str, str] | None = None) -> list[str]:
    """What is wrong with a python snippet's use of lorapro, without running it. ``names``: names
    already bound to lorapro objects (by a prelude), name -> dotted path."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [f"does not parse: {exc}"]
    _mark_parents(tree)
    bound = dict(names or {})  # local name -> dotted lorapro path
    plain_package = {n for n, p in bound.items() if p == "lorapro"}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "lorapro":
                    continue
                try:
                    importlib.import_module(alias.name)
                except ImportError as exc:
                    problems.append(f"import {alias.name}: {exc}")
                local = alias.asname or alias.name.split(".")[0]
                bound[local] = alias.name if alias.asname else "lorapro"
                if alias.asname is None and alias.name == "lorapro":
                    plain_package.add(local)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lorapro":
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                try:
                    _lorapro_object(dotted)
                except (ImportError, AttributeError) as exc:
                    problems.append(f"from {node.module} import {alias.name}: {exc}")
                bound[alias.asname or alias.name] = dotted
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "_parent", None), ast.Attribute):
            chain = _attribute_chain(node)
            if not chain or chain[0] not in bound:
                continue
            if chain[0] in plain_package and chain[1] not in set(lorapro.__all__) | {"__version__"}:
                problems.append(
                    f"{'.'.join(chain)}: `import lorapro` does not provide lorapro.{chain[1]}; write "
                    f"`from lorapro.{chain[1]}... import NAME`"
                )
                continue
            try:
                _lorapro_object(".".join([bound[chain[0]], *chain[1:]]))
            except (ImportError, AttributeError) as exc:
                problems.append(f"{'.'.join(chain)}: {exc}")
        if isinstance(node, ast.Call):
            chain = _attribute_chain(node.func)
            if not chain or chain[0] not in bound:
                continue
            dotted = ".".join([bound[chain[0]], *chain[1:]])
            try:
                target = _lorapro_object(dotted)
                signature = inspect.signature(target)
            except (ImportError, AttributeError, TypeError, ValueError):
                continue  # reported above, or not introspectable
            keywords = {k.arg: None for k in node.keywords if k.arg is not None}
            takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
            unknown = [k for k in keywords if k not in signature.parameters and not takes_any]
            if unknown:
                problems.append(f"{dotted}() takes no keyword {', '.join(unknown)}")
    return problems


def _prelude_names(block: Block) -> dict[str, str]:
    return {"lorapro": "lorapro"} if block.kind != "fragment" else {}


@pytest.mark.parametrize("block", PYTHON, ids=_ids(PYTHON))
def test_python_block_uses_lorapro_as_it_is(block):
    problems = static_problems(block.code, _prelude_names(block))
    assert not problems, f"{block.name}:\n" + "\n".join(problems)


def test_the_static_check_finds_what_it_is_for():
    # The README once wrote this: an AttributeError after a bare `import lorapro`.
    bad = "import lorapro\ncallbacks = [lorapro.integrations.trainer.LoRAProCallback()]"
    assert any("does not provide lorapro.integrations" in p for p in static_problems(bad))
    assert (
        static_problems("from lorapro.integrations.trainer import LoRAProCallback\nLoRAProCallback()") == []
    )
    assert any("nope" in p for p in static_problems("from lorapro import nope"))
    assert any(
        "takes no keyword lrate" in p
        for p in static_problems("import lorapro\nlorapro.LoRAProAdamW(m, lrate=1)")
    )
    assert any("does not parse" in p for p in static_problems("x = (1,"))
    assert any(
        "no_such_function" in p
        for p in static_problems("import lorapro.closed_form as cf\ncf.no_such_function")
    )


# --------------------------------------------------------------------------- python: running


@contextlib.contextmanager
def _in_folder(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


RUN = [b for b in PYTHON if b.kind != "fragment"]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("block", RUN, ids=_ids(RUN))
def test_python_block_runs(block, tmp_path):
    prelude = PRELUDES[block.argument if block.kind == "setup" else "tiny"]
    namespace: dict = {"__name__": "__snippet__"}
    with _in_folder(tmp_path):
        exec(compile(prelude, f"<prelude of {block.name}>", "exec"), namespace)
        exec(compile(block.code, block.name, "exec"), namespace)


# --------------------------------------------------------------------------- bash


def _commands(code: str) -> list[list[str]]:
    """Each command of a shell block as words (continuation lines joined, comments dropped, split
    at ``&&``, ``;`` and ``|``)."""
    text = re.sub(r"\\\n", " ", code)
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in words:
            if word in ("&&", ";", "|", "||"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def _extras() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return set(meta["project"]["optional-dependencies"])


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([\w.-]+)\s*:", text, re.MULTILINE)}


def shell_problems(code: str) -> list[str]:
    from lorapro import cli

    problems = []
    extras, targets = _extras(), _make_targets()
    for words in _commands(code):
        program = Path(words[0]).name
        if program == "lorapro":
            try:
                with contextlib.redirect_stderr(sys.stdout):
                    cli.build_parser().parse_args(words[1:])
            except SystemExit:
                problems.append(f"`{shlex.join(words)}` does not parse")
        elif program == "make":
            named = [t for t in words[1:] if not t.startswith("-") and "=" not in t]
            problems += [f"make {t}: no such target" for t in named if t not in targets]
        elif program == "pip" or words[:3] == ["python", "-m", "pip"]:
            for word in words:
                found = re.match(r"^(?:lorapro|\.|git\+\S+#egg=lorapro)\[([\w,-]+)\]$", word)
                if found:
                    problems += [
                        f"{word}: no extra {e!r}" for e in found.group(1).split(",") if e not in extras
                    ]
        for word in words:
            if re.match(r"^(scripts|benchmarks|examples)/", word) and not (ROOT / word).exists():
                problems.append(f"{word}: no such file")
    return problems


CHECKED_SHELL = [b for b in SHELL if b.kind != "run"]


@pytest.mark.parametrize("block", CHECKED_SHELL, ids=_ids(CHECKED_SHELL))
def test_shell_block_matches_the_repository(block):
    problems = shell_problems(block.code)
    assert not problems, f"{block.name}:\n" + "\n".join(problems)


def test_the_shell_check_finds_what_it_is_for():
    assert (
        shell_problems("lorapro bench --task mr --methods lora,lorapro\nmake test\nscripts/results.sh mr")
        == []
    )
    assert shell_problems("pip install 'lorapro[trainer]'   # a comment") == []
    assert any("does not parse" in p for p in shell_problems("lorapro bench --no-such-option"))
    assert any("no such target" in p for p in shell_problems("make no-such-target"))
    assert any("no extra 'nope'" in p for p in shell_problems("pip install 'lorapro[nope]'"))
    assert any("no such file" in p for p in shell_problems("scripts/no_such_script.sh"))


def _fixtures(folder: Path) -> None:
    """The files the README's commands name, small."""
    from tiny_llama import save_tiny_llama

    words = {0: ["dull", "boring", "awful", "bad"], 1: ["great", "lovely", "superb", "good"]}
    rows = [f"a {words[i % 2][i % 4]} film number {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    (folder / "my_data.csv").write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    sums = [(a, b, a + b) for a in range(6) for b in range(5)]
    lines = [{"prompt": f"what is {a} plus {b} ? answer", "response": f"{a} plus {b} equals {c} #### {c}"}
             for a, b, c in sums]  # fmt: skip
    (folder / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:24]) + "\n", encoding="utf-8")
    (folder / "held-out.jsonl").write_text(
        "\n".join(json.dumps(x) for x in lines[24:]) + "\n", encoding="utf-8"
    )
    save_tiny_llama(folder / "my-llm")
    save_tiny_llama(folder / "my-encoder")
    (folder / "results").symlink_to(ROOT / "results")


RUN_SHELL = [b for b in SHELL if b.kind == "run"]


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("block", RUN_SHELL, ids=_ids(RUN_SHELL))
def test_shell_block_runs_with_small_sizes(block, tmp_path, capsys):
    from lorapro import cli

    _fixtures(tmp_path)
    small = shlex.split(block.argument)
    with _in_folder(tmp_path):
        for words in _commands(block.code):
            assert Path(words[0]).name == "lorapro", f"{block.name}: only lorapro commands run: {words}"
            argv = words[1:] + (small if words[1] in ("bench", "diagnose") else [])
            assert cli.main(argv) == 0, f"{block.name}: `lorapro {shlex.join(argv)}` failed"
    assert capsys.readouterr().out  # the commands printed their tables
