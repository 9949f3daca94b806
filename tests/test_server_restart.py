"""A server SIGKILLed mid-training and started again on the same state dir.

The server runs as `alexnet-mp serve` in its own process, with its own Ray. After kill -9 and a
restart: the job is listed as INTERRUPTED with its last checkpoint, Classify serves the last
published version (not version 0), and resuming the job by its id finishes the run.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from coordinator.data.patterns import generate
from test_service import jpeg_bytes, wait_for

ROOT = Path(__file__).resolve().parents[1]
PLAN = {
    "width": "0.125",
    "epochs": "3",
    "batch_size": "16",
    "steps_per_epoch": "6",
    "publish_every": "2",
    "checkpoint_every": "3",
}


class ServerProcess:
    """`alexnet-mp serve` on a free loopback port, in a session of its own (so its Ray can be cleaned up)."""

    def __init__(self, state_dir: Path, log: Path):
        self.log = log.open("a")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "client.cli",
                "serve",
                "--port",
                "0",
                "--metrics-port",
                "-1",
                "--width",
                "0.125",
                "--state-dir",
                str(state_dir),
                "--data-root",
                str(state_dir.parent),
                "--checkpoint-root",
                str(state_dir.parent),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        line = self.process.stdout.readline()  # printed once it serves
        match = re.search(r"serving gRPC on [\d.]+:(\d+)", line)
        assert match, f"the server did not start: {line!r}; see {log}"
        self.target = f"127.0.0.1:{match.group(1)}"

    def kill(self) -> None:
        """kill -9 of the server, then of what it left in its session (its Ray would outlive it)."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def job_state(client, job_id):
    return client.get(job_id).state


