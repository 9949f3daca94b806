"""Observability for real: a server trains and classifies while a real Prometheus scrapes it with the
shipped config and rules; every Grafana panel's query and every alert is evaluated through Prometheus'
HTTP API. The metrics the alerts rest on are also checked by scraping the server directly, with or
without Prometheus."""

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from alexnet_api.v1 import alexnet_pb2 as pb
from client import AlexNetClient
from client.demo import observability_commands
from coordinator.data.patterns import generate
from coordinator.service import ServeOptions, Server
from coordinator.service.metrics import Metrics
from test_service import scrape, total, wait_for

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "alexnet-mp.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL), reason="no prometheus/promtool on PATH: apt-get install prometheus (.ci/run does)"
)

SCRAPE_SECONDS = 1  # the shipped config's interval, shortened so a few seconds of training give several samples
TRAIN_SECONDS = 6  # training runs at least this long, and until its first validation
WIDTH = 0.125  # the served network and the job's share it, so publishing never rebuilds the serving towers
MAX_QUEUE = 64
# What Grafana substitutes in the panels' queries: one window that covers the whole test, and every instance/tower.
VARIABLES = {"$__rate_interval": "5m", "$instance": ".+", "$tower": ".+"}


def metric_totals(server) -> dict:
    """The server's /metrics as {name: value}, summed over labels."""
    samples = scrape(server)
    return {name: total(samples, name) for name, _ in samples}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Prometheus:
    """A real Prometheus on the shipped config, edited only in the server's address and the intervals."""

    def __init__(self, metrics_port: int, folder: Path):
        config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
        for old, new in [
            ('"localhost:9464"', f'"127.0.0.1:{metrics_port}"'),
            ("scrape_interval: 15s", f"scrape_interval: {SCRAPE_SECONDS}s"),
            ("evaluation_interval: 15s", f"evaluation_interval: {SCRAPE_SECONDS}s"),
        ]:
            assert config.count(old) == 1, f"prometheus.yml no longer says {old}"
            config = config.replace(old, new)
        (folder / "prometheus.yml").write_text(config)
        shutil.copy(PROMETHEUS_DIR / "alerts.yml", folder / "alerts.yml")  # the config names it relative to itself
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={self.url[len('http://') :]}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, timeout=60)

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"prometheus exited: {Path(self.log.name).read_text()[-2000:]}"
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            answer = json.load(urllib.request.urlopen(url, timeout=30))
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
            answer = json.load(exc)
        assert answer["status"] == "success", f"{params}: {answer.get('error')}"
        return answer["data"]

    def query(self, expr: str, **params) -> list:
        return self.api("query", query=expr, **params)["result"]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def observed(ray_session, tmp_path_factory):
    """One server's life under Prometheus (when installed): a short training stopped after its first
    validation, a few classifications, then a job that diverges. Returns what the tests check."""
    folder = tmp_path_factory.mktemp("observability")
    dataset = generate(folder / "patterns", train_per_class=4, val_per_class=1)
    roots = [str(folder)]
    server = Server(
        ServeOptions(port=0, metrics_port=0, width=WIDTH, max_queue=MAX_QUEUE, data_roots=roots, checkpoint_roots=roots)
    ).start()
    prometheus, seen = None, {"before": metric_totals(server)}
    try:
        prometheus = Prometheus(server.metrics_port, folder) if PROMETHEUS else None
        with AlexNetClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            client.wait_ready()
            overrides = {
                "width": str(WIDTH),
                "epochs": "1000",
                "batch_size": "8",
                "steps_per_epoch": "4",
                "val_images": "10",
                "publish_every": "4",
            }
            job = client.train(str(dataset / "train"), overrides=overrides)
            wait_for(lambda: client.get(job.job_id).progress.step >= 1)
            started = time.time()
            seen["training"] = metric_totals(server)
            wait_for(lambda: time.time() - started >= TRAIN_SECONDS and client.get(job.job_id).progress.epoch >= 1)
            stopped = time.time()
            client.stop(job.job_id)
            wait_for(lambda: client.get(job.job_id).state == pb.STOPPED)
            seen["window"] = (started, stopped)
            seen["after"] = wait_for(lambda: (s := metric_totals(server))["alexnet_training_running"] == 0 and s)
            for _ in range(3):
                client.classify([p.read_bytes() for p in sorted((dataset / "val").rglob("*.jpg"))[:4]], top_k=3)
            diverging = dict(overrides, lr="1e6", init="pytorch")  # see test_training's diverging run
            failed = client.train(str(dataset / "train"), overrides=diverging)
            seen["diverged"] = wait_for(lambda: (j := client.get(failed.job_id)).state == pb.FAILED and j)
            seen["end"] = metric_totals(server)
        if prometheus:  # a scrape over a second after the last request, so that every rate sees it
            ended = time.time()
            wait_for(lambda: prometheus.query(f"timestamp(up{{job='alexnet-mp'}}) > {ended + SCRAPE_SECONDS}"))
        yield server, prometheus, seen
    finally:
        if prometheus:
            prometheus.close()
        server.stop()


