"""LoRA-Pro in LLaMA-Factory: ``lorapro-llamafactory train config.yaml`` in place of
``llamafactory-cli train config.yaml``.

LLaMA-Factory takes third-party callbacks only through its Python entry point
``llamafactory.train.tuner.run_exp(args, callbacks=[...])``; no configuration key loads one. So
this module is a command that reads the same YAML (and ``key=value`` overrides) as
``llamafactory-cli train``, checks that the configuration can run LoRA-Pro, and calls ``run_exp``
with :class:`~lorapro.integrations.trainer.LoRAProCallback`: LLaMA-Factory's own optimizer
(any ``optim``) then applies LoRA-Pro's gradients (efficient mode; Algorithm 1 with ``sgd``).

The one key of its own, ``lorapro_x_mode`` (``sylvester``, ``zero`` or ``symmetric``), is taken
out before LLaMA-Factory parses the rest. ``llamafactory-cli`` refuses a YAML that holds it
(unknown key), so a configuration written for LoRA-Pro cannot train plain LoRA by mistake.

Refused with :class:`~lorapro.LoRAProConfigError` before anything loads: ``finetuning_type``
other than ``lora``, DoRA, the optimizers LLaMA-Factory builds itself around the gradients
(GaLore, APOLLO, BAdam, LoRA+ through ``loraplus_lr_ratio``), GaLore/APOLLO/LOMO ``optim``
names, stages other than ``sft`` and ``pt``, and the engines that bypass the Trainer's callbacks
(``use_mca``, ``use_hyper_parallel``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Any

try:
    from llamafactory.extras.misc import get_device_count
    from llamafactory.hparams import FinetuningArguments, read_args
    from llamafactory.train.tuner import run_exp as _llamafactory_run_exp
    from transformers import HfArgumentParser, TrainerCallback
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        f"lorapro.integrations.llamafactory needs LLaMA-Factory ({exc.name} is missing): "
        "pip install llamafactory",
        name=exc.name,
    ) from exc

from ._frameworks import X_MODE_KEY, AnnouncingLoRAProCallback, check_optim, check_x_mode, refuse

__all__ = ["check_config", "main", "pop_lorapro_options", "run_exp"]

FRAMEWORK = "LLaMA-Factory"
STAGES = ("sft", "pt")
"""Stages whose trainer is a Transformers ``Trainer`` taking the callbacks (``sft`` is tested)."""

Args = dict[str, Any] | list[str]


def pop_lorapro_options(args: Args) -> tuple[Args, dict[str, Any]]:
    """Split lorapro's keys from LLaMA-Factory's: a dict (YAML plus overrides) or an argv list."""
    if isinstance(args, dict):
        rest = dict(args)
        value = rest.pop(X_MODE_KEY, "sylvester")
        return rest, {"x_mode": check_x_mode(value, FRAMEWORK)}
    rest_list: list[str] = []
    value = "sylvester"
    items = iter(args)
    for item in items:
        if item == f"--{X_MODE_KEY}":
            value = next(items, None)
        elif item.startswith(f"--{X_MODE_KEY}="):
            value = item.partition("=")[2]
        else:
            rest_list.append(item)
    return rest_list, {"x_mode": check_x_mode(value, FRAMEWORK)}


def _settings(args: Args) -> dict[str, Any]:
    """The raw values of LLaMA-Factory's finetuning settings (defaults filled in) and ``optim``.

    Read without building ``FinetuningArguments``, whose own checks would reject some of the
    combinations refused here (LoRA with GaLore, for one) with a less specific message.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuningArguments)}
    defaults["optim"] = "adamw_torch"
    if isinstance(args, dict):
        return {key: args.get(key, default) for key, default in defaults.items()}
    parser = HfArgumentParser(FinetuningArguments)
    parser.add_argument("--optim", default="adamw_torch")
    namespace, _ = parser.parse_known_args(args)
    return {key: getattr(namespace, key, default) for key, default in defaults.items()}


