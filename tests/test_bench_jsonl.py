"""``lorapro bench --task jsonl:PATH``: the user's prompt/response (or chat) lines on a causal LM.

A tiny random Llama with a word-level tokenizer, saved with save_pretrained into the test's
folder, stands in for the user's model; the JSONL files are written by the tests. One slow
test runs the real SmolLM2-135M-Instruct folder (the one the gsm task builds).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bench_runs import quick_bench_argv as _bench
from lorapro.bench.tasks import TaskOptions, get_task
from lorapro.bench.tasks.jsonl_format import JsonlFormatError, final_answer, read_jsonl
from lorapro.bench.tasks.jsonl_tokens import encode_records
from lorapro.cli import main
from tiny_llama import save_tiny_llama

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def plain_llama_dir(tmp_path_factory) -> Path:
    """The same model, its tokenizer without a chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-plain"), chat_template=False)


def _line(i: int) -> dict:
    a, b = i % 7, (3 * i) % 5
    if i % 2:
        return {"prompt": f"what is {a} plus {b}", "response": f"so {a} plus {b} equals {a + b} #### {a + b}"}
    return {
        "id": i,  # other keys are ignored
        "messages": [
            {"role": "user", "content": f"what is {a} plus {b}"},
            {"role": "assistant", "content": f"#### {a + b}"},
        ],
    }


