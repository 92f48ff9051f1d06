"""The TPU launch scripts: valid bash and clean under shellcheck."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "tpu").glob("*.sh"))


def test_scripts_exist_and_parse():
    assert {p.name for p in SCRIPTS} == {"setup.sh", "launch.sh"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    run = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def test_launch_usage_error_exits_2():
    run = subprocess.run(["bash", str(SCRIPTS[0].parent / "launch.sh"), "only-a-name"], capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr
