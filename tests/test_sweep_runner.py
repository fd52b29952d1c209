"""Offline sweep runner: command macros, logger overrides, proposals from recorded results, resume, hyperband.

Fast tests launch a stand-in `vp_lightning` package (written into the test's working directory, which `python -m`
finds first) that writes metrics.csv where the runner's logger override tells it to; the slow test runs the real
CLI end to end.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vp_lightning.errors import UserError
from vp_lightning.tracking import sweep_runner
from vp_lightning.tracking.command import argument_forms, build_command, vp_lightning_arguments
from vp_lightning.tracking.sweep_runner import (
    SweepFolder,
    SweepRunner,
    grid_size,
    load_sweep_config,
    short_name,
    sweep_loggers,
    to_sweep_run,
)

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ command macros


def test_argument_forms_match_wandb_agent_formats():
    forms = argument_forms({"a.b": 0.5, "flag": True, "off": False, "levels": [8, 5]})
    assert forms["args"] == ["--a.b=0.5", "--flag=True", "--off=False", "--levels=[8, 5]"]
    assert forms["args_no_hyphens"] == ["a.b=0.5", "flag=True", "off=False", "levels=[8, 5]"]
    assert forms["args_no_equals"] == ["--a.b", "0.5", "--flag", "True", "--off", "False", "--levels", "[8, 5]"]
    assert forms["args_no_boolean_flags"] == ["--a.b=0.5", "--flag", "--levels=[8, 5]"]  # false flag left out
    assert forms["args_override_hydra"][0] == "++a.b=0.5" and forms["args_append_hydra"][0] == "+a.b=0.5"
    assert json.loads(forms["args_json"][0]) == {"a.b": 0.5, "flag": True, "off": False, "levels": [8, 5]}


def test_build_command_expands_macros(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_CONF", "conf/x.yaml")
    template = ["${env}", "${interpreter}", "${program}", "--config", "${envvar:MY_CONF}", "${args_no_hyphens}",
                "${args_json_file}"]
    command = build_command(template, {"eta": 2.0}, program="train.py", json_file=tmp_path / "a.json",
                            interpreter="/venv/bin/python")
    assert command == ["/usr/bin/env", "/venv/bin/python", "train.py", "--config", "conf/x.yaml", "eta=2.0",
                       str(tmp_path / "a.json")]
    # a bare `python` in the interpreter position is the running interpreter; elsewhere it stays
    command = build_command(["${env}", "python", "-m", "vp_lightning", "fit", "python", "${args}"], {"k": 1},
                            interpreter="/venv/bin/python")
    assert command == ["/usr/bin/env", "/venv/bin/python", "-m", "vp_lightning", "fit", "python", "--k=1"]
    assert build_command(None, {"k": 1}, program="p.py", interpreter="py") == ["/usr/bin/env", "py", "p.py", "--k=1"]


def test_build_command_errors_name_the_macro():
    with pytest.raises(UserError, match="no `program`"):
        build_command(["${env}", "python", "${program}"], {})
    with pytest.raises(UserError, match="unknown macro"):
        build_command(["${env}", "python", "${argz}"], {})


def test_vp_lightning_arguments():
    assert vp_lightning_arguments(["/usr/bin/env", "py", "-m", "vp_lightning", "fit", "--a=1"]) == (4, "fit", ["--a=1"])
    assert vp_lightning_arguments(["/venv/bin/vp-lightning", "validate", "--c", "x"]) == (1, "validate", ["--c", "x"])
    assert vp_lightning_arguments(["/usr/bin/env", "py", "train.py", "vp_lightning"]) is None


# ------------------------------------------------------------------------------------------------ loggers


RESOLVED_LOGGERS = [
    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "q", "version": None}},
    {"class_path": "lightning.pytorch.loggers.WandbLogger",
     "init_args": {"save_dir": "runs", "project": "p", "group": "old", "tags": ["quickstart"], "id": None, "config": None}},
]


def test_sweep_loggers_pin_the_run_folder_and_wandb_identity(tmp_path):
    run_dir = tmp_path / "sweep" / "runs" / "abc123"
    loggers = sweep_loggers(RESOLVED_LOGGERS, run_dir, "abc123", "01 eta=1", "sweep-x", ["sweep", "sweep-s1"], {"k": 1})
    csv_args = loggers[0]["init_args"]
    assert Path(csv_args["save_dir"]) / csv_args["name"] / csv_args["version"] == run_dir
    wandb_args = loggers[1]["init_args"]
    assert wandb_args["id"] == "abc123" and wandb_args["group"] == "sweep-x" and wandb_args["name"] == "01 eta=1"
    assert wandb_args["tags"] == ["quickstart", "sweep", "sweep-s1"]
    assert wandb_args["config"] == {"k": 1, "sweep_group": "sweep-x"} and wandb_args["save_dir"] == "runs"
    assert RESOLVED_LOGGERS[1]["init_args"]["group"] == "old"  # the resolved config is not modified


def test_sweep_loggers_add_a_csv_logger_when_missing(tmp_path):
    tensorboard = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "tb"}}
    for loggers in ([tensorboard], True, None):
        result = sweep_loggers(loggers, tmp_path / "s" / "runs" / "r1", "r1", "n", "g", [], {})
        assert result[0]["class_path"].endswith("CSVLogger")
        for entry in result:  # every file logger writes to the run folder
            assert entry["init_args"]["version"] == "r1" and entry["init_args"]["name"] == "runs"


# ------------------------------------------------------------------------------------------------ config files


def write_sweep(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_load_sweep_config_reports_user_mistakes(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sweep_config(tmp_path / "nope.yaml")
    flow = write_sweep(tmp_path, "command: [${env}, python, ${args}]\nmethod: grid\n")
    with pytest.raises(UserError, match="block list"):
        load_sweep_config(flow)
    bad = write_sweep(tmp_path, "method: grd\nparameters: {a: {values: [1]}}\n")
    with pytest.raises(UserError, match="not a valid W&B sweep config"):
        load_sweep_config(bad)
    other = write_sweep(tmp_path, "program: train.py\nmethod: grid\nparameters: {a: {values: [1]}}\n")
    with pytest.raises(UserError, match="does not run `vp_lightning`"):
        load_sweep_config(other)


def test_grid_size_and_short_names():
    config = {"method": "grid", "parameters": {"a": {"values": [1, 2, 3]}, "b": {"values": [0, 1]}, "c": {"value": 5}}}
    assert grid_size(config) == 6
    assert grid_size({**config, "method": "bayes"}) is None
    assert short_name({"model.init_args.quantizer.init_args.eta": 0.5, "config": "conf/q/image-fsq.yaml"}) == \
        "eta=0.5,config=image-fsq"
    assert short_name({"x.eta": 0.1234567, "y": 2}, keys=["x.eta"]) == "eta=0.1235"


# ------------------------------------------------------------------------------------------------ state & proposals


GRID = {
    "method": "grid", "metric": {"name": "val/loss/rec", "goal": "minimize"},
    "command": ["${env}", "python", "-m", "vp_lightning", "fit", "${args}"],
    "parameters": {"fake.loss": {"values": [1.0, 2.0, 3.0]}},
}


def record(run_id, loss, status, index=1):
    history = [{"step": 9.0, "val/loss/rec": loss + 1.0}, {"step": 19.0, "val/loss/rec": loss}]
    return {"id": run_id, "index": index, "name": run_id, "parameters": {"fake.loss": loss}, "status": status,
            "summary": {"val/loss/rec": loss}, "history": history}


def test_resume_reproposes_interrupted_runs_and_skips_finished(tmp_path):
    folder = SweepFolder.create(tmp_path / "sw", GRID, Path("s.yaml"), "abcd1234", "s")
    folder.runs.extend([record("r1", 1.0, "finished"), record("r2", 2.0, "running", 2)])
    folder.save()
    reopened = SweepFolder.open(tmp_path / "sw", GRID)  # the runner that launched r2 died
    assert [r["status"] for r in reopened.runs] == ["finished", "interrupted"]
    runner = SweepRunner(GRID, reopened)
    assert runner.propose() == {"fake.loss": 2.0}  # the interrupted point again, not the finished one
    with pytest.raises(UserError, match="different sweep config"):
        SweepFolder.open(tmp_path / "sw", {**GRID, "method": "random"})


def test_bayes_proposals_use_recorded_metrics(tmp_path):
    config = {**GRID, "method": "bayes", "parameters": {"fake.loss": {"min": 0.0, "max": 4.0}}}
    folder = SweepFolder.create(tmp_path / "sw", config, Path("s.yaml"), "abcd1234", "s")
    folder.runs.extend([record(f"r{i}", loss, "finished", i) for i, loss in enumerate([0.5, 3.5, 2.0, 1.0])])
    runs = SweepRunner(config, folder).finished_runs()
    assert [r.summary_metrics["val/loss/rec"] for r in runs] == [0.5, 3.5, 2.0, 1.0]
    assert runs[0].metric_extremum("val/loss/rec", "minimum") == 0.5
    proposal = SweepRunner(config, folder).propose()
    assert 0.0 <= proposal["fake.loss"] <= 4.0


def test_hyperband_stops_a_run_below_the_band_threshold(tmp_path):
    config = {**GRID, "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2}}
    folder = SweepFolder.create(tmp_path / "sw", config, Path("s.yaml"), "abcd1234", "s")
    folder.runs.extend([record("r1", 1.0, "finished"), record("r2", 1.1, "finished", 2)])
    runner = SweepRunner(config, folder)
    current = {"id": "r3", "parameters": {"fake.loss": 3.0}, "status": "running"}
    assert runner.should_stop(current, [{"step": 9.0, "val/loss/rec": 9.0}])
    assert not runner.should_stop(current, [{"step": 9.0, "val/loss/rec": 0.5}])
    assert not SweepRunner(GRID, folder).should_stop(current, [{"step": 9.0, "val/loss/rec": 9.0}])  # no hyperband


def test_stopped_runs_count_as_results_for_the_search():
    run = to_sweep_run(record("r1", 1.0, "stopped"), "val/loss/rec")
    assert run.state == "finished" and run.stopped and run.config == {"fake.loss": {"value": 1.0}}


# ------------------------------------------------------------------------------------------------ launching


FAKE_MAIN = '''
import json, os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--") and "=" in a)
loggers = json.loads(args["trainer.logger"])
csv = next(l["init_args"] for l in loggers if l["class_path"].endswith("CSVLogger"))
run_dir = os.path.join(csv["save_dir"], csv["name"], csv["version"])
os.makedirs(run_dir, exist_ok=True)
json.dump({k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_RUN_GROUP", "WANDB_TAGS")},
          open(os.path.join(run_dir, "env.json"), "w"))
open(os.path.join(run_dir, "config.yaml"), "w").write("model: {init_args: {quantizer: {class_path: x.FSQ, init_args: {levels: [2, 3]}}}}\\n")
loss = float(args["fake.loss"])
print("fake training with loss", loss, flush=True)
with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
    f.write("epoch,step,train/loss,val/loss/rec,val/codebook/cvu\\n")
    try:
        for i in range(int(args.get("fake.rows", 3))):
            f.write(f"0,{10 * i + 4},0.1,,\\n0,{10 * i + 9},,{loss + 1.0 / (i + 1)},0.5\\n")
            f.flush()
            time.sleep(float(args.get("fake.sleep", 0)))
    except KeyboardInterrupt:
        print("stopped by SIGINT", flush=True)
        sys.exit(1)
sys.exit(int(args.get("fake.exit", 0)))
'''


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    """A working directory whose `python -m vp_lightning` is the stand-in above; the config resolution is faked."""
    package = tmp_path / "vp_lightning"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_MAIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep_runner, "resolve_config", lambda args, sub="fit": {"trainer": {"logger": RESOLVED_LOGGERS}})
    return tmp_path


def sweep_file(tmp_path, parameters, extra=""):
    lines = ["method: grid", "metric: {name: val/loss/rec, goal: minimize}", "command:", "  - ${env}", "  - python",
             "  - -m", "  - vp_lightning", "  - fit", "  - ${args}", "parameters:"]
    lines += [f"  {key}: {json.dumps(spec)}" for key, spec in parameters.items()]
    return write_sweep(tmp_path, "\n".join(lines) + "\n" + textwrap.dedent(extra))


def test_runner_launches_records_and_resumes(fake_cli, capsys):
    path = sweep_file(fake_cli, {"fake.loss": {"values": [2.0, 1.0, 3.0]}})
    folder = fake_cli / "runs" / "sweeps" / "mine"
    assert sweep_runner.main([str(path), "--count", "2", "--sweep-dir", str(folder), "--poll", "0.05"]) == 0
    record = json.loads((folder / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["finished", "finished"]
    first = record["runs"][0]
    assert first["parameters"] == {"fake.loss": 2.0} and first["returncode"] == 0
    assert first["metric"] == {"name": "val/loss/rec", "value": pytest.approx(2.0 + 1 / 3), "best": pytest.approx(2 + 1 / 3)}
    assert first["history"][0] == {"step": 9.0, "val/loss/rec": 3.0} and first["wall_time"] > 0
    run_dir = Path(first["run_dir"])
    assert run_dir == folder / "runs" / first["id"] and (run_dir / "metrics.csv").is_file()
    assert json.loads((run_dir / "env.json").read_text()) == {
        "WANDB_MODE": "offline", "WANDB_RUN_GROUP": "mine", "WANDB_TAGS": f"sweep,sweep-{record['sweep_id']}"}
    assert "fake training with loss 2.0" in Path(first["log"]).read_text()
    out = capsys.readouterr().out
    assert "[1/2] run" in out and "val/loss/rec 3" in out and "finished in" in out  # progress on screen
    # the same command again: nothing to do; a larger count continues with the last grid point only
    assert sweep_runner.main([str(path), "--count", "2", "--sweep-dir", str(folder), "--poll", "0.05"]) == 0
    assert len(json.loads((folder / "sweep.json").read_text())["runs"]) == 2
    assert sweep_runner.main([str(path), "--count", "5", "--sweep-dir", str(folder), "--poll", "0.05"]) == 0
    record = json.loads((folder / "sweep.json").read_text())
    assert [r["parameters"]["fake.loss"] for r in record["runs"]] == [2.0, 1.0, 3.0]
    assert "search space exhausted" in capsys.readouterr().out
    assert not (folder / ".lock").exists()


def test_failed_runs_are_recorded_with_their_log(fake_cli, capsys):
    path = sweep_file(fake_cli, {"fake.loss": {"values": [1.0]}, "fake.exit": {"value": 3}})
    folder = fake_cli / "sw"
    assert sweep_runner.main([str(path), "--sweep-dir", str(folder), "--poll", "0.05"]) == 1
    run = json.loads((folder / "sweep.json").read_text())["runs"][0]
    assert run["status"] == "failed" and run["returncode"] == 3
    assert "fake training with loss 1.0" in capsys.readouterr().out  # the log tail is shown


def test_hyperband_ends_a_hopeless_run_early(fake_cli):
    path = sweep_file(
        fake_cli,
        {"fake.loss": {"values": [1.0, 1.1, 9.0]}, "fake.rows": {"value": 40}, "fake.sleep": {"value": 0.05}},
        "early_terminate: {type: hyperband, min_iter: 1, eta: 2}\n",
    )
    folder = fake_cli / "sw"
    assert sweep_runner.main([str(path), "--count", "3", "--sweep-dir", str(folder), "--poll", "0.1"]) == 0
    runs = json.loads((folder / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["finished", "finished", "stopped"]
    assert len(runs[0]["history"]) == 40 and len(runs[2]["history"]) < 40
    assert "stopped by SIGINT" in Path(runs[2]["log"]).read_text()  # a clean Ctrl+C-style stop


def test_dry_run_lists_commands_without_launching(fake_cli, capsys):
    path = sweep_file(fake_cli, {"fake.loss": {"values": [1.0, 2.0]}})
    assert sweep_runner.main([str(path), "--dry-run", "--runs-root", str(fake_cli / "r")]) == 0
    out = capsys.readouterr().out
    assert "--fake.loss=1.0" in out and "--fake.loss=2.0" in out and "--trainer.logger=" in out
    assert not (fake_cli / "r").exists()


def test_a_second_runner_on_the_same_folder_is_refused(fake_cli, capsys):
    path = sweep_file(fake_cli, {"fake.loss": {"values": [1.0]}})
    folder = fake_cli / "sw"
    folder.mkdir()
    (folder / ".lock").write_text(str(os.getpid()))  # this test process is alive
    assert sweep_runner.main([str(path), "--sweep-dir", str(folder)]) == 2
    assert "another runner" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_real_sweep_and_report(tmp_path):
    """Two tiny FSQ runs through the real CLI, offline W&B runs grouped by the sweep, then the HTML report."""
    sweep = {
        "name": "tiny-fsq", "method": "grid", "metric": {"name": "val/loss/rec", "goal": "minimize"},
        "command": ["${env}", "python", "-m", "vp_lightning", "fit", "--config",
                    str(ROOT / "conf/quickstart/image-fsq.yaml"), "${args}"],
        "parameters": {
            "model.init_args.quantizer.init_args.symmetric": {"value": True},
            "model.init_args.quantizer.init_args.noise_rate": {"values": [0.0, 0.5]},
            "trainer.max_steps": {"value": 2}, "trainer.val_check_interval": {"value": 1},
            "data.init_args.resolution": {"value": 16}, "data.init_args.num_workers": {"value": 0},
            "trainer.enable_progress_bar": {"value": False},
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "vp_lightning", "sweep", "tiny.yaml", "--count", "2", "--sweep-dir",
                           "runs/sweeps/tiny"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "runs/sweeps/tiny/sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["finished", "finished"]
    for run in record["runs"]:
        config = yaml.safe_load((tmp_path / run["run_dir"] / "config.yaml").read_text())
        assert config["model"]["init_args"]["quantizer"]["init_args"]["noise_rate"] == run["parameters"][
            "model.init_args.quantizer.init_args.noise_rate"]
        assert run["metric"]["value"] > 0 and "val/codebook/cvu" in run["summary"]
        assert run["wandb_run_dir"] and run["wandb_run_dir"].endswith(run["id"])  # offline W&B run of this id
        assert "offline-run" in run["wandb_run_dir"]
    report = subprocess.run([sys.executable, "-m", "vp_lightning", "report", "runs/sweeps/tiny", "-o", "r.html"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") >= 3 and "noise_rate 0.5" in page
