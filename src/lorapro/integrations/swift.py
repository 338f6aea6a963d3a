"""LoRA-Pro in ms-swift: ``lorapro-swift sft ...`` in place of ``swift sft ...``.

ms-swift loads third-party code through ``--external_plugins FILE.py`` (a file path, imported
before training) and instantiates the trainer callbacks named by ``--callbacks`` from its
``swift.callbacks.callbacks_map``. lorapro ships such a file (:data:`PLUGIN_FILE`); importing it
registers three callbacks, ``lorapro`` (X of Theorem 2.3), ``lorapro_zero`` and
``lorapro_symmetric``, each :class:`~lorapro.integrations.trainer.LoRAProCallback`: ms-swift's
own optimizer (any ``--optim``) then applies LoRA-Pro's gradients (efficient mode).

``lorapro-swift sft|pt ARGS`` is ``swift sft|pt ARGS`` with both flags added (merged with any
``--external_plugins`` / ``--callbacks`` already given, also in a YAML config), so ms-swift's
own launcher still starts the run (one process or torchrun). The equivalent by hand::

    swift sft ... --external_plugins "$(lorapro-swift plugin-file)" --callbacks lorapro

The one option of its own, ``--lorapro_x_mode zero|symmetric|sylvester`` (or the YAML key
``lorapro_x_mode``), picks the callback; plain ``swift`` refuses it as an unknown argument, so a
configuration written for LoRA-Pro cannot train plain LoRA by mistake.

Refused with :class:`~lorapro.LoRAProConfigError`: ``--tuner_type`` other than ``lora``, DoRA
(``--use_dora``), ms-swift's optimizers that change what the gradients do (``--optimizer galore``
/ ``--use_galore``, ``--optimizer lorap`` / ``--lorap_lr_ratio``, i.e. LoRA+), LISA, and
GaLore/APOLLO/LOMO ``--optim`` names. The command checks its arguments before ms-swift starts;
the callback checks ms-swift's parsed arguments again when the trainer is built, and DoRA when
training begins.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from ._frameworks import X_MODE_KEY, AnnouncingLoRAProCallback, check_optim, check_x_mode, refuse

__all__ = ["CALLBACKS", "PLUGIN_FILE", "SwiftLoRAProCallback", "check_arguments", "main", "register"]

FRAMEWORK = "ms-swift"
#: The file to pass to ``--external_plugins``. It sits alone in its folder because ms-swift puts
#: the plugin's folder first on ``sys.path``: this package's folder would shadow top-level
#: modules named like its files (``deepspeed``, ``swift``).
PLUGIN_FILE = Path(__file__).resolve().with_name("swift_plugin") / "lorapro_swift_plugin.py"
#: Callback name -> x_mode.
CALLBACKS = {"lorapro": "sylvester", "lorapro_zero": "zero", "lorapro_symmetric": "symmetric"}
COMMANDS = ("sft", "pt")
"""ms-swift commands whose trainer is a Transformers ``Trainer`` (``sft`` is tested)."""

_TRUE = ("true", "1", "yes", "y")


def check_arguments(settings: dict[str, Any]) -> None:
    """Raise :class:`~lorapro.LoRAProConfigError` for ms-swift settings that cannot run LoRA-Pro.

    ``settings`` maps argument names to values: ms-swift's parsed ``TrainingArguments``
    (``vars(args)``) or the command line's ``--name value`` pairs (strings).
    """
    tuner = settings.get("tuner_type") or "lora"
    if tuner != "lora":
        raise refuse(
            FRAMEWORK,
            f"--tuner_type {tuner} trains no LoRA pairs LoRA-Pro can adjust",
            "LoRA-Pro adjusts the gradients of LoRA pairs: use --tuner_type lora",
        )
    if str(settings.get("use_dora", False)).lower() in _TRUE:
        raise refuse(
            FRAMEWORK,
            "--use_dora: DoRA adds a magnitude vector, and LoRA-Pro's closed form holds only for W0 + s B A",
            "Remove --use_dora (--use_rslora is supported)",
        )
    optimizer = settings.get("optimizer")
    if optimizer == "galore" or str(settings.get("use_galore", False)).lower() in _TRUE:
        raise refuse(
            FRAMEWORK,
            "GaLore (--optimizer galore / --use_galore) projects the gradients onto a subspace of its own",
            "Remove it",
        )
    if optimizer == "lorap" or settings.get("lorap_lr_ratio") not in (None, "None", "none"):
        raise refuse(
            FRAMEWORK,
            "LoRA+ (--optimizer lorap / --lorap_lr_ratio) steps B with a larger learning rate than A, so the "
            "update is no longer the one LoRA-Pro's gradients define",
            "Remove it",
        )
    if int(settings.get("lisa_activated_layers") or 0) > 0:
        raise refuse(FRAMEWORK, "LISA trains sampled layers in full", "Remove --lisa_activated_layers")
    check_optim(settings.get("optim"), FRAMEWORK)


class SwiftLoRAProCallback(AnnouncingLoRAProCallback):
    """The callback ms-swift builds for ``--callbacks lorapro`` (it calls ``cls(args, trainer)``)."""

    def __init__(self, args: Any = None, trainer: Any = None, x_mode: str = "sylvester") -> None:
        if args is not None:
            check_arguments(vars(args))
        super().__init__(FRAMEWORK, x_mode=x_mode)


def register() -> None:
    """Add lorapro's callbacks to ms-swift's ``callbacks_map`` (what :data:`PLUGIN_FILE` runs)."""
    from swift.callbacks import callbacks_map

    for name, x_mode in CALLBACKS.items():
        callbacks_map[name] = functools.partial(SwiftLoRAProCallback, x_mode=x_mode)


def _flag_values(argv: list[str]) -> dict[str, list[str]]:
    """``--name v1 v2 --other v`` -> {"name": ["v1", "v2"], "other": ["v"]} (last occurrence wins,
    as in ms-swift's parser; ``--name=v`` too)."""
    values: dict[str, list[str]] = {}
    current: list[str] | None = None
    for item in argv:
        if item.startswith("--"):
            name, eq, value = item[2:].partition("=")
            current = values[name] = [value] if eq else []
        elif current is not None:
            current.append(item)
    return values


def _without(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the flags ``names`` and their values."""
    kept: list[str] = []
    skipping = False
    for item in argv:
        if item.startswith("--"):
            skipping = item[2:].partition("=")[0] in names
        if not skipping:
            kept.append(item)
    return kept


def lorapro_argv(argv: list[str]) -> list[str]:
    """ms-swift's arguments (a YAML/JSON config first is expanded) with lorapro's plugin file and
    callback added and its own option taken out; raises for a configuration that cannot run
    LoRA-Pro."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        from swift.cli.main import parse_yaml_args

        parse_yaml_args(argv)  # expanded here, so that its callbacks and plugins are merged below
    flags = _flag_values(argv)
    x_mode = check_x_mode((flags.get(X_MODE_KEY) or ["sylvester"])[0], FRAMEWORK)
    check_arguments({name: (v[0] if len(v) == 1 else v or "true") for name, v in flags.items()})
    callback = next(name for name, mode in CALLBACKS.items() if mode == x_mode)
    plugins = [p for p in flags.get("external_plugins", []) if Path(p).resolve() != PLUGIN_FILE]
    callbacks = [c for c in flags.get("callbacks", []) if c not in CALLBACKS]
    rest = _without(argv, (X_MODE_KEY, "external_plugins", "callbacks"))
    return [*rest, "--external_plugins", *plugins, str(PLUGIN_FILE), "--callbacks", callback, *callbacks]


USAGE = (
    "usage: lorapro-swift sft|pt ARGS  (as swift sft|pt; adds --external_plugins and --callbacks lorapro)\n"
    "       lorapro-swift plugin-file  (prints the file for --external_plugins)"
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plugin-file"]:
        print(PLUGIN_FILE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        from swift.cli.main import cli_main
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"lorapro-swift runs ms-swift, which is not importable here ({exc}): pip install ms-swift",
            name=exc.name,
        ) from exc

    command = [argv[0], *lorapro_argv(argv[1:])]
    sys.argv = ["swift", *command]
    cli_main()  # ms-swift's launcher: one process, or torchrun with NPROC_PER_NODE; exits on failure
    return 0


if __name__ == "__main__":
    sys.exit(main())
