"""The deployment files: the systemd unit runs the CLI that exists, and the
example config is valid."""
from __future__ import annotations

import configparser
import pathlib
import shlex

from lbcore.cli import build_parser
from lbcore.config import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_systemd_unit_runs_check_config_then_run_and_reloads_with_hup():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(ROOT / "systemd" / "lbcore.service")
    svc = unit["Service"]
    env = dict(kv.split("=", 1) for kv in shlex.split(svc["Environment"]))
    pre = shlex.split(svc["ExecStartPre"].replace("${LBCORE_CONFIG}", env["LBCORE_CONFIG"]))
    run = shlex.split(svc["ExecStart"].replace("${LBCORE_CONFIG}", env["LBCORE_CONFIG"]))
    parser = build_parser()
    assert parser.parse_args(pre[1:]).cmd == "check-config"
    args = parser.parse_args(run[1:])
    assert (args.cmd, args.config) == ("run", "/etc/lbcore/lbcore.toml")
    assert "-HUP" in svc["ExecReload"] and svc["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_example_config_is_valid():
    cfg = load_config(ROOT / "examples" / "lbcore.toml")
    assert cfg.vips and cfg.backend_count > 0