def test_the_metrics_behind_the_alerts(observed):
    """Without Prometheus too: the gauges the stalled, NaN and queue alerts need, scraped from the server."""
    _, _, seen = observed
    assert seen["before"]["alexnet_training_running"] == 0
    assert seen["training"]["alexnet_training_running"] == 1
    assert seen["after"]["alexnet_training_running"] == 0 and seen["after"]["alexnet_training_steps_total"] >= 4
    assert seen["end"]["alexnet_classify_queue_capacity_images"] == MAX_QUEUE
    assert seen["end"]["alexnet_classify_pending_images"] == 0 == seen["end"]["alexnet_classify_pending_requests"]
    assert "lower lr" in seen["diverged"].error
    assert math.isnan(seen["end"]["alexnet_training_loss"])  # the diverged job's loss, for the NaN alert
    assert seen["end"]["alexnet_training_running"] == 0


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, with Grafana's variables filled in."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


@needs_prometheus
def test_every_dashboard_panel_returns_data(observed):
    _, prometheus, _ = observed
    empty = [title for title, expr in dashboard_queries() if not prometheus.query(expr)]
    assert empty == []
    # Each stage of each tower computed, and every exchange moved bytes
    computed = prometheus.query("sum by (tower, stage) (alexnet_tower_compute_seconds_total) > 0")
    assert {r["metric"]["tower"] for r in computed} == {"0", "1"} and len(computed) >= 10
    moved = prometheus.query("alexnet_exchange_bytes_total > 0")
    assert len(moved) == len(prometheus.query("alexnet_exchange_bytes_total"))


@needs_prometheus
def test_every_alert_rule_evaluates(observed):
    _, prometheus, _ = observed
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {
        "AlexNetTrainingStalled",
        "AlexNetTrainingLossNaN",
        "AlexNetTrainingLossRising",
        "AlexNetTowerRestarts",
        "AlexNetClassifyErrorRatio",
        "AlexNetClassifyLatencyP99",
        "AlexNetClassifyQueueNearFull",
        "AlexNetMetricsDown",
    }
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    for rule in rules:
        prometheus.query(rule["query"])  # raises on an error
    # The diverged job's NaN loss fires its alert (at the first evaluation after the scrape that saw it);
    # a healthy run fires nothing else.
    firing = lambda: {r["metric"]["alertname"] for r in prometheus.query('ALERTS{alertstate="firing"}')}  # noqa: E731
    wait_for(lambda: "AlexNetTrainingLossNaN" in firing(), timeout=30)
    assert firing() == {"AlexNetTrainingLossNaN"}


@needs_prometheus
def test_every_scrape_while_training_is_answered_and_carries_the_loss(observed):
    _, prometheus, seen = observed
    started, stopped = seen["window"]

    def over_training(function: str, selector: str) -> float:
        answer = prometheus.query(f"{function}({selector}[{int(stopped - started)}s])", time=f"{stopped:.3f}")
        return float(answer[0]["value"][1])

    scrapes = over_training("count_over_time", 'up{job="alexnet-mp"}')  # every scrape, answered or not
    assert over_training("sum_over_time", 'up{job="alexnet-mp"}') == scrapes  # every one answered within 1 s
    assert over_training("count_over_time", "alexnet_training_loss") == scrapes  # each one carried the loss
    assert scrapes >= int(stopped - started) / SCRAPE_SECONDS - 1  # one a second over the range (its ends may cut one)
    assert over_training("min_over_time", "alexnet_training_running") == 1
    assert over_training("changes", "alexnet_training_loss") >= 1  # the loss moved between scrapes: steps seen live


