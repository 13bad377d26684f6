"""Every launcher checks its ports before it starts anything (issue 28): out of range is a usage error naming the range."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--http-port", "99999", "port 99999 is out of range 1..65535"),
        ("--http-port", "0", "port 0 is out of range 1..65535 (this server cannot report a port picked for it: name one)"),
        ("--grpc-port", "-1", "port -1 is out of range 1..65535"),
        ("--metrics-port", "eighty", "'eighty' is not a port number"),
        ("--grpc-port", "8000", "the three ports must differ: --http-port 8000, --grpc-port 8000, --metrics-port 8002"),
    ],
)
def test_runtime_serve_refuses_a_bad_port_before_starting(tmp_path, flag, value, message):
    done = subprocess.run(
        [sys.executable, "-m", "runtime.serve", str(tmp_path), flag, value], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())  # nothing was written, no server was started
