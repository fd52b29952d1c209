"""Offline sweep runner: ``vp-lightning sweep <sweep.yaml> --count N [--sweep-dir DIR] [--dry-run]``.

Runs a standard W&B sweep file without a W&B server. W&B's own search engine (the ``sweeps`` library) proposes
each run's parameters from the results of the runs before it (``sweeps.next_run``), so ``grid``, ``random`` and
``bayes`` behave as under ``wandb agent``; ``early_terminate: hyperband`` is applied while a run trains by
reading its ``metrics.csv`` (``sweeps.stop_runs``). Runs are launched one after another with the sweep's own
``command``, with ``WANDB_MODE=offline``, as ordinary offline W&B runs grouped by the sweep (``wandb sync``
uploads them later).

Where a run writes: the runner resolves the run's config (``--print_config``, in this process) and appends one
``--trainer.logger=[...]`` override that keeps the config's loggers but points the CSV logger at
``<sweep folder>/runs/<run id>/`` and gives the W&B logger the run id, the sweep's group and tags. The run folder
is therefore known before the run starts (no guessing from timestamps) and is unique even when other trainings
write to ``runs/`` at the same time.

The sweep folder (default ``runs/sweeps/<name>-<sweep id>/``) holds ``sweep.json`` (config, every run's
parameters, status, metric, folder, wall time) and ``logs/<run id>.log`` (each run's console output). Running the
same command again with ``--sweep-dir <that folder>`` continues the sweep: finished runs are not repeated and an
interrupted run's parameters are proposed again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import secrets
import shlex
import signal
import string
import subprocess
import sys
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from vp_lightning.errors import UserError
from vp_lightning.tracking.command import build_command, vp_lightning_arguments, write_args_json
from vp_lightning.tracking.runs import (
    USAGE_KEYS,
    format_duration,
    format_number,
    read_metrics_csv,
    summary_metrics,
)

#: Statuses of a run in ``sweep.json``. ``stopped`` = ended early by hyperband (it counts as a result);
#: ``interrupted`` = cut short by the user or a crash of the runner (it does not count and is proposed again).
DONE_STATUSES = ("finished", "failed", "stopped")
MAX_CONSECUTIVE_FAILURES = 3
_ID_ALPHABET = string.ascii_lowercase + string.digits


def sweeps_library():
    """The ``sweeps`` package, imported without its pydantic deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def new_id(length: int = 8) -> str:
    """A random W&B-style id (lowercase letters and digits)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def now_iso() -> str:
    return datetime.now(timezone.utc)  # noqa: UP017 (Python 3.10 has no datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- sweep config


def load_sweep_config(path: str | Path) -> dict[str, Any]:
    """Reads and validates a sweep file with W&B's schema.

    Args:
        path: a W&B sweep YAML file.
    Returns:
        The config dict.
    Raises:
        UserError: for a missing file, invalid YAML, schema violations, or a command the runner cannot read
            results from.
    """
    sweeps = sweeps_library()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(
            f"{path} is not valid YAML ({err}). Write `command` as a block list (one `- item` per line): "
            "`${...}` macros are not allowed inside a [flow, list]."
        ) from err
    if not isinstance(config, dict):
        raise UserError(f"{path} does not hold a sweep config (a mapping with method/parameters)")
    violations = sweeps.schema_violations_from_proposed_config(config)
    if violations:
        raise UserError(f"{path} is not a valid W&B sweep config: " + "; ".join(violations))
    probe = build_command(config.get("command"), {}, program=config.get("program"), json_file="args.json")
    if vp_lightning_arguments(probe) is None:
        raise UserError(
            f"the command of {path} does not run `vp_lightning`; the offline runner reads each run's results from "
            "the folder vp_lightning writes, so the command must be like "
            "[${env}, python, -m, vp_lightning, fit, --config, <file>, ${args}]"
        )
    return config


def sweep_name(config: dict[str, Any], path: str | Path) -> str:
    """The sweep's ``name`` or the file name without extension, usable in a folder name."""
    raw = str(config.get("name") or Path(path).stem)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).strip("-") or "sweep"


def parameter_values(proposal) -> dict[str, Any]:
    """``{key: value}`` from a ``sweeps.SweepRun`` config (``{key: {"value": v}}``), in the proposal's order."""
    return {key: spec["value"] for key, spec in proposal.config.items()}