@needs_prometheus
def test_promtool_checks_the_config_and_the_alert_rules_unit_tests():
    for command in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([PROMTOOL, *command], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def shipped_metric_names() -> set[str]:
    """Every alexnet_* name the dashboard and the alert rules read."""
    text = (
        DASHBOARD.read_text()
        + (PROMETHEUS_DIR / "alerts.yml").read_text()
        + (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    )
    return set(re.findall(r"\balexnet_[a-z0-9_]+", text))


def test_the_dashboard_and_rules_read_only_metrics_the_server_exports():
    """A misspelt name would show an empty panel, or an alert that never fires: caught here without Prometheus."""
    exported = {s.name for family in Metrics().registry.collect() for s in family.samples} | {
        f"{family.name}{suffix}"
        for family in Metrics().registry.collect()
        for suffix in ("_bucket", "_sum", "_count", "_total")
    }
    assert shipped_metric_names() - exported == set()


def test_the_dashboard_is_generated_and_imports_cleanly():
    spec = importlib.util.spec_from_file_location("make_dashboard", DASHBOARD.with_name("make_dashboard.py"))
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    assert DASHBOARD.read_text() == maker.render(), "run: python deploy/grafana/make_dashboard.py"
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "alexnet-mp" and board["schemaVersion"] >= 36 and "id" not in board  # importable anywhere
    [source] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"  # any Prometheus data source can be picked at import
    panels = board["panels"]
    queries = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels}
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and all(
                t["expr"] and t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]
            )
    # What the issue asks for: heatmaps of latency, queue and batch size; the served version; per-tower stacked compute.
    heatmaps = {re.search(r"alexnet_\w+_bucket", queries[p["title"]]).group() for p in panels if p["type"] == "heatmap"}
    assert heatmaps == {
        "alexnet_classify_latency_seconds_bucket",
        "alexnet_classify_queue_seconds_bucket",
        "alexnet_classify_batch_size_bucket",
    }
    [compute] = [p for p in panels if "alexnet_tower_compute_seconds_total" in queries[p["title"]]]
    assert compute["repeat"] == "tower" and compute["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert {
        "alexnet_training_loss",
        "alexnet_validation_top1_accuracy",
        "alexnet_training_images_per_second",
        "alexnet_exchange_duration_seconds_sum",
        "alexnet_exchange_bytes_total",
        "alexnet_model_version",
        "alexnet_grpc_server_handled_total",
    } <= shipped_metric_names()


def test_the_demo_prints_the_prometheus_command_and_the_dashboard(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    lines = observability_commands(9464)
    command = shlex.split(next(line for line in lines if line.strip().startswith("prometheus ")))
    assert command[1] == "--config.file=deploy/prometheus/prometheus.yml" and (ROOT / command[1].split("=")[1]).exists()
    assert "import deploy/grafana/alexnet-mp.json" in lines[-1] and "edit" not in lines[0]
    assert "localhost:40000" in observability_commands(40000)[0]  # another port: it says what to edit


ENDPOINT_OWNER = """
import sys, time
from coordinator.service.metrics import Metrics
metrics = Metrics()
endpoint = metrics.serve_http("127.0.0.1", 0)
print(endpoint.port, endpoint.pid, flush=True)
while True:
    metrics.steps.inc()
    time.sleep(0.05)
"""


def scrape_text(port: int) -> tuple[str, float]:
    start = time.monotonic()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return text, time.monotonic() - start


def sample(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_metrics_are_answered_within_a_second_while_their_server_cannot_run_and_go_with_it(tmp_path):
    """/metrics runs in a process of its own: a server stopped dead (SIGSTOP) still gets its scrapes
    answered, with the last figures and their age; killed with SIGKILL, it leaves no endpoint behind."""
    owner = subprocess.Popen([sys.executable, "-c", ENDPOINT_OWNER], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        port, endpoint_pid = map(int, owner.stdout.readline().split())
        text, _ = scrape_text(port)
        assert sample(text, "alexnet_metrics_snapshot_age_seconds") < 0.5  # fresh: rendered for this scrape
        os.kill(owner.pid, signal.SIGSTOP)
        try:
            time.sleep(0.2)
            stale, seconds = scrape_text(port)
            steps = sample(stale, "alexnet_training_steps_total")
            assert seconds < 1.0 and sample(stale, "alexnet_metrics_snapshot_age_seconds") >= 0.5
            assert steps >= sample(text, "alexnet_training_steps_total")  # the last figures, not none
        finally:
            os.kill(owner.pid, signal.SIGCONT)
        # Running again: fresh figures (its counter moves once its loop wakes from the sleep it was stopped in)
        fresh = wait_for(
            lambda: (t := scrape_text(port)[0]) and sample(t, "alexnet_training_steps_total") > steps and t, timeout=10
        )
        assert sample(fresh, "alexnet_metrics_snapshot_age_seconds") < 0.5
        owner.kill()
        owner.wait()
        wait_for(lambda: not pid_alive(endpoint_pid), timeout=10)
    finally:
        owner.kill()
        owner.wait()
