"""A plain PyTorch fine-tuning loop and a registry of training methods.

No Hugging Face Trainer on purpose: the comparison must see exactly which optimizer
steps which parameters, and a ~100-line loop is easier to audit than Trainer's options.

A *method* bundles "how the model is wrapped" with "which optimizer steps it". Methods
live in :data:`METHODS`; a benchmark adds one (rsLoRA, DoRA, PiSSA, LoRA+, ...) with
:func:`register_method` and a builder function, without touching the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .data import Split
from .models import add_lora

__all__ = [
    "METHODS",
    "Encoded",
    "MethodSpec",
    "MethodUnavailableError",
    "RunResult",
    "TrainConfig",
    "encode",
    "evaluate_accuracy",
    "get_method",
    "register_method",
    "train_and_evaluate",
]


# --------------------------------------------------------------------------- config / results


@dataclass
class TrainConfig:
    """Everything the loop needs besides the method and the data; identical across methods."""

    lr: float
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 64
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # None: no clipping (the default for every method)
    seed: int = 0
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False


@dataclass
class RunResult:
    method: str
    lr: float
    final_train_loss: float  # mean of the last 10% of steps: a single step is too noisy
    val_accuracy: float | None
    test_accuracy: float | None
    seconds: float  # training plus evaluation, excluding model loading and tokenisation
    train_seconds: float
    steps: int
    trainable_params: int
    loss_curve: list[float] = field(default_factory=list)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- tokenisation


@dataclass
class Encoded:
    """A tokenised split: unpadded token ids per example (padding happens per batch)."""

    input_ids: list[list[int]]
    labels: list[int]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad just to the longest example in the batch: short movie-review sentences
        would otherwise pay for max_length tokens each."""
        rows = [self.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, : len(r)] = 1
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode(tokenizer: Any, split: Split, max_length: int = 64) -> Encoded:
    """Tokenise a split once; every method and epoch reuses the result."""
    out = tokenizer(list(split.texts), truncation=True, max_length=max_length, padding=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(list(out["input_ids"]), list(split.labels), int(pad))


# --------------------------------------------------------------------------- methods


#: A builder takes the freshly loaded (unwrapped) model and the config and returns the
#: model to train (possibly wrapped, e.g. by PEFT) and the optimizer that steps it.
Builder = Callable[[nn.Module, TrainConfig], tuple[nn.Module, torch.optim.Optimizer]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    default_lr: float
    build: Builder
    description: str = ""
    #: Raises with an actionable message when the method cannot run here (e.g. the
    #: optimizer is missing); called before any training so a long run fails early.
    check: Callable[[], None] | None = None


METHODS: dict[str, MethodSpec] = {}


class MethodUnavailableError(RuntimeError):
    """A registered method cannot run in this environment; the message says why."""


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    if spec.name in METHODS and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _lora(model: nn.Module, cfg: TrainConfig, **extra: Any) -> nn.Module:
    # Re-seed so LoRA's random A matrices are the same for every method at this seed,
    # whatever the model loading consumed from the generator.
    torch.manual_seed(cfg.seed)
    return add_lora(
        model,
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        **extra,
    )


def _build_full(model: nn.Module, cfg: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    return model, torch.optim.AdamW(_trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _build_lora(model: nn.Module, cfg: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    peft_model = _lora(model, cfg)
    opt = torch.optim.AdamW(_trainable(peft_model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return peft_model, opt


def _lorapro_class() -> type:
    """The library's optimizer, through its public API only."""
    import lorapro

    cls = getattr(lorapro, "LoRAProAdamW", None)
    if cls is None:
        raise MethodUnavailableError(
            "lorapro.LoRAProAdamW is not available in this build of lorapro; "
            "run with --methods full,lora until it is."
        )
    return cls


def _lorapro_builder(mode: str) -> Builder:
    def build(model: nn.Module, cfg: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
        peft_model = _lora(model, cfg)
        # The optimizer takes the model itself: it pairs each lora_A with its lora_B and
        # reads the per-layer scaling; other trainable parameters (the classifier head in
        # modules_to_save) get its plain AdamW update.
        opt = _lorapro_class()(
            peft_model, lr=cfg.lr, weight_decay=cfg.weight_decay, mode=mode, x_mode="sylvester"
        )
        return peft_model, opt

    return build


def _check_lorapro() -> None:
    _lorapro_class()


# Default learning rates follow the trial runs in the field notes: full fine-tuning and
# LoRA-Pro full mode take an Adam-normalised step on the whole weight and want ~5e-5
# (10x more diverged); plain LoRA and efficient mode normalise A and B separately and
# want ~5e-4 (1e-4 under-trained badly in a short budget).
register_method(MethodSpec("full", 5e-5, _build_full, "full fine-tuning, torch AdamW"))
register_method(MethodSpec("lora", 5e-4, _build_lora, "PEFT LoRA, torch AdamW"))
register_method(
    MethodSpec(
        "lorapro",
        5e-4,
        _lorapro_builder("efficient"),
        "PEFT LoRA, LoRAProAdamW efficient mode",
        check=_check_lorapro,
    )
)
register_method(
    MethodSpec(
        "lorapro-full",
        5e-5,
        _lorapro_builder("full"),
        "PEFT LoRA, LoRAProAdamW full mode",
        check=_check_lorapro,
    )
)


# --------------------------------------------------------------------------- loop


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data: Encoded, batch_size: int = 128) -> float:
    """Accuracy of argmax predictions. Batches are formed from length-sorted examples so
    dynamic padding wastes little; the order does not change the result."""
    if len(data) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        correct += int((logits.argmax(dim=-1) == labels).sum())
    model.train(was_training)
    return correct / len(data)


def train_and_evaluate(
    method: str | MethodSpec,
    load_model: Callable[[], nn.Module],
    train: Encoded,
    cfg: TrainConfig,
    *,
    validation: Encoded | None = None,
    test: Encoded | None = None,
    progress: bool = True,
) -> RunResult:
    """Fine-tune one freshly loaded model with one method and evaluate it.

    ``load_model`` must return a new, unwrapped model each call; it is called under
    ``torch.manual_seed(cfg.seed)`` so the random head starts identical across methods.
    Data order comes from its own generator seeded by ``cfg.seed``, so it too is shared.
    """
    spec = get_method(method) if isinstance(method, str) else method
    if len(train) == 0:
        raise ValueError("empty training set")
    torch.manual_seed(cfg.seed)
    model, optimizer = spec.build(load_model(), cfg)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    from transformers import get_cosine_schedule_with_warmup

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)

    gen = torch.Generator().manual_seed(cfg.seed)
    # Dropout masks draw from the global generator; reseed it so they match across methods too.
    torch.manual_seed(cfg.seed)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=f"{spec.name} lr={cfg.lr:g}", unit="step", leave=True)

    start = time.perf_counter()
    model.train()
    try:
        for _ in range(cfg.epochs):
            for batch_idx in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
                batch = train.batch(batch_idx.tolist())
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(_trainable(model), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    train_seconds = time.perf_counter() - start

    val_acc = evaluate_accuracy(model, validation, cfg.eval_batch_size) if validation is not None else None
    test_acc = evaluate_accuracy(model, test, cfg.eval_batch_size) if test is not None else None
    seconds = time.perf_counter() - start

    tail = max(1, math.ceil(0.1 * len(losses)))
    return RunResult(
        method=spec.name,
        lr=cfg.lr,
        final_train_loss=sum(losses[-tail:]) / tail,
        val_accuracy=val_acc,
        test_accuracy=test_acc,
        seconds=seconds,
        train_seconds=train_seconds,
        steps=len(losses),
        trainable_params=n_trainable,
        loss_curve=losses,
        seed=cfg.seed,
    )
