"""The README's walkthrough block, run as written (ports, paths and the egress
command adapted to this test's gateway), so the README cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support.gateway import start_gateway
from tests.support.procs import free_port

REPO = Path(__file__).resolve().parent.parent


def walkthrough() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- walkthrough:begin -->\s*```sh\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert m, "README has no walkthrough block"
    return m.group(1)


def test_readme_walkthrough(tmp_path):
    gw = start_gateway(tmp_path, REPO / "policies" / "default", name="readme")
    try:
        demo_port = free_port()
        site = tmp_path / "demo-site"
        script = (walkthrough()
                  .replace(".venv/bin/egress", f"{sys.executable} -m gateway.cli")
                  .replace("token mint ", f"token mint --state-dir {gw.state_dir} ")
                  .replace("audit tail ", f"audit tail --state-dir {gw.state_dir} ")
                  .replace("127.0.0.1:8080", f"127.0.0.1:{gw.proxy_port}")
                  .replace("127.0.0.1:8081", f"127.0.0.1:{gw.admin_port}")
                  .replace(":8000", f":{demo_port}").replace("8000 --bind", f"{demo_port} --bind")
                  .replace("/tmp/demo-site", str(site))
                  .replace(".state/admin-token", str(tmp_path / "admin-token"))
                  .replace(".state/", f"{gw.state_dir}/"))
        (tmp_path / "admin-token").write_text("test-admin-token-0123456789\n")
        # wait for the demo server before the first request
        script = script.replace("\n# 1.", f"\nfor i in $(seq 50); do curl -s -o /dev/null "
                                          f"http://127.0.0.1:{demo_port}/ && break; sleep 0.1; done\n# 1.", 1)
        r = subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", script], capture_output=True, text=True,
                           timeout=60, cwd=REPO, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        out = r.stdout
        assert r.returncode == 0, r.stdout + r.stderr
        assert "hello from the demo server" in out
        assert '"rule": "demo/demo-no-admin"' in out
        assert out.count('"code": "ssrf_blocked"') == 2
        assert "169.254.169.254 is metadata" in out
        assert "127.0.0.1 is loopback" in out
        assert '"code": "identity_required"' in out
        assert '"event":"decision"' in out  # tail of the audit file
        assert re.search(r'egress_requests_total\{agent="[^"]+",code="allowed",decision="allow",rule="[^"]+",tenant="demo"\} 1\.0', out)
    finally:
        gw.stop()
