"""Writes alexnet-mp.json, the Grafana dashboard, from the panel list below.

    python deploy/grafana/make_dashboard.py   # after editing a panel; tests check the JSON is current

Plain JSON in Grafana's own dashboard model (schemaVersion 39, Grafana 10 or later): panels on a
24-column grid, every query on the dashboard's `datasource` variable so that it imports cleanly
through the UI or provisioning, whatever the Prometheus data source is called there.
"""

from __future__ import annotations

import json
from pathlib import Path

OUTPUT = Path(__file__).with_name("alexnet-mp.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ON = '{instance=~"$instance"}'  # every query reads the chosen server
RATE = "[$__rate_interval]"


def target(expr: str, legend: str = "", ref: str = "A", heatmap: bool = False) -> dict:
    return {
        "datasource": DATASOURCE,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "format": "heatmap" if heatmap else "time_series",
        "range": True,
    }


def targets(*pairs: tuple[str, str]) -> list[dict]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def timeseries(
    title: str,
    description: str,
    queries: list[dict],
    unit: str = "short",
    stacked: bool = False,
    width: int = 8,
    **extra,
) -> dict:
    custom = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 30 if stacked else 10,
        "showPoints": "never",
        "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
    }
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": queries,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "width": width,
        **extra,
    }


def heatmap(title: str, description: str, metric: str, unit: str) -> dict:
    """A classic-histogram heatmap: each bucket's count per interval, buckets as rows."""
    query = target(f"sum by (le) (increase({metric}_bucket{ON}{RATE}))", "{{le}}", heatmap=True)
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [query],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {
            "calculate": False,
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "rowsFrame": {"layout": "le"},
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "cellGap": 1,
            "tooltip": {"show": True, "yHistogram": True},
            "legend": {"show": True},
        },
        "width": 8,
    }


def stat(title: str, description: str, expr: str, width: int = 4) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr)],
        "fieldConfig": {"defaults": {"unit": "none", "decimals": 0}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": "value",
        },
        "width": width,
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "width": 24}


def quantile(q: float, metric: str) -> str:
    """A quantile of a histogram over all its other labels (protocol, say): only `le` is kept."""
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{ON}{RATE})))"


