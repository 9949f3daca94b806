"""`alexnet-mp demo` end to end, as a newcomer runs it, at a small width and a few steps: its
console shows the demo and nothing of Ray's, and Ray's messages are in the server's log it names."""

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_end_to_end_and_ray_speaks_only_in_the_servers_log(tmp_path):
    # As a user runs it: Ray's token on, and its warning about it. HOME is the test's, where Ray
    # writes its token file (~/.ray/auth_token), and so are the data and the log.
    env = {**os.environ, "HOME": str(tmp_path), "ALEXNET_MP_DATA": str(tmp_path / "patterns"), "COLUMNS": "300"}
    env.pop("RAY_AUTH_MODE", None)
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "client.cli",
            "demo",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--width",
            "0.125",
            "--set",
            "width=0.125",
            "--set",
            "epochs=1",
            "--set",
            "steps_per_epoch=3",
            "--set",
            "val_images=20",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    said = demo.stdout + demo.stderr
    assert demo.returncode == 0, said[-3000:]
    assert re.search(r"held-out accuracy through gRPC: [\d.]+% top-1 on 600 images", said)
    for ray_words in ("(raylet)", "worker.py", "WARNING", "Token authentication", "Started a local Ray"):
        assert ray_words not in said, f"Ray's {ray_words!r} reached the demo's console"
    log = tmp_path / "demo-server.log"
    assert f"the server's log: {log}" in said
    assert "Started a local Ray instance" in log.read_text()  # Ray's messages are all there
    figure = tmp_path / "figure3.png"  # beside the log: the paper's Figure 3 of the trained towers
    assert f"tower 0 above tower 1): {figure}" in said and Image.open(figure).size == (2 + 6 * 46, 2 * (2 + 46) + 12)
    assert re.search(r"tower 0 \(6 kernels\): colour specialisation 0\.\d{3}", said)
    logs = Path(re.search(r"tensorboard --logdir (\S+)", said).group(1))
    assert list(logs.glob("events.out.tfevents.*")), f"no TensorBoard events in {logs}"