def varying_keys(config: dict[str, Any]) -> list[str]:
    """Parameters the search varies (fixed ``value:`` parameters left out)."""
    return [key for key, spec in config.get("parameters", {}).items() if not (isinstance(spec, dict) and "value" in spec)]


def short_name(parameters: dict[str, Any], keys: list[str] | None = None) -> str:
    """``eta=0.5,seed_everything=1`` style run name (last key component, config file stems).

    Args:
        parameters: the run's parameter values.
        keys: the keys to show (default: all).
    """
    parts = []
    for key, value in parameters.items():
        if keys is not None and key not in keys:
            continue
        short = key.rsplit(".", 1)[-1]
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            value = Path(value).stem
        elif isinstance(value, float):
            value = format_number(value)
        parts.append(f"{short}={value}")
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------- run config


def resolve_config(cli_args: list[str], subcommand: str = "fit") -> dict[str, Any]:
    """The resolved config of ``vp-lightning <subcommand> <cli_args>`` (its ``--print_config``), computed here.

    Args:
        cli_args: the arguments after the subcommand.
        subcommand: ``fit``, ``validate`` ...
    Returns:
        The config as a dict.
    Raises:
        UserError: with the CLI's message when the arguments are rejected (unknown key, bad value, missing file).
    """
    from vp_lightning.cli import VPLightningCLI

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            VPLightningCLI(args=[subcommand, *cli_args, "--print_config"])
        except SystemExit as exit_:
            code = exit_.code
    if code not in (0, None):
        message = err.getvalue().strip()
        tail = message[message.find("error:"):] if "error:" in message else message[-2000:]
        raise UserError(f"the CLI rejects `{subcommand} {shlex.join(cli_args)}`:\n{tail}")
    return yaml.safe_load(out.getvalue())


def _is_wandb(entry: dict[str, Any]) -> bool:
    return str(entry.get("class_path", "")).endswith("WandbLogger")


def sweep_loggers(
    loggers: Any, run_dir: Path, run_id: str, run_name: str, group: str, tags: list[str], parameters: dict[str, Any]
) -> list[dict[str, Any]]:
    """The resolved ``trainer.logger`` list with this sweep run's folder, id, group and tags.

    Every file logger (CSV, TensorBoard ...) writes to ``run_dir`` (= ``save_dir/name/version``); a CSV logger
    is added when the config has none, because the runner reads ``metrics.csv``. W&B loggers get the run id (so the
    offline folder is ``wandb/offline-run-*-<run id>``), the name, the group and the tags, and the sweep parameters
    as flat keys of the W&B config (as ``wandb agent`` sets them).

    Args:
        loggers: the resolved ``trainer.logger`` (a list of ``class_path``/``init_args`` dicts, or a bool/None).
        run_dir: the folder this run must write to.
        run_id: the run's id.
        run_name: its display name.
        group: the W&B group of the sweep.
        tags: tags added to the W&B run's own.
        parameters: the run's sweep parameters.
    Returns:
        The new logger list.
    """
    entries = [dict(e) for e in loggers] if isinstance(loggers, list) else []
    if not any(str(e.get("class_path", "")).endswith("CSVLogger") for e in entries):
        entries.insert(0, {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {}})
    result = []
    for entry in entries:
        args = dict(entry.get("init_args") or {})
        if _is_wandb(entry):
            args.update(id=run_id, name=run_name, group=group)
            args["tags"] = list(dict.fromkeys([*(args.get("tags") or []), *tags]))
            args["config"] = {**(args.get("config") or {}), **parameters, "sweep_group": group}
        else:
            args.update(save_dir=str(run_dir.parent.parent), name=run_dir.parent.name, version=run_dir.name)
        result.append({"class_path": entry["class_path"], "init_args": args})
    return result


def wandb_save_dirs(loggers: list[dict[str, Any]]) -> list[Path]:
    """Folders under which W&B loggers create ``wandb/``."""
    dirs = []
    for entry in loggers:
        if _is_wandb(entry):
            args = entry.get("init_args") or {}
            dirs.append(Path(args.get("save_dir") or args.get("dir") or os.environ.get("WANDB_DIR", ".")))
    return dirs


def find_wandb_run(save_dirs: list[Path], run_id: str) -> str | None:
    """The W&B run folder (``wandb/offline-run-<time>-<id>`` or ``run-...``) of a run id, or None."""
    for base in save_dirs:
        matches = sorted((base / "wandb").glob(f"*run-*-{run_id}"))
        if matches:
            return str(matches[-1])
    return None


