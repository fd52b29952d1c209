"""Local HTML report: reading run folders, the table of final numbers, self-containment, and a headless-Chromium
rendering that must not be blank."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from vp_lightning.errors import UserError
from vp_lightning.tracking import plots, report
from vp_lightning.tracking.runs import (
    find_runs,
    format_duration,
    format_number,
    load_run,
    metric_series,
    quantizer_info,
    read_metrics_csv,
    summary_metrics,
)

VQ = {"class_path": "vp_lightning.quantizers.VectorQuantizer", "init_args": {"dim": 4, "codebook_size": 16}}
FSQ = {"class_path": "vp_lightning.quantizers.FSQ", "init_args": {"levels": [4, 4], "noise_rate": 0.0}}
FSP = {"class_path": "vp_lightning.quantizers.FSP", "init_args": {"levels": [4, 4], "eta": 1.0, "quantize_rate": 0.5}}


def vp(eta):
    return {"class_path": "vp_lightning.quantizers.vp.VectorPerturbation",
            "init_args": {"dim": 4, "codebook_size": 16, "eta": eta}}


def make_run(folder, quantizer, cvu, psnr, counts=None, audio=False):
    """A run folder as `vp-lightning fit` writes it: config.yaml, metrics.csv (Lightning's sparse rows), counts."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"quantizer": quantizer}}}))
    quality = ("val/pesq", "val/stoi") if audio else ("val/psnr", "val/ssim")
    header = ["epoch", "step", "train/loss/rec", "val/loss/rec", "val/codebook/cvu", "val/codebook/perplexity",
              "val/codebook/utilization", "val/codebook/dead_codes", *quality]
    lines = [",".join(header)]
    for i, step in enumerate((9, 19)):
        scale = (i + 1) / 2
        lines.append(f"0,{step - 5},0.5,,,,,,,")
        lines.append(f"0,{step},,{0.3 / scale},{cvu * scale},{16 * cvu * scale},{0.5 + 0.25 * i},{8 - 4 * i},"
                     f"{psnr * scale},{0.5 * scale}")
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    if counts is not None:
        (folder / "token_usage").mkdir()
        torch.save(torch.tensor(counts), folder / "token_usage" / "val_step0000009.counts.pt")
        torch.save(torch.tensor(counts) * 2, folder / "token_usage" / "val_step0000019.counts.pt")
    return folder


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "vq" / "version_0", VQ, cvu=0.2, psnr=20.0, counts=[40] + [0] * 15)
    make_run(root / "fsq" / "version_0", FSQ, cvu=0.6, psnr=21.0, counts=[5] * 10 + [0] * 6)
    make_run(root / "fsp" / "version_0", FSP, cvu=0.8, psnr=23.0, counts=[3] * 16)
    make_run(root / "vp" / "version_0", vp(0.5), cvu=0.7, psnr=22.0, counts=[2] * 14 + [1, 1])
    make_run(root / "vp" / "version_1", vp(2.0), cvu=0.9, psnr=21.5, counts=[2] * 16)
    (root / "wandb" / "offline-run-x" / "files").mkdir(parents=True)  # ignored when searching
    return root


# ------------------------------------------------------------------------------------------------ parsing


