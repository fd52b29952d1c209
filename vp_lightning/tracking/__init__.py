"""Experiment tracking tools: offline sweeps, local HTML reports and W&B dashboards.

* ``vp-lightning sweep sweeps/<file>.yaml --count N`` runs a W&B sweep file without a W&B server
  (:mod:`vp_lightning.tracking.sweep_runner`);
* ``vp-lightning report <run or sweep folders> -o report.html`` writes one self-contained HTML dashboard
  (:mod:`vp_lightning.tracking.report`);
* ``vp-lightning dashboard --entity E --project P [--push]`` builds the same panels as a W&B workspace and report
  (:mod:`vp_lightning.tracking.dashboard`).

All three read finished runs through :mod:`vp_lightning.tracking.runs`. Nothing here is imported by training code.
"""
