"""The client library stands on its own: importing it loads nothing of the server or the
admin API (a fresh interpreter, so modules other tests imported do not count)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
import trisocks.client
print(json.dumps(sorted(
    name for name in sys.modules
    if name.startswith(("trisocks.server", "trisocks.admin"))
)))
"""


def test_importing_the_client_loads_no_server_or_admin_module() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"import trisocks.client loaded {loaded}"