PANELS = [
    row("Training"),
    timeseries("Loss", "The last step's loss, per scrape", targets((f"alexnet_training_loss{ON}", "loss"))),
    timeseries(
        "Validation accuracy",
        "Top-1 and top-5 of the last validation (once per epoch)",
        targets((f"alexnet_validation_top1_accuracy{ON}", "top-1"), (f"alexnet_validation_top5_accuracy{ON}", "top-5")),
        unit="percentunit",
    ),
    timeseries(
        "Images per second",
        "Training throughput",
        targets(
            (f"alexnet_training_images_per_second{ON}", "reported by the loop"),
            (f"rate(alexnet_training_samples_total{ON}{RATE})", "from the samples counter"),
        ),
    ),
    timeseries(
        "Step duration",
        "Wall time of one SGD step",
        targets(
            (quantile(0.5, "alexnet_training_step_duration_seconds"), "p50"),
            (quantile(0.99, "alexnet_training_step_duration_seconds"), "p99"),
        ),
        unit="s",
    ),
    timeseries("Learning rate", "The schedule's current rate", targets((f"alexnet_training_learning_rate{ON}", "lr"))),
    stat("Job running", "1 while a job trains", f"max(alexnet_training_running{ON})"),
    stat("Epoch", "Epochs completed in the current job", f"max(alexnet_training_epoch{ON})"),
    row("Towers and exchanges"),
    timeseries(
        "Tower $tower: compute per stage",
        "Seconds per second each stage computed (forward and backward), stacked",
        targets(
            (
                "sum by (stage) (rate(alexnet_tower_compute_seconds_total"
                f'{{instance=~"$instance", tower=~"$tower"}}{RATE}))',
                "{{stage}}",
            )
        ),
        unit="s",
        stacked=True,
        width=12,
        repeat="tower",
        repeatDirection="h",
    ),
    timeseries(
        "Exchange wait per step, by point",
        "Mean seconds per step the slowest tower waited for each exchange",
        targets(
            (
                f"sum by (point, direction) (rate(alexnet_exchange_duration_seconds_sum{ON}{RATE}))"
                f" / sum by (point, direction) (rate(alexnet_exchange_duration_seconds_count{ON}{RATE}))",
                "{{point}} {{direction}}",
            )
        ),
        unit="s",
        width=12,
    ),
    timeseries(
        "Exchange bytes per second, by point",
        "Bytes moved between the towers at each exchange point",
        targets(
            (f"sum by (point, direction) (rate(alexnet_exchange_bytes_total{ON}{RATE}))", "{{point}} {{direction}}")
        ),
        unit="Bps",
        width=12,
    ),
    timeseries(
        "Tower restarts",
        "Towers replaced after they died, by role",
        targets((f"sum by (role) (increase(alexnet_tower_restarts_total{ON}{RATE}))", "{{role}}")),
        width=12,
    ),
    row("Serving"),
    timeseries(
        "Classify requests by code",
        "Requests per second, by final gRPC code (all protocols)",
        targets((f"sum by (code) (rate(alexnet_classify_requests_total{ON}{RATE}))", "{{code}}")),
        unit="reqps",
        stacked=True,
    ),
    timeseries(
        "Classify latency",
        "Request latency, p50 and p99 (all protocols)",
        targets(
            (quantile(0.5, "alexnet_classify_latency_seconds"), "p50"),
            (quantile(0.99, "alexnet_classify_latency_seconds"), "p99"),
        ),
        unit="s",
    ),
    timeseries(
        "Classify queue",
        "Images waiting for a batch, and the most the queue holds",
        targets(
            (f"max(alexnet_classify_pending_images{ON})", "images waiting"),
            (f"max(alexnet_classify_queue_capacity_images{ON})", "capacity"),
        ),
    ),
    heatmap("Latency heatmap", "Classify requests per latency bucket", "alexnet_classify_latency_seconds", "s"),
    heatmap("Queue wait heatmap", "Time requests waited to join a batch", "alexnet_classify_queue_seconds", "s"),
    heatmap("Batch size heatmap", "Images per served batch", "alexnet_classify_batch_size", "short"),
    stat("Served model version", "The version Classify answers with", f"max(alexnet_model_version{ON})", width=24),
    row("gRPC"),
    timeseries(
        "gRPC codes",
        "RPCs per second, by method and final code",
        targets((f"sum by (method, code) (rate(alexnet_grpc_server_handled_total{ON}{RATE}))", "{{method}} {{code}}")),
        unit="reqps",
        stacked=True,
        width=24,
    ),
]


def variable(name: str, label: str, query: str, **extra) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "refresh": 2,
        "sort": 3,
        "query": {"query": query, "refId": name},
        "definition": query,
        **extra,
    }


def laid_out(panels: list[dict]) -> list[dict]:
    """Places each panel after the one before it, on 24 columns; numbers them."""
    placed, x, y, line = [], 0, 0, 0  # line: the tallest panel on the current line
    for number, panel in enumerate(panels, 1):
        panel = dict(panel)
        width = panel.pop("width")
        height = 1 if panel["type"] == "row" else 4 if panel["type"] == "stat" else 8
        if x + width > 24:
            x, y, line = 0, y + line, 0
        placed.append({"id": number, "gridPos": {"h": height, "w": width, "x": x, "y": y}, **panel})
        x, line = x + width, max(line, height)
        if x >= 24:
            x, y, line = 0, y + line, 0
    return placed


def dashboard() -> dict:
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "uid": "alexnet-mp",
        "title": "alexnet-mp",
        "tags": ["alexnet-mp", "ray"],
        "description": "Training, towers, exchanges and serving of the two-tower AlexNet service (deploy/grafana)",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "timezone": "",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("instance", "Server", "label_values(alexnet_model_version, instance)"),
                variable(
                    "tower",
                    "Tower",
                    'label_values(alexnet_tower_compute_seconds_total{instance=~"$instance"}, tower)',
                    multi=True,
                    includeAll=True,
                    current={"text": "All", "value": "$__all"},
                ),
            ]
        },
        "annotations": {"list": []},
        "panels": laid_out(PANELS),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
