"""The README's command-line walkthrough runs as written.

The test takes the first ```sh block of the README's "Command line" section
and runs it with `bash -e` (so any failing line fails it), in a temporary
directory (`TMPDIR`, which the walkthrough's `mktemp -d` honours). Only its
fixed port numbers are swapped for ports free now, so that the test cannot
collide with whatever else runs on the machine. The walkthrough starts sites
and a web server in the background and stops them itself; whatever is left
is killed with the process group the test gave it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import free_port

pytestmark = pytest.mark.system

README = Path(__file__).parents[2] / "README.md"
WALKTHROUGH_PORTS = ("7443", "8080", "8081")  # hub link port, web server, listener at a
DEADLINE = 120  # seconds for the whole walkthrough; it takes ~5 s


def walkthrough() -> str:
    text = README.read_text()
    section = re.search(r"^## Command line\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert section, "README has no '## Command line' section"
    block = re.search(r"^```sh\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    assert block, "the Command line section has no ```sh block"
    return block.group(1)


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path):
    script = walkthrough()
    for port in WALKTHROUGH_PORTS:
        assert re.search(rf"\b{port}\b", script), f"the walkthrough no longer uses port {port}: update this test"
        script = re.sub(rf"\b{port}\b", str(free_port()), script)
    bindir = str(Path(sys.executable).parent)  # where `fabric` is installed, and this python as python3
    env = {k: v for k, v in os.environ.items() if k != "FABRIC_SITE_DIR"}
    env.update(TMPDIR=str(tmp_path), PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}")
    process = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        # Kill the whole group first: background sites hold the output pipes open.
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"the walkthrough did not finish within {DEADLINE} s\nstdout: {out}\nstderr: {err}") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of a walkthrough that failed half way
        except ProcessLookupError:
            pass
    assert process.returncode == 0, f"the walkthrough failed ({process.returncode})\nstdout: {out}\nstderr: {err}"
    assert err == "", err
    assert "hello from b" in out.splitlines()  # curl through a reached the web server next to b
    assert "waiting for link hub to come up..." in out and "routing key web is reachable at b" in out
    for name in ("a", "hub", "b"):
        assert re.search(rf"^{name} +[0-9a-f]{{8}} +interior +yes", out, re.MULTILINE), out  # in a's network status
    dumps = list(tmp_path.glob("*/a-debug.tar.gz"))
    assert len(dumps) == 1