# ---------------------------------------------------------------------------------------------- sweep state


class SweepFolder:
    """``sweep.json`` of one sweep: its config and one record per launched run, saved after every change.

    Args:
        path: the sweep folder.
        record: the content of ``sweep.json``.
    """

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path = path
        self.record = record

    @classmethod
    def create(cls, path: Path, config: dict[str, Any], sweep_file: Path, sweep_id: str, name: str) -> SweepFolder:
        folder = cls(path, {
            "sweep_id": sweep_id, "name": name, "sweep_file": str(sweep_file), "created": now_iso(),
            "config": config, "runs": [],
        })
        folder.save()
        return folder

    @classmethod
    def open(cls, path: Path, config: dict[str, Any]) -> SweepFolder:
        """Opens an existing sweep folder; runs left ``running``/``pending`` by a runner that died become ``interrupted``."""
        record = json.loads((path / "sweep.json").read_text(encoding="utf-8"))
        if _normalized(record.get("config")) != _normalized(config):
            raise UserError(
                f"{path} was created from a different sweep config ({record.get('sweep_file')}); a sweep's search "
                "space cannot change. Restore that file or start a new sweep folder."
            )
        folder = cls(path, record)
        for run in folder.runs:
            if run["status"] in ("running", "pending"):
                run["status"] = "interrupted"
        folder.save()
        return folder

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.record["runs"]

    @property
    def sweep_id(self) -> str:
        return self.record["sweep_id"]

    @property
    def group(self) -> str:
        return self.path.name

    def done(self) -> list[dict[str, Any]]:
        return [run for run in self.runs if run["status"] in DONE_STATUSES]

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / "sweep.json.tmp"
        tmp.write_text(json.dumps(self.record, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, self.path / "sweep.json")  # a reader never sees a half-written file


def _normalized(config: Any) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def to_sweep_run(run: dict[str, Any], metric: str | None, history: list[dict[str, float]] | None = None):
    """A ``sweeps.SweepRun`` for a run record (the search engine's view of it)."""
    sweeps = sweeps_library()
    status = run["status"]
    state = {"finished": "finished", "stopped": "finished", "failed": "failed", "running": "running"}[status]
    if history is None:
        history = run.get("history", [])
    return sweeps.SweepRun(
        name=run["id"],
        state=sweeps.RunState(state),
        config={key: {"value": value} for key, value in run["parameters"].items()},
        summary_metrics=run.get("summary", {}),
        history=[row for row in history if metric is None or metric in row],
        stopped=status == "stopped",
    )


class Lock:
    """A ``.lock`` file holding the runner's pid, so two runners never drive the same sweep folder."""

    def __init__(self, folder: Path):
        self.file = folder / ".lock"

    def __enter__(self) -> Lock:
        if self.file.exists():
            try:
                pid = int(self.file.read_text().strip() or 0)
                os.kill(pid, 0)  # signal 0 only checks that the process exists
                raise UserError(f"another runner (pid {pid}) is driving {self.file.parent}; wait for it to end")
            except (ValueError, ProcessLookupError, PermissionError):
                pass  # stale lock of a runner that is gone
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc) -> None:
        self.file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- launching


class RunProcess:
    """One launched run: the child process (in its own process group), its log file and its metrics.

    The child's output goes to ``log_file`` (and to the screen with ``echo``); a reader thread copies it so the
    child never blocks on a full pipe.
    """

    def __init__(self, command: list[str], env: dict[str, str], log_file: Path, echo: bool):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_file, "w", encoding="utf-8")  # noqa: SIM115 (closed in wait())
        self.log.write(f"$ {shlex.join(command)}\n")
        self.log.flush()
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            bufsize=1, start_new_session=True,  # own group: signals reach the run and its workers, not us
        )
        self.echo = echo
        self.reader = threading.Thread(target=self._copy, daemon=True)
        self.reader.start()

    def _copy(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if self.echo:
                sys.stdout.write("    | " + line)
                sys.stdout.flush()

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float = 60.0) -> int:
        """Ends the run like Ctrl+C (Lightning shuts down cleanly and flushes its logs), then harder if needed."""
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return self.wait()

    def wait(self) -> int:
        code = self.proc.wait()
        self.reader.join(timeout=10)
        self.log.close()
        return code


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Progress:
    """Prints one line per new validation of the running run (the sweep metric and token usage)."""

    def __init__(self, metric: str | None, started: float):
        self.metric = metric
        self.started = started
        self.seen = 0
        self.keys = [k for k in (metric, "val/codebook/cvu", "val/psnr", "val/pesq") if k]

    def update(self, rows: list[dict[str, float]]) -> None:
        validations = [row for row in rows if any(k in row for k in (*USAGE_KEYS, self.metric or "-"))]
        for row in validations[self.seen:]:
            values = "  ".join(f"{k} {format_number(row[k])}" for k in dict.fromkeys(self.keys) if k in row)
            elapsed = format_duration(time.monotonic() - self.started)
            print(f"      step {int(row.get('step', 0)):>6}  {values}  ({elapsed})", flush=True)
        self.seen = max(self.seen, len(validations))


def metric_result(rows: list[dict[str, float]], metric: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{"name", "value" (last logged), "best"}`` of the sweep metric, or None when the sweep has none."""
    if not metric:
        return None
    name = metric["name"]
    values = [row[name] for row in rows if name in row and math.isfinite(row[name])]
    if not values:
        return {"name": name, "value": None, "best": None}
    best = max(values) if metric.get("goal", "minimize") == "maximize" else min(values)
    return {"name": name, "value": values[-1], "best": best}


class SweepRunner:
    """Drives one sweep folder: proposes, launches and records runs until ``count`` results exist.

    Args:
        config: the validated sweep config.
        folder: the sweep folder state.
        wandb_mode: ``WANDB_MODE`` of the launched runs (``offline`` by default).
        echo: show the runs' own console output too.
        poll: seconds between looks at the running run's metrics.
    """

    def __init__(self, config: dict[str, Any], folder: SweepFolder, wandb_mode: str = "offline",
                 echo: bool = False, poll: float = 5.0):
        self.config = config
        self.folder = folder
        self.wandb_mode = wandb_mode
        self.echo = echo
        self.poll = poll
        self.metric = config.get("metric")
        self.metric_name = (self.metric or {}).get("name")

    # -- proposals
    def finished_runs(self) -> list:
        return [to_sweep_run(run, self.metric_name) for run in self.folder.done()]

    def propose(self, pending: list | None = None) -> dict[str, Any] | None:
        """The next run's parameters from the sweep's search method, or None when the search space is exhausted."""
        proposal = sweeps_library().next_run(self.config, self.finished_runs() + list(pending or []))
        return None if proposal is None else parameter_values(proposal)

    # -- one run
    def prepare(self, parameters: dict[str, Any], run_id: str, index: int) -> dict[str, Any]:
        """The run record with its final command (sweep command + parameters + logger override)."""
        run_dir = self.folder.path / "runs" / run_id
        json_file = self.folder.path / "args" / f"{run_id}.json"
        command = build_command(
            self.config.get("command"), parameters, program=self.config.get("program"), json_file=json_file
        )
        _, subcommand, cli_args = vp_lightning_arguments(command)
        resolved = resolve_config(cli_args, subcommand)
        name = f"{index:02d} {short_name(parameters, varying_keys(self.config))}".strip()
        tags = ["sweep", f"sweep-{self.folder.sweep_id}"]
        loggers = sweep_loggers(
            resolved.get("trainer", {}).get("logger"), run_dir, run_id, name, self.folder.group, tags, parameters
        )
        command = command + [f"--trainer.logger={json.dumps(loggers)}"]
        return {
            "id": run_id, "index": index, "name": name, "parameters": parameters, "command": command,
            "status": "pending", "returncode": None, "run_dir": str(run_dir),
            "wandb_save_dirs": [str(d) for d in wandb_save_dirs(loggers)], "wandb_run_dir": None,
            "log": str(self.folder.path / "logs" / f"{run_id}.log"), "args_json": str(json_file),
            "started": None, "ended": None, "wall_time": None, "metric": None, "summary": {}, "history": [],
        }

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # each run starts its own wandb-core: a run killed by the runner must not stay registered in a shared service
        env.pop("WANDB_SERVICE", None)
        env.update(
            WANDB_MODE=self.wandb_mode, WANDB_RUN_GROUP=self.folder.group,
            WANDB_TAGS=f"sweep,sweep-{self.folder.sweep_id}", WANDB_ERROR_REPORTING="false",
            WANDB_DISABLE_GIT="true", PYTHONUNBUFFERED="1",
        )
        return env

    def should_stop(self, run: dict[str, Any], rows: list[dict[str, float]]) -> bool:
        """Hyperband: does the running run fall below the band thresholds set by the earlier runs?"""
        if "early_terminate" not in self.config or not self.metric_name:
            return False
        current = to_sweep_run({**run, "status": "running"}, self.metric_name, history=rows)
        stop = sweeps_library().stop_runs(self.config, self.finished_runs() + [current])
        return any(candidate.name == run["id"] for candidate in stop)

    def execute(self, run: dict[str, Any], total: int) -> dict[str, Any]:
        """Launches a prepared run, follows it and records the result. Ctrl+C stops it and re-raises."""
        run_dir = Path(run["run_dir"])
        if "${args_json_file}" in [str(c) for c in self.config.get("command") or []]:
            write_args_json(run["args_json"], run["parameters"])
        print(f"[{run['index']}/{total}] run {run['id']}  {short_name(run['parameters'], varying_keys(self.config))}",
              flush=True)
        print(f"      folder {run_dir}   log {run['log']}", flush=True)
        started = time.monotonic()
        run.update(status="running", started=now_iso())
        self.folder.save()
        process = RunProcess(run["command"], self.environment(), Path(run["log"]), self.echo)
        progress = Progress(self.metric_name, started)
        stopped = False
        try:
            while process.poll() is None:
                time.sleep(self.poll)
                rows = read_metrics_csv(run_dir / "metrics.csv")
                progress.update(rows)
                if not stopped and self.should_stop(run, rows):
                    print(f"      hyperband: {self.metric_name} is below the band threshold, stopping early", flush=True)
                    stopped = True
                    process.stop()
            code = process.wait()
        except KeyboardInterrupt:
            print("\n      interrupted: stopping the run (Ctrl+C again to force)", flush=True)
            try:
                code = process.stop(grace=30.0)
            except KeyboardInterrupt:
                code = process.stop(grace=0.0)
            self._record(run, code, "interrupted", started)
            raise
        status = "stopped" if stopped else ("finished" if code == 0 else "failed")
        self._record(run, code, status, started)
        progress.update(read_metrics_csv(run_dir / "metrics.csv"))
        metric = run["metric"] or {}
        result = f"{metric.get('name')} {format_number(metric.get('value'))} (best {format_number(metric.get('best'))})"
        print(f"      {status} in {format_duration(run['wall_time'])}" + (f": {result}" if metric else ""), flush=True)
        if status == "failed":
            print(f"      exit code {code}; last lines of {run['log']}:\n" + tail(Path(run["log"])), flush=True)
        return run

    def _record(self, run: dict[str, Any], code: int, status: str, started: float) -> None:
        rows = read_metrics_csv(Path(run["run_dir"]) / "metrics.csv")
        run.update(
            status=status, returncode=code, ended=now_iso(), wall_time=round(time.monotonic() - started, 1),
            summary=summary_metrics(rows), metric=metric_result(rows, self.metric),
            history=[{"step": r.get("step"), self.metric_name: r[self.metric_name]} for r in rows
                     if self.metric_name and self.metric_name in r],
            wandb_run_dir=find_wandb_run([Path(d) for d in run["wandb_save_dirs"]], run["id"]),
        )
        self.folder.save()

    # -- the loop
    def run(self, count: int) -> int:
        """Runs until the folder holds ``count`` results (or the search space ends). Returns an exit code."""
        failures, failed_any = 0, False
        while len(self.folder.done()) < count:
            parameters = self.propose()
            if parameters is None:
                print(f"search space exhausted after {len(self.folder.done())} runs", flush=True)
                break
            run = self.prepare(parameters, new_id(), len(self.folder.runs) + 1)
            self.folder.runs.append(run)
            self.folder.save()
            self.execute(run, count + sum(r["status"] == "interrupted" for r in self.folder.runs))
            failures = failures + 1 if run["status"] == "failed" else 0
            failed_any |= run["status"] == "failed"
            if failures >= MAX_CONSECUTIVE_FAILURES:
                print(f"stopping the sweep: {failures} runs in a row failed (see the logs above)", flush=True)
                return 1
        return 1 if failed_any else 0


def print_table(folder: SweepFolder, metric_name: str | None) -> None:
    """The sweep's runs as a table on screen."""
    runs = folder.runs
    if not runs:
        return
    header = ["#", "id", "parameters", "status", metric_name or "metric", "best", "time"]
    rows = []
    for run in runs:
        metric = run.get("metric") or {}
        keys = varying_keys(folder.record["config"])
        rows.append([str(run["index"]), run["id"], short_name(run["parameters"], keys), run["status"],
                     format_number(metric.get("value")), format_number(metric.get("best")),
                     format_duration(run.get("wall_time"))])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vp-lightning sweep",
        description="Run a W&B sweep file offline: parameters come from W&B's search engine (grid/random/bayes, "
        "hyperband stopping), runs are launched one after another as offline W&B runs grouped by the sweep.",
    )
    parser.add_argument("sweep_file", type=Path, help="a W&B sweep YAML file, e.g. sweeps/quickstart-vpvae-eta.yaml")
    parser.add_argument("--count", type=int, default=None,
                        help="run until the sweep folder holds this many results (finished, failed or stopped "
                        "runs, earlier invocations included); default: the grid size, or 1 for random/bayes")
    parser.add_argument("--sweep-dir", type=Path, default=None,
                        help="sweep folder; an existing one is continued (default: a new runs/sweeps/<name>-<id>)")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"),
                        help="where new sweep folders are created (default: runs, giving runs/sweeps/...)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the next runs' commands (checked by the CLI) without launching anything")
    parser.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default="offline",
                        help="WANDB_MODE of the launched runs (default offline; `wandb sync` uploads them later)")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between progress checks (default 5)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show each run's own console output")
    return parser


