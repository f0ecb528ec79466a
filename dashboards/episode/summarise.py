"""Evaluates every dashboard query over the episode in `timeline` and prints
each series' median and max per phase, then the alerts that went pending
or fired. Usage: summarise.py DASHBOARD_JSON PROMETHEUS_URL"""
import json
import statistics
import sys
import urllib.parse
import urllib.request

dashboard_path, prometheus = sys.argv[1], sys.argv[2]
t = {k: int(v) for k, v in (line.split() for line in open("timeline"))}
phases = [
    ("baseline", t["start"] + 5, t["row_lock_begin"]),
    ("row lock", t["row_lock_begin"] + 2, t["row_lock_end"]),
    ("between", t["row_lock_end"] + 2, t["table_lock_begin"]),
    ("bid_log lock", t["table_lock_begin"] + 1, t["table_lock_end"]),
    ("after", t["table_lock_end"] + 2, t["end"]),
]


def query_range(expr):
    params = urllib.parse.urlencode({"query": expr, "start": t["start"], "end": t["end"], "step": "1"})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}") as answer:
        return json.load(answer)["data"]["result"]


print(f"phases (s from start): " + ", ".join(f"{n} {a - t['start']}-{b - t['start']}" for n, a, b in phases))
for panel in json.load(open(dashboard_path))["panels"]:
    if panel["type"] == "row":
        print(f"\n## {panel['title']}")
        continue
    print(f"### {panel['title']}")
    for target in panel["targets"]:
        # Grafana's $__rate_interval for a 1 s scrape interval.
        for series in query_range(target["expr"].replace("$__rate_interval", "4s")):
            label = target["legendFormat"]
            for key, value in series["metric"].items():
                label = label.replace("{{" + key + "}}", value)
            values = [(int(float(ts)), float(v)) for ts, v in series["values"] if v != "NaN"]
            cells, moved = [], False
            for name, start, end in phases:
                xs = [v for ts, v in values if start <= ts <= end]
                if xs:
                    cells.append(f"{name}: {statistics.median(xs):.3g} / {max(xs):.3g}")
                    moved |= max(xs) != 0
                else:
                    cells.append(f"{name}: -")
            if moved:
                print(f"  {label} (median / max): " + " | ".join(cells))

print("\n## Alerts pending or firing")
for alert in query_range("ALERTS"):
    first, last = (int(float(alert["values"][i][0])) - t["start"] for i in (0, -1))
    print(f"  {alert['metric']['alertname']} {alert['metric']['alertstate']} from {first} s to {last} s")
