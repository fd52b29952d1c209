"""Turning a sweep's ``command`` and one run's parameters into an argument list, as ``wandb agent`` does.

The macros follow the W&B sweep configuration reference:

* ``${env}`` → ``/usr/bin/env``; ``${interpreter}`` → the Python running this tool; ``${program}`` → the sweep's
  ``program``;
* ``${args}`` → ``--key=value`` per parameter; ``${args_no_hyphens}`` → ``key=value``; ``${args_no_equals}`` →
  ``--key value``; ``${args_no_boolean_flags}`` → ``--key`` for true booleans, nothing for false ones;
  ``${args_json}`` → one JSON object; ``${args_json_file}`` → the path of a file holding that JSON;
  ``${args_append_hydra}`` / ``${args_override_hydra}`` → ``+key=value`` / ``++key=value``;
* ``${envvar:NAME}`` inside any item → the value of the environment variable NAME.

Values are written with Python's ``str()`` exactly as the agent writes them, so ``[8, 5, 5, 5]`` reaches the
LightningCLI as a YAML list and ``True`` as a boolean, and a sweep behaves the same online and offline.
One deliberate difference: a bare ``python`` in the interpreter position also becomes the running interpreter, so
a sweep launched from a virtualenv's ``vp-lightning`` uses that virtualenv even when it is not activated.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from vp_lightning.errors import UserError

#: What ``wandb agent`` runs when a sweep has no ``command``.
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]

_ENVVAR = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")
_INTERPRETERS = {"python", "python3", "${interpreter}"}


def argument_forms(parameters: dict[str, Any]) -> dict[str, list[str]]:
    """Every list a ``${args...}`` macro expands to for these parameter values.

    Args:
        parameters: ``{key: value}`` of one run (values already sampled).
    Returns:
        ``{"args": [...], "args_no_hyphens": [...], ...}`` keyed by macro name without ``${}``.
    """
    forms: dict[str, list[str]] = {
        "args": [], "args_no_hyphens": [], "args_no_equals": [], "args_no_boolean_flags": [],
        "args_append_hydra": [], "args_override_hydra": [],
    }
    for key, value in parameters.items():
        flag = f"{key}={value}"
        forms["args"].append(f"--{flag}")
        forms["args_no_hyphens"].append(flag)
        forms["args_no_equals"] += [f"--{key}", str(value)]
        forms["args_append_hydra"].append(f"+{flag}")
        forms["args_override_hydra"].append(f"++{flag}")
        if isinstance(value, bool):
            if value:  # a false boolean flag is expressed by leaving it out
                forms["args_no_boolean_flags"].append(f"--{key}")
        else:
            forms["args_no_boolean_flags"].append(f"--{flag}")
    forms["args_json"] = [json.dumps(parameters)]
    return forms


def build_command(
    template: list[Any] | None,
    parameters: dict[str, Any],
    program: str | None = None,
    json_file: str | Path | None = None,
    interpreter: str = sys.executable,
) -> list[str]:
    """One run's argument list from a sweep ``command``.

    Args:
        template: the sweep's ``command`` (``None`` = the agent's default ``${env} ${interpreter} ${program}
            ${args}``).
        parameters: the run's parameter values.
        program: the sweep's ``program`` (needed when the command uses ``${program}``).
        json_file: where ``${args_json_file}`` points; the caller writes the file (see :func:`write_args_json`).
        interpreter: what ``${interpreter}`` (and a bare ``python`` in that position) becomes.
    Returns:
        The argument list, ready for ``subprocess``.
    Raises:
        UserError: for ``${program}`` without a program, ``${args_json_file}`` without a file, unknown macros.
    """
    forms = argument_forms(parameters)
    values: dict[str, list[str]] = {**forms, "env": ["/usr/bin/env"] if os.name != "nt" else []}
    values["interpreter"] = [interpreter]
    if program is not None:
        values["program"] = [str(program)]
    if json_file is not None:
        values["args_json_file"] = [str(json_file)]
    command: list[str] = []
    for item in template or DEFAULT_COMMAND:
        item = _ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), str(item))
        if item.startswith("${") and item.endswith("}"):
            name = item[2:-1]
            if name not in values:
                hint = {"program": "the sweep file has no `program`", "args_json_file": "no JSON file was given"}
                raise UserError(f"cannot expand {item} in the sweep command: {hint.get(name, 'unknown macro')}")
            command += values[name]
        else:
            command.append(item)
    position = 1 if command and command[0].endswith("/env") else 0
    if len(command) > position and command[position] in _INTERPRETERS:
        command[position] = interpreter
    return command


def write_args_json(path: str | Path, parameters: dict[str, Any]) -> Path:
    """Writes the parameters as the JSON object ``${args_json_file}`` points to."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(parameters, indent=2), encoding="utf-8")
    return path


def vp_lightning_arguments(command: list[str]) -> tuple[int, str, list[str]] | None:
    """Where a command runs the project's CLI.

    Args:
        command: an expanded argument list.
    Returns:
        ``(index of the subcommand, subcommand, the CLI arguments after it)`` for ``... -m vp_lightning <sub> ...``
        or ``.../vp-lightning <sub> ...``; None for any other program.
    """
    for i, item in enumerate(command[:-1]):
        module = item == "vp_lightning" and i > 0 and command[i - 1] == "-m"
        script = Path(item).name == "vp-lightning"
        if module or script:
            return i + 1, command[i + 1], command[i + 2:]
    return None