def grid_size(config: dict[str, Any]) -> int | None:
    """Number of grid points of a grid sweep (None for other methods or continuous parameters)."""
    if config.get("method") != "grid":
        return None
    size = 1
    for spec in config["parameters"].values():
        if "values" in spec:
            size *= len(spec["values"])
        elif "value" not in spec:
            return None
    return size


def config_value(config: dict[str, Any], dotted_key: str) -> Any:
    """The value at a flat dotted LightningCLI key (``model.init_args.quantizer.init_args.eta``) of a config."""
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted_key)
        node = node[part]
    return node


def sample_parameters(config: dict[str, Any], limit: int = 3, grid_limit: int = 1000) -> list[dict[str, Any]]:
    """Parameter sets to check a sweep with.

    Grid: the fewest grid points (greedily) that together show every value of every parameter once, so each
    config file or value of a grid is tried without running the whole product. Random/bayes: ``limit`` proposals.
    """
    sweeps = sweeps_library()
    proposals: list[dict[str, Any]] = []
    pending: list = []
    for i in range(grid_limit if config.get("method") == "grid" else limit):
        proposal = sweeps.next_run(config, pending)
        if proposal is None:
            break
        proposals.append(parameter_values(proposal))
        pending.append(sweeps.SweepRun(name=f"check-{i}", state=sweeps.RunState.pending, config=proposal.config))
    if config.get("method") != "grid":
        return proposals
    covered: set[tuple[str, str]] = set()
    samples = []
    for parameters in proposals:
        pairs = {(key, repr(value)) for key, value in parameters.items()}
        if pairs - covered:
            samples.append(parameters)
            covered |= pairs
    return samples