def _on(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes", "y")


def check_config(args: Args) -> None:
    """Raise :class:`~lorapro.LoRAProConfigError` if this LLaMA-Factory configuration (without
    lorapro's keys) would not train LoRA-Pro."""
    settings = _settings(args)
    if settings["finetuning_type"] != "lora":
        raise refuse(
            FRAMEWORK,
            f"finetuning_type={settings['finetuning_type']!r} trains no LoRA factors",
            "LoRA-Pro adjusts the gradients of LoRA pairs: set finetuning_type: lora",
        )
    if _on(settings["use_dora"]):
        raise refuse(
            FRAMEWORK,
            "use_dora: DoRA adds a magnitude vector, and LoRA-Pro's closed form holds only for W0 + s B A",
            "Remove use_dora (use_rslora is supported)",
        )
    if settings["stage"] not in STAGES:
        raise refuse(
            FRAMEWORK,
            f"stage={settings['stage']!r} is not supported by this integration",
            f"Use stage {' or '.join(STAGES)}",
        )
    own_optimizers = {
        "use_galore": "GaLore projects the gradients onto a subspace of its own",
        "use_apollo": "APOLLO projects the gradients onto a subspace of its own",
        "use_badam": "BAdam trains blocks of full weights in turn",
    }
    for key, why in own_optimizers.items():
        if _on(settings.get(key)):
            raise refuse(FRAMEWORK, f"{key}: {why}", f"Remove {key}")
    if settings["loraplus_lr_ratio"] is not None:
        raise refuse(
            FRAMEWORK,
            "loraplus_lr_ratio (LoRA+) steps B with a larger learning rate than A, so the update is no "
            "longer the one LoRA-Pro's gradients define",
            "Remove loraplus_lr_ratio",
        )
    for key in ("use_mca", "use_hyper_parallel"):
        if _on(settings.get(key)):
            raise refuse(
                FRAMEWORK,
                f"{key} trains outside the Transformers Trainer, which is where LoRA-Pro's callback runs",
                f"Remove {key}",
            )
    check_optim(settings["optim"], FRAMEWORK)


def run_exp(args: Args | None = None, callbacks: list[TrainerCallback] | None = None) -> None:
    """``llamafactory.train.tuner.run_exp`` with LoRA-Pro on.

    ``args`` as LLaMA-Factory takes them: a dict, an argv list, or ``None`` to read the command
    line (a YAML or JSON path, then ``key=value`` overrides). ``callbacks`` are passed on, after
    lorapro's.
    """
    lf_args, options = pop_lorapro_options(read_args(args))
    check_config(lf_args)
    _run_checked(lf_args, options, callbacks)


def _run_checked(lf_args: Args, options: dict[str, Any], callbacks: list[TrainerCallback] | None) -> None:
    lorapro_callback = AnnouncingLoRAProCallback(FRAMEWORK, x_mode=options["x_mode"])
    _llamafactory_run_exp(lf_args, callbacks=[lorapro_callback, *(callbacks or [])])


USAGE = "usage: lorapro-llamafactory train CONFIG.yaml [key=value ...]  (as llamafactory-cli train)"


def _torchrun_command(argv: list[str]) -> list[str] | None:
    """The torchrun command ``llamafactory-cli train`` would use here (several devices, or
    ``FORCE_TORCHRUN=1``), running this module instead; None for one process."""
    if "LOCAL_RANK" in os.environ:  # already a rank started by torchrun
        return None
    several = get_device_count() > 1 and os.getenv("USE_RAY", "0").lower() not in ("1", "true", "y")
    if not (several or os.getenv("FORCE_TORCHRUN", "0").lower() in ("1", "true", "y")):
        return None
    from llamafactory.extras.misc import find_available_port

    env = os.environ
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", env.get("NNODES", "1"),
        "--node_rank", env.get("NODE_RANK", "0"),
        "--nproc_per_node", env.get("NPROC_PER_NODE", str(max(get_device_count(), 1))),
        "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"),
        "--master_port", env.get("MASTER_PORT", str(find_available_port())),
        "-m", __name__, "train", *argv,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``lorapro-llamafactory train CONFIG [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        print(USAGE, file=sys.stderr)
        return 2
    rest = argv[1:]
    sys.argv = [sys.argv[0], *rest]  # where LLaMA-Factory's read_args looks for the YAML
    lf_args, options = pop_lorapro_options(read_args())
    check_config(lf_args)  # before any process starts or anything loads
    command = _torchrun_command(rest)
    if command is not None:
        return subprocess.run(command, check=False).returncode
    _run_checked(lf_args, options, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