def _write(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    return _write(tmp_path / "train.jsonl", [_line(i) for i in range(30)])


def _task(path: Path, **options):
    task = get_task(f"jsonl:{path}")
    task.configure(**{k: str(v) if isinstance(v, Path) else v for k, v in options.items()})
    return task


# --------------------------------------------------------------------------- end to end


def test_bench_on_a_model_folder_and_a_jsonl_file(tmp_path, llama_dir, data, capsys):
    out = tmp_path / "out"
    argv = _bench("--model", str(llama_dir), "--task", f"jsonl:{data}", "--methods", "lora,lorapro",
                  "--lr-grid", "1e-3,1e-2", "--max-steps", "2", "--answer-regex", r"#### (\S+)",
                  "--out", str(out))  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| lorapro |" in printed and "exact_match" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "jsonl" and summary["report_metric"] == "loss"
    assert summary["selection_metric"] == {"name": "loss", "higher_is_better": False, "split": "validation"}
    assert summary["task_info"]["sizes"] == {"train": 24, "validation": 3, "test": 3, "pool": 30}
    for row in summary["methods"]:
        assert row["chosen_lr"] in (1e-3, 1e-2)
        assert all(math.isfinite(v["loss"]) for v in row["grid_validation"].values())
        (test,) = row["test_metrics_per_seed"]
        assert math.isfinite(test["loss"]) and 0.0 <= test["exact_match"] <= 1.0
        assert all(math.isfinite(x) for x in row["final_train_loss"])
    runs = list((out / "runs").rglob("*.json"))
    assert len(runs) == 4 and all(json.loads(p.read_text())["result"]["steps"] == 2 for p in runs)
    assert "| lora |" in (out / "results.md").read_text()
    # Per test example: the loss per response token weighted by its tokens (their weighted mean is
    # the test loss) and the exact match, for the verdict's paired bootstrap.
    result = json.loads(runs[0].read_text())["result"]
    examples = result["extra"]["test_examples"]
    loss, weights = examples["loss"]["values"], examples["loss"]["weights"]
    assert len(loss) == 3 and all(w >= 1 for w in weights)
    weighted = sum(v * w for v, w in zip(loss, weights, strict=True)) / sum(weights)
    assert weighted == pytest.approx(result["test"]["loss"], rel=1e-5)
    assert sum(examples["exact_match"]["values"]) / 3 == result["test"]["exact_match"]
    (c,) = summary["verdict"]["comparisons"]
    assert (c["method"], c["reference"], c["metric"], c["kind"]) == ("lorapro", "lora", "loss", "examples")
    # Rerunning reuses every run.
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["runs_executed"] == 0


def test_bundled_model_is_the_default(tmp_path, data):
    from lorapro.bench.data import MissingAssetError

    task = get_task(f"jsonl:{data}")
    assert "SmolLM2-135M-Instruct" in task.description
    try:
        identity = task.identity()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    assert identity["model"]["bundled"] == "smollm2-135m-instruct"


# --------------------------------------------------------------------------- data


def test_loss_is_on_the_response_tokens_only(llama_dir, data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    records = read_jsonl(data)[:2]
    split, errors = encode_records(records, tokenizer, max_length=64)
    assert errors == [] and split.truncated == 0
    batch = split.batch([0, 1])
    ids, labels = batch["input_ids"], batch["labels"]
    for row in range(2):
        n, m = len(split.prompts[row]), len(split.targets[row])
        assert (labels[row, :n] == -100).all() and (labels[row, n + m :] == -100).all()
        assert torch.equal(labels[row, n : n + m], ids[row, n : n + m])
        assert int(labels[row, n + m - 1]) == tokenizer.eos_token_id
    # A chat line: the template's prompt up to the assistant header; the reply with its end-of-turn.
    assert tokenizer.decode(split.prompts[0]) == "<|user|> what is 0 plus 0 <|end|> <|assistant|>"
    assert tokenizer.decode(split.targets[0]) == "#### 0 <|end|> <eos>"
    # A prompt/response line: plain text, then the end-of-sequence token.
    assert tokenizer.decode(split.prompts[1]) == "what is 1 plus 3"
    assert tokenizer.decode(split.targets[1]) == "so 1 plus 3 equals 4 #### 4 <eos>"
    # A long response loses its end; the prompt stays whole.
    cut, _ = encode_records(records[1:], tokenizer, max_length=7)
    assert cut.truncated == 1 and cut.prompts == split.prompts[1:] and len(cut.targets[0]) == 2


def test_splits_are_seeded_disjoint_and_keep_evaluation_fixed(llama_dir, data):
    def where(prepared, name):
        return getattr(prepared, name).where

    task = _task(data, model=llama_dir)
    a = task.prepare(TaskOptions())
    assert a.info["sizes"] == {"train": 24, "validation": 3, "test": 3, "pool": 30}
    lines = [set(where(a, name)) for name in ("train", "validation", "test")]
    assert sum(map(len, lines)) == 30 and len(set.union(*lines)) == 30
    assert where(task.prepare(TaskOptions()), "test") == where(a, "test")  # deterministic
    smaller = task.prepare(TaskOptions(train_size=5))
    assert where(smaller, "test") == where(a, "test") and where(smaller, "validation") == where(
        a, "validation"
    )
    assert len(smaller.train) == 5
    assert where(task.prepare(TaskOptions(data_seed=1)), "test") != where(a, "test")
    with pytest.raises(JsonlFormatError, match="--train-size 25 is more than the 24 lines"):
        task.prepare(TaskOptions(train_size=25))
    with pytest.raises(JsonlFormatError, match="30 lines are too few"):
        task.prepare(TaskOptions(val_size=15, test_size=15))


def test_eval_file_holds_validation_and_test(tmp_path, llama_dir, data):
    held = _write(tmp_path / "held.jsonl", [_line(i) for i in range(100, 109)])
    prepared = _task(data, model=llama_dir, eval_file=held).prepare(TaskOptions())
    assert prepared.info["sizes"] == {"train": 30, "validation": 4, "test": 5, "pool": 39}
    assert all(w.startswith(f"{held}:") for w in prepared.validation.where + prepared.test.where)
    assert all(w.startswith(f"{data}:") for w in prepared.train.where)
    sized = _task(data, model=llama_dir, eval_file=held).prepare(TaskOptions(val_size=2, test_size=3))
    assert (len(sized.validation), len(sized.test)) == (2, 3)


def test_final_answer_reads_the_first_group_or_the_whole_match():
    assert final_answer(re.compile(r"#### (\S+)"), "so 3 #### 42 and #### 7") == "42"
    assert final_answer(re.compile(r"\d+"), "a 12 b 3") == "12"
    assert final_answer(re.compile(r"answer: (.*)"), "answer:   yes ") == "yes"
    assert final_answer(re.compile(r"#### (\S+)"), "no marker") is None


def test_exact_match_compares_final_answers(monkeypatch, llama_dir, data):
    import lorapro.bench.tasks.jsonl as jsonl

    prepared = _task(data, model=llama_dir, answer_regex=r"#### (\S+)").prepare(TaskOptions(test_size=4))
    references = prepared.test.references
    first = final_answer(re.compile(r"#### (\S+)"), references[0])
    # Two right answers (one in other words), one wrong, one without an answer.
    replies = [
        f"it is #### {first}",
        references[1],
        "#### 99",
        "?",
    ]
    monkeypatch.setattr(jsonl, "greedy_answers", lambda model, split, *a: replies)
    metrics = prepared.evaluate(prepared.load_model(), "test")
    assert metrics["exact_match"] == 0.5 and math.isfinite(metrics["loss"])
    assert set(prepared.evaluate(prepared.load_model(), "validation")) == {"loss"}


# --------------------------------------------------------------------------- bad lines


GOOD = [_line(i) for i in range(12)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"prompt": "what is 1", "response": ', "not JSON"),
        ({"prompt": "what is 1"}, "missing field 'response'"),
        ({"response": "4"}, "missing field 'prompt'"),
        ({"question": "what is 1"}, "missing fields 'prompt' and 'response' (or 'messages')"),
        ({"prompt": "what is 1", "response": "  "}, "empty field 'response'"),
        ({"prompt": "", "response": "4"}, "empty field 'prompt'"),
        ({"prompt": "what is 1", "response": 4}, "field 'response' must be a string, got a number"),
        ({"prompt": ["what"], "response": "4"}, "field 'prompt' must be a string, got an array"),
        ([1, 2], "an array, not an object"),
        ({"prompt": "a", "response": "b", "messages": []}, "has both 'messages' and 'prompt'/'response'"),
        ({"messages": []}, "non-empty array"),
        ({"messages": "hi"}, "must be a non-empty array of {role, content} objects, got a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "got role 'user'"),
        ({"messages": [{"role": "assistant", "content": "4"}]}, "at least one message before"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "4"}]},
         "missing messages[0] field 'content'"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "4"}]},
         "messages[0] field 'content' must be a string"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
         "empty messages[1] field 'content'"),
        ({"prompt": "what is 1 plus 1 and 2 plus 2 and 3 plus 3 and 4", "response": "4"},
         "nothing of the response is left after truncation: the prompt alone takes 15 tokens of "
         "--max-length 12"),
    ],
)  # fmt: skip
def test_a_bad_line_is_refused_with_its_file_and_line(tmp_path, llama_dir, capsys, bad, message):
    path = _write(tmp_path / "data.jsonl", [*GOOD[:3], bad, *GOOD[3:]])
    out = tmp_path / "out"
    argv = _bench(
        "--model", str(llama_dir), "--task", f"jsonl:{path}", "--max-length", "12", "--out", str(out)
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorapro bench: error: {path}:4: ") and "\n" not in err, err
    assert message in err, err
    assert not out.exists()  # nothing trained, nothing written, no empty folder left


def test_every_bad_line_is_counted_and_blank_lines_skipped(tmp_path):
    path = _write(tmp_path / "data.jsonl", [*GOOD[:2], "", "   ", "nope", {"prompt": "a"}, *GOOD[2:]])
    with pytest.raises(
        JsonlFormatError, match=rf"^{re.escape(str(path))}:5: not JSON .* \(and 1 more bad line\)$"
    ):
        read_jsonl(path)
    assert len(read_jsonl(_write(tmp_path / "ok.jsonl", [*GOOD[:2], "", *GOOD[2:]]))) == 12


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(JsonlFormatError, match=r"data\.jsonl:2: not UTF-8 text"):
        read_jsonl(path)


def test_messages_without_a_chat_template_are_refused(tmp_path, plain_llama_dir, capsys):
    path = _write(tmp_path / "data.jsonl", [GOOD[1], GOOD[0], *GOOD[2:]])  # line 2 is a chat line
    out = tmp_path / "out"
    assert main(_bench("--model", str(plain_llama_dir), "--task", f"jsonl:{path}", "--out", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorapro bench: error: {path}:2: 'messages' need the tokenizer's chat template"), (
        err
    )
    assert "write the line as 'prompt' and 'response'" in err and not out.exists()


def test_a_response_without_the_answer_is_refused(tmp_path, llama_dir, capsys):
    path = _write(tmp_path / "data.jsonl", [*GOOD[:5], {"prompt": "what is 1", "response": "1"}, *GOOD[5:]])
    out = tmp_path / "out"
    argv = _bench("--model", str(llama_dir), "--task", f"jsonl:{path}", "--answer-regex", r"#### (\S+)",
                  "--out", str(out))  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}:6: the response has no match of --answer-regex" in err and not out.exists()


def test_a_bad_line_of_the_eval_file_names_that_file(tmp_path, llama_dir, data, capsys):
    held = _write(tmp_path / "held.jsonl", [*GOOD[:2], {"prompt": "what is 1", "response": 1}])
    out = tmp_path / "out"
    argv = _bench(
        "--model", str(llama_dir), "--task", f"jsonl:{data}", "--eval-file", str(held), "--out", str(out)
    )
    assert main(argv) == 2
    assert f"{held}:3: field 'response' must be a string" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--answer-regex", "(unclosed"], "--answer-regex '(unclosed' is not a regular expression"),
        (["--eval-file", "absent.jsonl"], "absent.jsonl: no such file; pass --eval-file"),
    ],
)
def test_bad_jsonl_options_are_one_line(tmp_path, llama_dir, data, capsys, extra, message):
    out = tmp_path / "out"
    assert main(_bench("--model", str(llama_dir), "--task", f"jsonl:{data}", *extra, "--out", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


def test_missing_file_and_options_of_other_tasks(tmp_path, capsys):
    assert main(_bench("--task", f"jsonl:{tmp_path / 'none.jsonl'}", "--out", str(tmp_path / "o"))) == 2
    assert "none.jsonl: no such file; pass jsonl:PATH" in capsys.readouterr().err
    assert main(_bench("--task", "mr", "--eval-file", "x.jsonl", "--out", str(tmp_path / "o"))) == 2
    assert "task mr does not take --eval-file" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_folder_on_a_jsonl_file(tmp_path, capsys):
    """SmolLM2-135M-Instruct's folder (the checkpoint the gsm task builds) given as --model."""
    from lorapro.bench.data import MissingAssetError
    from lorapro.bench.smollm2 import _ready_cache

    try:
        folder = _ready_cache()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    path = _write(tmp_path / "data.jsonl", [_line(i) for i in range(6)])
    out = tmp_path / "out"
    argv = _bench("--model", str(folder), "--task", f"jsonl:{path}", "--methods", "lora", "--lr-grid", "1e-4",
                  "--val-size", "1", "--test-size", "1", "--max-steps", "1", "--batch-size", "2",
                  "--answer-regex", r"#### (\S+)", "--out", str(out))  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads((out / "summary.json").read_text())["methods"]
    (test,) = row["test_metrics_per_seed"]
    # SmolLM2 knows some arithmetic: far below the uniform loss over its 49k tokens (10.8).
    assert 0.0 < test["loss"] < 8.0 and test["exact_match"] in (0.0, 1.0)
    assert row["trainable_params"] == 30 * 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + 2112)