def test_read_metrics_csv_keeps_logged_cells_and_skips_a_partial_row(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,a,b\n0,4,0.5,\n0,9,,1e-3\n0,14,0.25,nan\n0,19,0.")
    rows = read_metrics_csv(path)
    assert rows[:2] == [{"epoch": 0.0, "step": 4.0, "a": 0.5}, {"epoch": 0.0, "step": 9.0, "b": 0.001}]
    assert len(rows) == 3  # "0,19,0." has no newline yet: a row being written
    assert metric_series(rows, "a") == ([4.0, 14.0], [0.5, 0.25])
    assert summary_metrics(rows)["a"] == 0.25 and summary_metrics(rows)["step"] == 14.0
    assert read_metrics_csv(tmp_path / "missing.csv") == []


def test_quantizer_info_reads_k_eta_and_settings():
    info = quantizer_info({"model": {"init_args": {"quantizer": VQ}}})
    assert (info.name, info.codebook_size, info.eta, info.extra()) == ("VQ-VAE", 16, None, "")
    fsq = {"class_path": "vp_lightning.quantizers.FSQ", "init_args": {"levels": [8, 5, 5, 5], "symmetric": True,
                                                                       "noise_rate": 0.5}}
    info = quantizer_info({"model": {"init_args": {"quantizer": fsq}}})
    assert (info.name, info.codebook_size, info.extra()) == ("FSQ", 1000, "noise_rate 0.5")
    info = quantizer_info({"model": {"init_args": {"quantizer": FSP}}})
    assert (info.name, info.codebook_size, info.eta, info.extra()) == ("FSP", 16, 1.0, "quantize_rate 0.5")
    info = quantizer_info({"model": {"init_args": {"quantizer": vp(2)}}})
    assert (info.name, info.codebook_size, info.eta) == ("VP-VAE", 16, 2.0)
    assert quantizer_info({"model": {"init_args": {}}}).name == "?"


def test_number_formats():
    assert [format_number(v) for v in (None, 3.0, 1024, 0.123456, 23.81234, True)] == \
        ["–", "3", "1024", "0.1235", "23.81", "true"]
    assert [format_duration(s) for s in (None, 42.4, 185, 7620)] == ["–", "42s", "3m05s", "2h07m"]


def test_load_run_final_values_and_counts(runs_root):
    run = load_run(runs_root / "vp" / "version_1")
    assert run.label == "vp/version_1" and run.last_step == 19 and run.modality == "image"
    assert run.final("val/codebook/cvu") == pytest.approx(0.9)
    assert run.series("val/codebook/dead_codes") == ([9.0, 19.0], [8.0, 4.0])
    step, counts = run.token_counts()
    assert step == 19 and counts.tolist() == [4.0] * 16  # the last validation's file
    with pytest.raises(UserError, match="not a run folder"):
        load_run(runs_root / "wandb")


def test_find_runs_in_parents_and_sweep_folders(runs_root, tmp_path):
    runs = find_runs([runs_root])
    assert sorted(r.label for r in runs) == ["fsp/version_0", "fsq/version_0", "vp/version_0", "vp/version_1",
                                              "vq/version_0"]
    assert len(find_runs([runs_root, runs_root / "vq" / "version_0"])) == 5  # no duplicates
    sweep = tmp_path / "sweep"
    make_run(sweep / "runs" / "abc", vp(1.0), cvu=0.5, psnr=20.0)
    (sweep / "sweep.json").write_text(json.dumps({"runs": [
        {"id": "abc", "name": "01 eta=1", "run_dir": "somewhere/else", "parameters": {"eta": 1.0},
         "status": "finished", "wall_time": 61.0},
        {"id": "died", "name": "02 eta=2", "run_dir": "gone", "status": "failed"},
    ]}))
    (run,) = find_runs([sweep])
    assert (run.label, run.status, run.wall_time, run.parameters) == ("01 eta=1", "finished", 61.0, {"eta": 1.0})
    with pytest.raises(UserError, match="does not exist"):
        find_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no runs found"):
        find_runs([tmp_path / "empty"])


def test_colors_group_quantizers_and_shade_eta(runs_root):
    runs = find_runs([runs_root])
    colors = plots.run_colors(runs)
    small, large = colors["vp/version_0"], colors["vp/version_1"]
    assert sum(large[:3]) < sum(small[:3])  # larger eta = darker shade of the same hue
    assert np.argmax(large[:3]) == 2 and np.argmax(colors["vq/version_0"][:3]) == 0  # VP blue, VQ red
    titles = [a[0] for a in plots.parallel_axes(runs)]
    assert titles == ["η", "rec. loss", "PSNR", "SSIM", "CVU"]  # one quantize_rate, noise_rate 0: no axes
    fsp2 = find_runs([make_run(runs_root.parent / "fsp2", {**FSP, "init_args": {**FSP["init_args"], "quantize_rate": 0.3}},
                               cvu=0.5, psnr=20.0)])
    assert [a[0] for a in plots.parallel_axes(runs + fsp2)][:2] == ["η", "quantize rate"]


# ------------------------------------------------------------------------------------------------ HTML


def table_row(page, label):
    return re.search(r"<tr><td class=\"text\"><span[^>]*></span>" + re.escape(label) + r"</td>(.*?)</tr>", page).group(1)


def test_report_table_and_panels(runs_root):
    page = report.render_report(find_runs([runs_root]), title="My runs", sources=[str(runs_root)])
    assert "<title>My runs</title>" in page and page.count("<svg") == 4  # usage, bars, frequencies, parallel
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert headers == ["run", "quantizer", "K", "η", "settings", "steps", "CVU", "perplexity", "utilization",
                       "dead codes", "rec. loss", "PSNR", "SSIM"]
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", table_row(page, "vp/version_1"))
    assert cells == ["VP-VAE", "16", "2", "–", "19", "0.9", "14.4", "0.75", "4", "0.3", "21.5", "0.5"]
    fsp = table_row(page, "fsp/version_0")
    assert "quantize_rate 0.5" in fsp and '<td class="best">23</td>' in fsp  # best PSNR highlighted
    assert '<td class="best">0.9</td>' in table_row(page, "vp/version_1")  # best CVU
    vq = re.findall(r"<td([^>]*)>([^<]*)</td>", table_row(page, "vq/version_0"))
    assert vq[5] == ("", "0.2") and vq[10] == ("", "20")  # worst CVU and PSNR: not highlighted
    # rows grouped in the paper's order: baselines first, then FSP, then VP by eta
    order = [m for m in re.findall(r"</span>([^<]+)</td>", page)]
    assert order == ["vq/version_0", "fsq/version_0", "fsp/version_0", "vp/version_0", "vp/version_1"]


def test_report_audio_columns(tmp_path):
    make_run(tmp_path / "a" / "version_0", vp(1.0), cvu=0.4, psnr=2.1, audio=True)
    page = report.render_report(find_runs([tmp_path]))
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert "PESQ" in headers and "STOI" in headers and "PSNR" not in headers
    assert page.count("<svg") == 3  # no token counts saved: no frequency panel


def test_report_is_self_contained(runs_root):
    page = report.render_report(find_runs([runs_root]))
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert not re.search(r"url\(\s*['\"]?https?:", page)
    ids = re.findall(r"\sid=\"([^\"]+)\"", page)
    assert len(ids) == len(set(ids))  # inline SVGs must not share element ids
    for ref in re.findall(r"href=\"#([^\"]+)\"", page):
        assert ref in ids


def test_report_command(runs_root, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    assert report.main([str(runs_root / "vq"), str(runs_root / "vp"), "-o", str(out)]) == 0
    assert "3 runs" in capsys.readouterr().out and out.read_text().startswith("<!DOCTYPE html>")
    assert report.main([str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(runs_root, tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(report.render_report(find_runs([runs_root])))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--screenshot={shot}",
         "--window-size=1400,1000", page.as_uri()],
        capture_output=True, timeout=120, check=False,
    )
    assert shot.is_file(), "Chromium wrote no screenshot"
    image = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert image.shape == (1000, 1400)
    assert image.std() > 20  # not a blank page
    header, body = image[:60], image[150:700, 100:1300]
    assert header.mean() < 80  # the dark title bar
    assert body.std() > 10 and (body < 128).mean() > 0.005  # plotted lines and text in the first panel