def check_sweep(config: dict[str, Any], limit: int = 3) -> list[str]:
    """Problems of a sweep file: each sampled parameter set must pass the CLI and land at its key.

    For every sample, the sweep's command is expanded and resolved with ``--print_config``; each dotted parameter
    must then hold the sampled value in the resolved config, and a ``config`` parameter must bring that file's
    quantizer.

    Args:
        config: a validated sweep config (see :func:`load_sweep_config`).
        limit: how many parameter sets to try for random/bayes (grids: every value once).
    Returns:
        Human-readable problems (empty = fine).
    """
    problems = []
    for parameters in sample_parameters(config, limit):
        command = build_command(config.get("command"), parameters, program=config.get("program"), json_file="a.json")
        _, subcommand, cli_args = vp_lightning_arguments(command)
        try:
            resolved = resolve_config(cli_args, subcommand)
        except UserError as err:
            problems.append(str(err))
            continue
        for key, value in parameters.items():
            if key == "config":
                chosen = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
                # compare class names: the CLI shortens class paths to where a package exports them
                expected = config_value(chosen, "model.init_args.quantizer.class_path").rsplit(".", 1)[-1]
                actual = config_value(resolved, "model.init_args.quantizer.class_path").rsplit(".", 1)[-1]
                if expected != actual:
                    problems.append(f"--config={value} gives quantizer {actual}, expected {expected}")
                continue
            try:
                actual = config_value(resolved, key)
            except KeyError:
                problems.append(f"{key} is not in the resolved config")
                continue
            if actual != value and not (isinstance(value, (int, float)) and math.isclose(float(actual), value)):
                problems.append(f"{key}={value!r} resolved to {actual!r}")
    return problems