def test_a_server_killed_mid_training_remembers_its_job_and_version_and_the_job_resumes(tmp_path):
    data = generate(tmp_path / "patterns", train_per_class=10, val_per_class=3)
    state_dir, checkpoints = tmp_path / "state", tmp_path / "checkpoints"
    first = ServerProcess(state_dir, tmp_path / "server.log")
    try:
        with AlexNetClient(first.target, timeout=60) as client:
            job = client.train(data / "train", val_dir=data / "val", overrides=PLAN, checkpoint_dir=checkpoints)
            wait_for(lambda: client.get(job.job_id).progress.step >= 8, timeout=300, every=0.2)
            before = client.get(job.job_id)
            assert before.state == pb.RUNNING and before.model_version >= 3 and before.checkpoint
    finally:
        first.kill()
    assert first.process.returncode == -signal.SIGKILL

    second = ServerProcess(state_dir, tmp_path / "server.log")
    try:
        with AlexNetClient(second.target, timeout=60) as client:
            [interrupted] = client.list()
            assert interrupted.job_id == job.job_id and interrupted.state == pb.INTERRUPTED
            assert f"resume it: alexnet-mp train --resume {job.job_id}" in interrupted.error
            assert interrupted.checkpoint.startswith(str(checkpoints)) and interrupted.progress.step >= 6
            info = client.info()
            versions = sorted(int(p.stem[1:]) for p in (state_dir / "versions").glob("v*.pt"))
            assert info.model_version == versions[-1] >= before.model_version  # the last published, not version 0
            assert client.classify([jpeg_bytes()]).model_version == info.model_version

            with pytest.raises(grpc.RpcError) as refused:  # another dataset is refused before anything starts
                other = generate(tmp_path / "other", train_per_class=4, val_per_class=1)
                shutil.rmtree(other / "train" / "checks")  # one class fewer
                client.train(other / "train", resume_from=job.job_id)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "class folders are not the checkpoint's" in refused.value.details()
            with pytest.raises(grpc.RpcError) as missing:
                client.train(resume_from=str(tmp_path / "nowhere"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "no checkpoint" in missing.value.details()
            assert len(client.list()) == 1  # the refused requests left no job behind

            resumed = client.train(resume_from=job.job_id)
            wait_for(lambda: job_state(client, resumed.job_id) not in (pb.PENDING, pb.RUNNING), timeout=300, every=0.2)
            done = client.get(resumed.job_id)
            assert done.state == pb.FINISHED, done.error
            assert done.progress.step == 18 and done.progress.epoch == 3
            assert done.spec.data_dir == str(data / "train") and done.spec.checkpoint_dir == str(checkpoints)
            assert done.model_version > info.model_version
    finally:
        second.process.send_signal(signal.SIGTERM)  # a clean stop this time
        try:
            assert second.process.wait(timeout=60) == 0
        finally:
            second.kill()


def test_the_state_dir_keeps_the_last_versions_and_passes_over_what_it_cannot_read(tmp_path):
    import torch

    from coordinator.data import ColourStats
    from coordinator.service.errors import PreconditionFailed
    from coordinator.service.jobs import JobManager, JobState
    from coordinator.service.metrics import Metrics
    from coordinator.service.requests import TrainingRequest
    from coordinator.service.state import StateStore
    from coordinator.service.versions import ModelVersion

    store = StateStore(tmp_path, keep_versions=2, pinned=[1])
    for number in range(1, 6):
        weights = {"w": torch.full((3,), float(number))}
        store.save_version(ModelVersion(number, weights, ["a", "b"], ColourStats.imagenet(), True, {"num_classes": 2}))
    assert sorted(p.name for p in store.versions_dir.iterdir()) == ["v000001.pt", "v000004.pt", "v000005.pt"]
    (store.versions_dir / "v000005.pt").write_bytes(b"torn")  # damaged: the one before is served
    latest = store.latest_version()
    assert latest.version == 4 and latest.state["w"].tolist() == [4.0] * 3 and latest.stats == ColourStats.imagenet()

    running = {
        "job_id": "a1",
        "state": "RUNNING",
        "request": {"builtin": True},
        "progress": None,
        "top1": 0.5,
        "top5": 0.9,
        "error": "",
        "model_version": 3,
        "created": 1.0,
        "ended": 0.0,
        "saved": 2.0,
    }
    store.save_job(running)
    (store.jobs_dir / "b2.json").write_text('{"job_id": "b2", "state": "NO SUCH STATE"')  # torn mid-write
    (store.jobs_dir / "c3.json").write_text('{"job_id": "c3", "state": "NO SUCH STATE"}')  # from another version
    jobs = JobManager(Metrics(), lambda version: 0, tmp_path / "data", tmp_path / "logs", StateStore(tmp_path))
    [job] = jobs.list()
    status = job.status()
    assert status.state == JobState.INTERRUPTED and status.ended == 2.0 and status.model_version == 3
    assert "it wrote no checkpoints (no checkpoint_dir), so it cannot be resumed" in status.error
    with pytest.raises(PreconditionFailed, match="job a1 wrote no checkpoints"):
        jobs.start(TrainingRequest(resume_from="a1"))
    assert '"state": "INTERRUPTED"' in (store.jobs_dir / "a1.json").read_text()  # so it stays so


def test_a_resume_request_is_checked_before_it_is_accepted(tmp_path):
    import argparse

    import torch
    from PIL import Image
    from test_training import saved_by

    from coordinator.service.errors import InvalidRequest, NotFound, PreconditionFailed
    from coordinator.service.requests import TrainingRequest, check_request

    saved_by(tmp_path / "ckpt", [(4, 0.5), (8, 0.6)], keep=3)  # classes a and b, with the demo recipe
    for name in ("a", "b", "c"):
        (tmp_path / "ab" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "ab" / name / "0.png")
    shutil.rmtree(tmp_path / "ab" / "c")
    (tmp_path / "ac").mkdir()
    shutil.copytree(tmp_path / "ab" / "a", tmp_path / "ac" / "a")
    shutil.copytree(tmp_path / "ab" / "a", tmp_path / "ac" / "c")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not really")
    torch.save({"format": 2, "smuggled": argparse.Namespace(code=1)}, tmp_path / "pickled.pt")

    def check(**fields):
        return check_request(TrainingRequest(**{"resume_from": str(tmp_path / "ckpt"), **fields}))

    plan = check(data_dir=str(tmp_path / "ab"), overrides={"epochs": "9"})
    assert plan.resume["step"] == 8 and plan.spec.options.epochs == 9  # the latest checkpoint
    assert plan.spec.recipe.lr == 0.003  # the demo's, as the checkpoint keeps it
    assert plan.checkpoint_dir == tmp_path / "ckpt" and plan.request.checkpoint_dir == str(tmp_path / "ckpt")
    assert (
        check_request(
            TrainingRequest(
                resume_from=str(tmp_path / "ckpt" / "checkpoint-step0000004.pt"), data_dir=str(tmp_path / "ab")
            )
        ).resume["step"]
        == 4
    )
    refusals = [
        (dict(data_dir=str(tmp_path / "ac")), PreconditionFailed, "class folders are not the checkpoint's"),
        (dict(data_dir=str(tmp_path / "ab"), overrides={"width": "2"}), PreconditionFailed, "network's shape differs"),
        (dict(data_dir=str(tmp_path / "ab"), overrides={"lr": "1"}), InvalidRequest, "lr cannot change"),
        (dict(data_dir=str(tmp_path / "ab"), preset="paper"), InvalidRequest, "leave preset empty"),
        (dict(), InvalidRequest, "does not say which dataset"),
        (dict(resume_from=str(tmp_path / "nowhere")), NotFound, "no checkpoint file or folder at"),
        (dict(resume_from=str(tmp_path / "ab")), NotFound, "holds no checkpoint"),
        (dict(resume_from=str(tmp_path / "torn.pt")), InvalidRequest, "is not a readable checkpoint"),
        (
            dict(resume_from=str(tmp_path / "pickled.pt")),
            InvalidRequest,
            "is not a readable checkpoint",
        ),  # no code runs
    ]
    for fields, error, message in refusals:
        with pytest.raises(error, match=message):
            check(**fields)
