"""The training methods the benchmark compares, each a builder registered by name.

A method turns a freshly loaded, unwrapped model into (model to train, optimizer, and an
optional per-step hook). Every baseline that PEFT ships comes from PEFT itself (LoRA,
rsLoRA, DoRA, PiSSA, LoRA+, LoRA-GA, AdaLoRA); nothing here re-implements them. The
LoRA-Pro methods use the library's public API only.

Shared defaults (the paper's): rank 8, alpha 16, LoRA on every linear or 1x1-conv layer
of the body chosen by the task, the task's head trained in full, AdamW with betas
(0.9, 0.999) and weight decay 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import MethodUnavailableError

if TYPE_CHECKING:
    from .records import TrainConfig
    from .tasks.base import PreparedTask

__all__ = [
    "METHODS",
    "BuildContext",
    "Built",
    "MethodSpec",
    "MethodUnavailableError",
    "get_method",
    "method_names",
    "register_method",
]


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    #: Called after every optimizer step with the 0-based step index, while gradients are
    #: still present (AdaLoRA's rank allocation needs them).
    after_step: Callable[[int], None] | None = None


@dataclass
class BuildContext:
    """What a builder may use besides the model: the run's config and the task."""

    cfg: TrainConfig
    task: PreparedTask
    total_steps: int

    def lora_config(self, model: nn.Module, config_cls: Any = None, **options: Any) -> Any:
        """A PEFT config with the shared defaults; ``options`` select the variant."""
        from peft import LoraConfig

        cls = config_cls or LoraConfig
        return cls(
            task_type=self.task.peft_task_type,
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=self.task.lora_targets(model),
            modules_to_save=self.task.modules_to_save,
            **options,
        )

    def wrap(self, model: nn.Module, config: Any) -> nn.Module:
        from peft import get_peft_model

        # Same A matrices for every method at a given seed, whatever loading consumed.
        torch.manual_seed(self.cfg.seed)
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`; not ours.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            try:
                return get_peft_model(model, config)
            except (ValueError, TypeError, NotImplementedError) as exc:
                raise MethodUnavailableError(f"PEFT cannot build this adapter on this model: {exc}") from exc

    def adamw(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay
        )


Builder = Callable[[nn.Module, BuildContext], Built]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Builder
    description: str
    #: Learning rate for single runs (demo, diagnose) when none is given. The benchmark
    #: never uses it: it tunes every method on the same grid.
    default_lr: float
    #: Raises MethodUnavailableError when the method cannot run in this environment.
    check: Callable[[], None] | None = None
    #: Its model holds plain LoRA pairs (W0 + s*B*A) that the gradient monitor can measure
    #: (not full fine-tuning, DoRA or AdaLoRA); ``lorapro diagnose`` and ``bench --diagnose``.
    diagnosable: bool = False


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    if spec.name in METHODS and not replace:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- builders


def _full(model: nn.Module, ctx: BuildContext) -> Built:
    return Built(model, ctx.adamw(_trainable(model)))


def _peft_adamw(**options: Any) -> Builder:
    def build(model: nn.Module, ctx: BuildContext) -> Built:
        wrapped = ctx.wrap(model, ctx.lora_config(model, **options))
        return Built(wrapped, ctx.adamw(_trainable(wrapped)))

    return build


#: LoRA+'s ratio of B's to A's learning rate: the value its authors recommend and PEFT's
#: documentation uses.
LORAPLUS_LR_RATIO = 16.0


def _loraplus(model: nn.Module, ctx: BuildContext) -> Built:
    from peft.optimizers import create_loraplus_optimizer

    wrapped = ctx.wrap(model, ctx.lora_config(model))
    opt = create_loraplus_optimizer(
        wrapped,
        torch.optim.AdamW,
        lr=ctx.cfg.lr,
        loraplus_lr_ratio=LORAPLUS_LR_RATIO,
        betas=(0.9, 0.999),
        weight_decay=ctx.cfg.weight_decay,
    )
    return Built(wrapped, opt)


#: Batches whose gradient LoRA-GA's initialisation averages (its paper uses a few dozen
#: examples; 4 batches of the run's batch size is in that range).
LORAGA_BATCHES = 4


def _loraga(model: nn.Module, ctx: BuildContext) -> Built:
    from peft import LoraGAConfig, preprocess_loraga

    config = ctx.lora_config(model, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    train = ctx.task.train
    gen = torch.Generator().manual_seed(ctx.cfg.seed + 7919)  # not the training order's stream
    order = torch.randperm(len(train), generator=gen).split(ctx.cfg.batch_size)[:LORAGA_BATCHES]

    def estimate() -> None:
        for idx in order:
            ctx.task.loss(model, train.batch(idx.tolist())).backward()

    try:
        preprocess_loraga(model, config, estimate)
    except ValueError as exc:
        raise MethodUnavailableError(f"PEFT's LoRA-GA cannot initialise this model: {exc}") from exc
    wrapped = ctx.wrap(model, config)
    return Built(wrapped, ctx.adamw(_trainable(wrapped)))


def _adalora(model: nn.Module, ctx: BuildContext) -> Built:
    from peft import AdaLoraConfig

    total = ctx.total_steps
    # AdaLoRA's schedule: start at rank 12, prune to an average of 8 (the shared rank)
    # between 10% and 80% of training, then hold the allocation fixed.
    tinit = max(1, total // 10)
    tfinal = max(1, total // 5)
    if tinit + tfinal >= total:
        raise MethodUnavailableError(
            f"AdaLoRA needs more training steps than {total} to prune ranks; raise --epochs or --train-size"
        )
    config = ctx.lora_config(
        model,
        AdaLoraConfig,
        init_r=ctx.cfg.lora_rank * 3 // 2,
        target_r=ctx.cfg.lora_rank,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=max(1, total // 50),
        total_step=total,
    )
    wrapped = ctx.wrap(model, config)
    base = wrapped.base_model

    def after_step(step: int) -> None:
        base.update_and_allocate(step)

    return Built(wrapped, ctx.adamw(_trainable(wrapped)), after_step)


def _linear_lora_only(wrapped: nn.Module, method: str) -> None:
    """Refuse a model with LoRA pairs other than Linear ones, for a method that handles only those:
    it would fail there, or train those pairs as plain LoRA under its own name."""
    from lorapro import find_lora_pairs

    others = [f"{pair.name} ({pair.kind})" for pair in find_lora_pairs(wrapped) if pair.kind != "linear"]
    if others:
        raise MethodUnavailableError(
            f"this benchmark runs {method} on Linear LoRA layers only; {len(others)} LoRA layer(s) are "
            f"not Linear, first {others[0]}"
        )


def _riemannian(model: nn.Module, ctx: BuildContext) -> Built:
    """PEFT's scaled-gradient (Riemannian) preconditioner on AdamW: ``(B^T B + reg I)^-1 grad_A``
    and ``grad_B (A A^T + reg I)^-1``, LoRA-Pro's nearest cousin; PEFT's default ``reg``."""
    from peft.optimizers import create_riemannian_optimizer

    wrapped = ctx.wrap(model, ctx.lora_config(model))
    _linear_lora_only(wrapped, "PEFT's Riemannian preconditioner")  # PEFT finds Linear pairs only
    opt = create_riemannian_optimizer(
        wrapped, torch.optim.AdamW, lr=ctx.cfg.lr, betas=(0.9, 0.999), weight_decay=ctx.cfg.weight_decay
    )
    return Built(wrapped, opt)


def _lorafa(model: nn.Module, ctx: BuildContext) -> Built:
    """PEFT's LoRA-FA: A frozen at its initialisation, B's gradient projected (its own AdamW)."""
    from peft.optimizers import create_lorafa_optimizer

    wrapped = ctx.wrap(model, ctx.lora_config(model))
    opt = create_lorafa_optimizer(
        wrapped, r=ctx.cfg.lora_rank, lora_alpha=ctx.cfg.lora_alpha, lr=ctx.cfg.lr,
        weight_decay=ctx.cfg.weight_decay,
    )  # fmt: skip
    return Built(wrapped, opt)


class _Together(torch.optim.Optimizer):
    """Several optimizers stepped as one. Its param groups are the children's own dicts, so a
    learning-rate schedule reaches all of them; ``state`` shows every child's state."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.children = optimizers

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {k: v for o in self.children for k, v in o.state.items()}

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ assigns an empty state
        pass

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("no closures: each child would evaluate it")
        for o in self.children:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.children:
            o.zero_grad(set_to_none=set_to_none)


def _check_pytorch_optimizer() -> None:
    import importlib.util

    if importlib.util.find_spec("pytorch_optimizer") is None:
        raise MethodUnavailableError(
            "LoRA-RITE comes from pytorch-optimizer: pip install 'pytorch-optimizer>=4.1'"
        )


def _lorarite(model: nn.Module, ctx: BuildContext) -> Built:
    """LoRA-RITE from pytorch-optimizer (its defaults) on the LoRA pairs, AdamW on the rest (the
    task's head), which LoRA-RITE leaves to the caller."""
    from pytorch_optimizer import LoRARite

    from lorapro import find_lora_pairs

    wrapped = ctx.wrap(model, ctx.lora_config(model))
    _linear_lora_only(wrapped, "LoRA-RITE")
    pairs = find_lora_pairs(wrapped)
    # LoRA-RITE reads a group's parameters two by two: lora_A (rank on dim 0), then its lora_B
    # (rank on dim -1), which are its default lora_l_dim / lora_r_dim.
    factors = [p for pair in pairs for p in (pair.A, pair.B)]
    ids = {id(p) for p in factors}
    rest = [p for p in _trainable(wrapped) if id(p) not in ids]
    rite = LoRARite(factors, lr=ctx.cfg.lr, betas=(0.9, 0.999), weight_decay=ctx.cfg.weight_decay)
    return Built(wrapped, _Together(rite, ctx.adamw(rest)) if rest else rite)


def _lorapro(mode: str, x_mode: str, **lora_options: Any) -> Builder:
    def build(model: nn.Module, ctx: BuildContext) -> Built:
        from lorapro import LoRAProAdamW

        wrapped = ctx.wrap(model, ctx.lora_config(model, **lora_options))
        # The optimizer takes the model: it pairs each lora_A with its lora_B by module and
        # reads the live scaling; the head gets plain AdamW.
        opt = LoRAProAdamW(
            wrapped,
            lr=ctx.cfg.lr,
            betas=(0.9, 0.999),
            weight_decay=ctx.cfg.weight_decay,
            mode=mode,
            x_mode=x_mode,
        )
        return Built(wrapped, opt)

    return build


def _lorapro_damped(damping: float) -> Builder:
    """Efficient mode with the closed form's ridge damping (``LoRAProAdamW(damping=...)``)."""

    def build(model: nn.Module, ctx: BuildContext) -> Built:
        from lorapro import LoRAProAdamW

        wrapped = ctx.wrap(model, ctx.lora_config(model))
        opt = LoRAProAdamW(
            wrapped, lr=ctx.cfg.lr, betas=(0.9, 0.999), weight_decay=ctx.cfg.weight_decay, damping=damping
        )
        return Built(wrapped, opt)

    return build


#: The damping values the bench offers, one method each (a run's hash covers its method's name,
#: so every other method's stored runs keep their hashes): from damping the first steps only
#: (B tiny after PEFT's B = 0 init) to damping throughout training, and 1, one step beyond the
#: grid's top for where its best value sat there (the bench's edge rule for rates). docs/results.md
#: measures them.
LORAPRO_DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0)

# Default single-run rates follow the trial runs in the field notes: methods that take an
# Adam-normalised step on the whole weight (full fine-tuning, LoRA-Pro full mode) want
# ~5e-5; methods that normalise A and B separately want ~5e-4 or more.
for _spec in (
    MethodSpec("full", _full, "full fine-tuning, torch AdamW", 5e-5),
    MethodSpec("lora", _peft_adamw(), "PEFT LoRA, torch AdamW", 5e-4, diagnosable=True),
    MethodSpec(
        "rslora",
        _peft_adamw(use_rslora=True),
        "PEFT rsLoRA (scaling alpha/sqrt(r)), AdamW",
        5e-4,
        diagnosable=True,
    ),
    MethodSpec("dora", _peft_adamw(use_dora=True), "PEFT DoRA, AdamW", 5e-4),
    MethodSpec(
        "pissa",
        _peft_adamw(init_lora_weights="pissa"),
        "PEFT PiSSA initialisation, AdamW",
        5e-4,
        diagnosable=True,
    ),
    MethodSpec(
        "loraplus",
        _loraplus,
        f"PEFT LoRA+ optimizer (B lr = {LORAPLUS_LR_RATIO:g} x A lr)",
        5e-4,
        diagnosable=True,
    ),
    MethodSpec("loraga", _loraga, "PEFT LoRA-GA initialisation, AdamW", 5e-4, diagnosable=True),
    MethodSpec("adalora", _adalora, "PEFT AdaLoRA (rank 12 -> 8 budget), AdamW", 5e-4),
    MethodSpec(
        "lorapro",
        _lorapro("efficient", "sylvester"),
        "LoRAProAdamW efficient mode, X by Sylvester",
        5e-4,
        diagnosable=True,
    ),
    MethodSpec(
        "lorapro-zero",
        _lorapro("efficient", "zero"),
        "LoRAProAdamW efficient mode, X = 0",
        5e-4,
        diagnosable=True,
    ),
    MethodSpec(
        "lorapro-symmetric",
        _lorapro("efficient", "symmetric"),
        "LoRAProAdamW efficient mode, symmetric X",
        5e-4,
        diagnosable=True,
    ),
    MethodSpec(
        "lorapro-full",
        _lorapro("full", "sylvester"),
        "LoRAProAdamW full mode (m x n moments)",
        5e-5,
        diagnosable=True,
    ),
    MethodSpec(
        "lorapro-factored",
        _lorapro("factored", "sylvester"),
        "LoRAProAdamW factored mode (full mode with O((m + n) r) moments; experimental)",
        5e-5,
        diagnosable=True,
    ),
    MethodSpec(
        "lorapro-factored-m",
        _lorapro("factored-first-moment", "sylvester"),
        "LoRAProAdamW, factored first moment and full mode's m x n second moment (diagnostic variant)",
        5e-5,
        diagnosable=True,
    ),
    MethodSpec(
        "lorapro-factored-sm3",
        _lorapro("factored-sm3", "sylvester"),
        "LoRAProAdamW, factored first moment and SM3's row/column second moment (experimental)",
        5e-5,
        diagnosable=True,
    ),
    MethodSpec(
        "lorapro-factored-nmf",
        _lorapro("factored-nmf", "sylvester"),
        "LoRAProAdamW, factored first moment and a rank-2 non-negative second moment (experimental)",
        5e-5,
        diagnosable=True,
    ),
    MethodSpec(
        "riemannian",
        _riemannian,
        "PEFT's Riemannian (scaled GD) preconditioner on AdamW",
        5e-4,
        diagnosable=True,
    ),
    # LoRA-FA freezes A: the monitor (LoRA-Pro's closed form) needs both factors trainable.
    MethodSpec("lorafa", _lorafa, "PEFT LoRA-FA optimizer (A frozen)", 5e-4),
    MethodSpec(
        "lorarite",
        _lorarite,
        "LoRA-RITE from pytorch-optimizer (AdamW on the head)",
        5e-4,
        check=_check_pytorch_optimizer,
        diagnosable=True,
    ),
    MethodSpec(
        "rslorapro",
        _lorapro("efficient", "sylvester", use_rslora=True),
        "rsLoRA scaling + LoRAProAdamW efficient mode",
        5e-4,
        diagnosable=True,
    ),
):
    register_method(_spec)

for _damping in LORAPRO_DAMPINGS:
    register_method(
        MethodSpec(
            f"lorapro-damped-{_damping:g}",
            _lorapro_damped(_damping),
            f"LoRAProAdamW efficient mode, ridge-damped closed form (damping {_damping:g})",
            5e-4,
            diagnosable=True,
        )
    )
# Damping 0 is `lorapro` itself under another name: stored `lorapro` runs keep their hashes (and
# the library code they ran with), so this one reruns efficient mode with today's code, as the
# control for the damped methods.
register_method(
    MethodSpec(
        "lorapro-damped-0",
        _lorapro_damped(0.0),
        "LoRAProAdamW efficient mode, damping 0 (= lorapro; the control of the damped methods)",
        5e-4,
        diagnosable=True,
    )
)