def dry_run(runner: SweepRunner, count: int) -> int:
    """Prints the commands of the next runs; proposals are chained as pending runs so a grid advances."""
    sweeps = sweeps_library()
    pending = []
    planned = max(count - len(runner.folder.done()), 0)
    for i in range(planned):
        parameters = runner.propose(pending)
        if parameters is None:
            print("search space exhausted")
            break
        run = runner.prepare(parameters, "<run-id>", len(runner.folder.runs) + i + 1)
        print(f"[{run['index']}] {short_name(parameters, varying_keys(runner.config))}\n    {shlex.join(run['command'])}")
        pending.append(sweeps.SweepRun(
            name=f"pending-{i}", state=sweeps.RunState.pending,
            config={k: {"value": v} for k, v in parameters.items()},
        ))
    if planned == 0:
        print(f"nothing to do: {runner.folder.path} already holds {len(runner.folder.done())} results")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible():
    """Ctrl+C, ``kill -INT`` and ``kill -TERM`` all stop the sweep cleanly (the running run too).

    A shell starts background jobs (``nohup ... &``) with SIGINT ignored, and an ignored signal stays ignored in
    every child; installing a handler here resets the launched runs to the default, so Lightning inside them can
    shut down cleanly when the runner stops them. The previous handlers come back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler), signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def main(argv: list[str] | None = None) -> int:
    """``vp-lightning sweep``: see :func:`build_parser`. Returns the process exit code."""
    args = build_parser().parse_args(argv)
    with interruptible():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        config = load_sweep_config(args.sweep_file)
        count = args.count if args.count is not None else (grid_size(config) or 1)
        if count < 1:
            raise UserError(f"--count must be at least 1, got {count}")
        name = sweep_name(config, args.sweep_file)
        if args.sweep_dir is not None and (args.sweep_dir / "sweep.json").is_file():
            folder = SweepFolder.open(args.sweep_dir, config)
        else:
            sweep_id = new_id()
            path = args.sweep_dir or args.runs_root / "sweeps" / f"{name}-{sweep_id}"
            if args.dry_run:
                folder = SweepFolder(path, {"sweep_id": sweep_id, "name": name, "config": config, "runs": []})
            else:
                folder = SweepFolder.create(path, config, args.sweep_file, sweep_id, name)
        runner = SweepRunner(config, folder, wandb_mode=args.wandb_mode, echo=args.verbose, poll=args.poll)
        if args.dry_run:
            return dry_run(runner, count)
        metric = config.get("metric") or {}
        print(f"sweep {name} ({folder.sweep_id}): method {config['method']}"
              + (f", metric {metric['name']} ({metric.get('goal', 'minimize')})" if metric else "")
              + f", {len(folder.done())}/{count} runs done\n  folder {folder.path}", flush=True)
        with Lock(folder.path):
            try:
                code = runner.run(count)
            except KeyboardInterrupt:
                print(f"\nsweep interrupted. Continue it with:\n  vp-lightning sweep {args.sweep_file} "
                      f"--count {count} --sweep-dir {folder.path}", flush=True)
                print_table(folder, runner.metric_name)
                return 130
        print_table(folder, runner.metric_name)
        print(f"sweep folder: {folder.path}\n  report: vp-lightning report {folder.path} -o {folder.path / 'report.html'}"
              + ("\n  upload: wandb sync --sync-all (in the W&B save_dir), or wandb sync <run folder>"
                 if args.wandb_mode == "offline" else ""), flush=True)
        return code
    except UserError as err:
        print(f"vp-lightning sweep: error: {err}", file=sys.stderr)
        return 2
