"""A bad ``--out`` fails in one line before anything loads or trains; LoRAProTrainer says that
it does not use ``optim=``."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorapro import cli


@pytest.fixture
def nothing_may_run(monkeypatch):
    """Any training entry point reached means the check came too late."""

    def refuse(*args, **kwargs):
        raise AssertionError("a command started work before checking --out")

    import lorapro.bench.bench_cli as bench_cli
    import lorapro.bench.demo as demo
    import lorapro.bench.diagnose as diagnose

    monkeypatch.setattr(demo, "run_demo", refuse)
    monkeypatch.setattr(bench_cli, "run_benchmark", refuse)
    monkeypatch.setattr(diagnose, "diagnose", refuse)
    monkeypatch.setattr(diagnose, "replot", refuse)


@pytest.mark.parametrize(
    "command",
    [["demo"], ["bench", "--task", "mr"], ["diagnose"], ["diagnose", "--from-records", "records.jsonl"]],
)
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unwritable_out_fails_before_any_work(tmp_path, capsys, nothing_may_run, command, where):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "sub"
    code = cli.main([*command, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0, err  # one line, no traceback
    assert err.startswith(f"lorapro {command[0]}: error: --out {out}") and "give" in err, err


@pytest.fixture
def failing_work(monkeypatch):
    """Every command's work fails after recording what its --out held when it began; ``write``
    makes it write a file first."""
    import lorapro.bench.bench_cli as bench_cli
    import lorapro.bench.demo as demo
    import lorapro.bench.diagnose as diagnose

    seen: dict = {"write": False, "held": []}

    def work(*args, **kwargs):
        out = kwargs.get("out") or args[0].out
        seen["held"].append(sorted(p.name for p in Path(out).iterdir()))
        if seen["write"]:
            (Path(out) / "runs.json").write_text("{}")
        raise RuntimeError("the work failed")

    monkeypatch.setattr(demo, "run_demo", work)
    monkeypatch.setattr(bench_cli, "run_benchmark", work)
    monkeypatch.setattr(diagnose, "diagnose", work)
    return seen


COMMANDS = [["demo"], ["bench", "--task", "mr"], ["diagnose"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_failed_command_leaves_no_empty_out_behind(tmp_path, failing_work, command):
    out = tmp_path / "new" / "folder"
    with pytest.raises(RuntimeError, match="the work failed"):
        cli.main([*command, "--out", str(out)])
    assert failing_work["held"] == [[]]  # the folder was there when work began, the probe file gone
    assert not (tmp_path / "new").exists()  # created by the command, left empty: removed


@pytest.mark.parametrize("command", COMMANDS)
def test_a_failed_command_keeps_an_out_that_holds_files_or_existed(tmp_path, failing_work, command):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        cli.main([*command, "--out", str(existing)])
    assert existing.is_dir()
    failing_work["write"] = True
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        cli.main([*command, "--out", str(out)])
    assert (out / "runs.json").is_file()


def test_lorapro_trainer_warns_that_it_does_not_use_optim(tmp_path):
    from transformers import TrainingArguments

    from integration_common import PatternDataset, tiny_lora_llama
    from lorapro.integrations.trainer import LoRAProTrainer

    def build(**extra):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, **extra)
        return LoRAProTrainer(model=tiny_lora_llama(), args=args, train_dataset=PatternDataset(4))

    with pytest.warns(UserWarning, match=r"does not use optim='adafactor'.*LoRAProCallback"):
        build(optim="adafactor")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build()  # the default optim: nothing to warn about
