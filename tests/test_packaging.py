"""The built wheel carries the configs, and an installed copy finds them from any folder."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    wheels = list(out.glob("dml_cli-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_contains_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())

    configs = sorted(path.relative_to(REPO / "conf") for path in (REPO / "conf").rglob("*.yaml"))
    assert configs
    for config in configs:
        assert f"dml_cli/conf/{config.as_posix()}" in names


def test_installed_wheel_finds_configs(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}

    result = subprocess.run(
        [sys.executable, "-c", "from dml_cli.config import config_dir; print(config_dir())"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    cfg_job = subprocess.run(
        [sys.executable, "-m", "dml_cli.train", "--cfg", "job", "cohort=two_lenets"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == target / "dml_cli" / "conf"
    assert cfg_job.returncode == 0, cfg_job.stderr
    assert "two_lenets" in cfg_job.stdout
