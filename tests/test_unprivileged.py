"""The exporter as a normal user with no capability: every socket is still judged,
others' sockets have process "unknown", and that is counted, never fatal."""

import os
import subprocess

from support import EXPORTER, Metrics, free_port, require_binary, require_root, wait_for


def test_exporter_as_nobody(shared_dir, listen):
    require_root()
    require_binary("setpriv")
    root_owned = listen("0.0.0.0").getsockname()[1]  # held by this root test process
    loop_only = listen("127.0.0.1").getsockname()[1]
    port = free_port()
    config = shared_dir / "bindscope.yml"
    config.write_text(f"""\
scan_interval: 500ms
probe: {{addresses: [127.0.0.1]}}
services:
  - {{name: app, port: {root_owned}, expose: private, process: '^pytest$'}}
  - {{name: local, port: {loop_only}, expose: private}}
""")
    config.chmod(0o644)
    log = open(shared_dir / "log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            *EXPORTER,
            f"--web.listen-address=127.0.0.1:{port}",
            f"--config.file={config}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=shared_dir,
    )
    try:
        import urllib.request

        def scrape():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    m = Metrics(r.read().decode())
                    return m if m.get("bindscope_scan_success") == 1 else None
            except OSError:
                assert proc.poll() is None, (shared_dir / "log").read_text()
                return None

        m = wait_for(scrape, 20, interval=0.2, what="scrape of the unprivileged exporter")
        assert m.status("app") == "process_unknown"  # not a false wrong_process
        assert m.status("local") == "loopback_only"
        own = m.all("bindscope_listener_info", port=str(port))
        with open(f"/proc/{proc.pid}/comm") as f:  # setpriv exec'd the exporter: same pid
            assert [s.labels["process"] for s in own] == [f.read().strip()]  # its own: readable
        held = m.all("bindscope_listener_info", port=str(root_owned))
        assert [s.labels["process"] for s in held] == ["unknown"]
        assert m.get("bindscope_scan_errors_total", source="process_attribution") >= 1
        assert m.get("bindscope_scan_success") == 1
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        assert status["CapEff"].strip() == "0000000000000000"
        assert status["Uid"].split()[0] == str(
            int(subprocess.check_output(["id", "-u", "nobody"], text=True))
        )
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0
    assert os.path.getsize(shared_dir / "log") > 0
