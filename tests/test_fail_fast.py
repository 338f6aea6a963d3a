"""A bad ``--out`` fails in one line before anything loads or trains; LoRAProTrainer says that
it does not use ``optim=``."""

from __future__ import annotations

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


def test_a_writable_out_is_created_and_left_clean(tmp_path, capsys, nothing_may_run):
    out = tmp_path / "new" / "folder"
    with pytest.raises(AssertionError, match="before checking --out"):  # the check passed, work began
        cli.main(["demo", "--out", str(out)])
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file is gone


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
