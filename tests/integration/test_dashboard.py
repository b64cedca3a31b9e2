"""The shipped Grafana dashboard against a real, short simulated run.

The real ``factory-devices simulate`` (with injected faults) publishes to the session's mosquitto for
10 s; the real gateway writes into a fresh InfluxDB 1.x database. Then every templating, panel and
annotation query of ``deploy/grafana/factory-gateway.json`` is interpolated the way Grafana does it
(``$timeFilter``, ``$__interval``, template variables as escaped regex alternations) and must return
data.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devices.fleet import fleet_layout
from tests.gwproc import ROOT, GatewayProcess, publish, store_toml, wait_until, write_config
from tests.servers import InfluxDB1, Mosquitto

DASHBOARD = ROOT / "deploy" / "grafana" / "factory-gateway.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "influxdb.yaml"
MACHINES = 20


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _influx_datasource() -> dict[str, Any]:
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    [ds] = [s for s in sources if s["type"] == "influxdb"]
    return dict(ds)


def _panel_targets() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(f"{p['id']}-{t['refId']}", p, t) for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _influx_annotations() -> list[dict[str, Any]]:
    return [a for a in _dashboard()["annotations"]["list"] if a.get("datasource", {}).get("type") == "influxdb"]


def _annotation_query(annotation: dict[str, Any]) -> str:
    query: str = annotation.get("target", {}).get("query") or annotation["query"]
    return query


def _columns(doc: dict[str, Any]) -> dict[str, int]:
    """Column name → how many non-null values it has in a query's result (the time column left out)."""
    counts: dict[str, int] = {}
    for result in doc.get("results", []):
        for series in result.get("series", []):
            for row in series["values"]:
                for col, v in zip(series["columns"], row, strict=True):
                    if col != "time":
                        counts[col] = counts.get(col, 0) + (v is not None)
    return counts


# --- Grafana's interpolation, as its InfluxDB datasource does it ----------------------------------------------
_REGEX_SPECIALS = re.compile(r"[\\^$*+?.()|{}\[\]/]")
# kbn.roundInterval: (below this many ms, use this interval)
_ROUND_MS = [
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1_500, 1_000), (3_500, 2_000),
    (7_500, 5_000), (12_500, 10_000), (17_500, 15_000), (25_000, 20_000), (45_000, 30_000), (90_000, 60_000),
    (210_000, 120_000), (450_000, 300_000), (750_000, 600_000), (1_050_000, 900_000), (1_500_000, 1_200_000),
    (2_700_000, 1_800_000), (5_400_000, 3_600_000), (9_000_000, 7_200_000), (16_200_000, 10_800_000),
    (27_000_000, 21_600_000), (39_600_000, 43_200_000), (604_800_000, 86_400_000),
]
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_MAX_DATA_POINTS = 1000  # about a panel's width in pixels


def _ms(text: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", text)
    assert m, f"not a Grafana interval: {text!r}"
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


def _interval_text(ms: int) -> str:
    for unit in ("w", "d", "h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def _regex_value(variable: dict[str, Any], values: list[str]) -> str:
    """A variable's text in a query: raw when single-valued, else escaped and joined as ``(a|b)``."""
    if not (variable.get("multi") or variable.get("includeAll")):
        return values[0]
    escaped = [_REGEX_SPECIALS.sub(lambda m: "\\" + m.group(), v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def _interpolate(query: str, variables: dict[str, str], time_filter: str = "", interval: str = "") -> str:
    query = re.sub(r"\$timeFilter\b", time_filter, query)
    query = re.sub(r"\$__interval\b", interval, query)

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in variables, f"query uses ${name}, which is not a template variable: {query}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, query)


@dataclass(frozen=True)
class SimulatedRun:
    influx: InfluxDB1
    db: str
    from_ms: int  # the dashboard's absolute time range covering the run
    to_ms: int
    machines: frozenset[str]

    def time_filter(self, panel: dict[str, Any] | None = None) -> str:
        if panel is not None and panel.get("timeFrom"):  # a panel's relative time override
            return f"time >= now() - {panel['timeFrom']}"
        return f"time >= {self.from_ms}ms and time <= {self.to_ms}ms"

    def interval(self, panel: dict[str, Any]) -> str:
        """``$__interval``: range / max data points, rounded, not below the panel's or datasource's minimum."""
        span = _ms(panel["timeFrom"]) if panel.get("timeFrom") else self.to_ms - self.from_ms
        rounded = next((v for limit, v in _ROUND_MS if span / _MAX_DATA_POINTS < limit), 604_800_000)
        minimum = _ms(panel.get("interval") or _influx_datasource()["jsonData"].get("timeInterval") or "1ms")
        return _interval_text(max(rounded, minimum))

    def variables(self, *, select: str) -> dict[str, str]:
        """Run the templating queries in order; ``select="all"`` picks All, ``"first"`` the first option."""
        values: dict[str, str] = {}
        for variable in _dashboard()["templating"]["list"]:
            rows = self.influx.query(_interpolate(variable["query"], values), self.db)
            options = sorted({str(r["value"]) for r in rows})
            assert options, f"templating query of ${variable['name']} returned nothing: {variable['query']}"
            current = variable.get("current", {}).get("value")
            if select == "all" and variable.get("includeAll"):
                if variable.get("allValue"):
                    values[variable["name"]] = variable["allValue"]
                    continue
                chosen = options
            elif current in options:  # Grafana keeps the saved selection when it is still an option
                chosen = [current]
            else:
                chosen = options[:1]
            values[variable["name"]] = _regex_value(variable, chosen)
        return values


@pytest.fixture(scope="module")
def simulated_run(
    mosquitto: Mosquitto, influxdb: InfluxDB1, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimulatedRun]:
    """10 s of a 20-machine fleet with two injected faults, through the real gateway into a fresh database.

    OEE windows are 2 s (closing 1 s after a machine goes quiet) so `oee` points appear at once. Shift
    windows are whole minutes at least, which a 10-s run rarely crosses: the calendar has one shift for the
    previous minute, in which m001 reported running, making parts and one failure (so every OEE field,
    MTBF and MTTR included, gets a value); the simulator's first m001 message closes that shift.
    """
    tmp = tmp_path_factory.mktemp("dashboard")
    db = f"dashboard_{uuid.uuid4().hex[:12]}"
    influxdb.create_database(db)
    minute = int(time.time()) // 60 * 60
    previous = minute - 60
    cfg = write_config(
        tmp / "gw.toml",
        f"""
[gateway]
instance = "dashboard"
stats_interval_s = 1
[mqtt]
host = "127.0.0.1"
port = {mosquitto.port}
client_id = "gw-dashboard"
{store_toml(tmp, influxdb.url, db)}
[oee]
windows = ["2s"]
idle_close_s = 1
timezone = "UTC"
[[oee.shifts]]
name = "previous-minute"
start = "{time.strftime('%H:%M', time.gmtime(previous))}"
end = "{time.strftime('%H:%M', time.gmtime(minute))}"
""",
    )
    fleet = fleet_layout(MACHINES)
    m001 = fleet[0]
    simulator = Path(sys.executable).with_name("factory-devices")
    assert simulator.exists(), f"{simulator} is missing: install the package (deploy/dev/setup.sh)"
    with GatewayProcess(cfg) as gw:
        topic = f"factory/{m001.site}/{m001.area}/{m001.line}/{m001.name}"
        earlier = [
            ("state", {"ts": previous + 20, "state": "RUNNING"}),
            ("count", {"ts": previous + 21, "total": 100, "good": 100}),
            ("count", {"ts": previous + 35, "total": 130, "good": 127}),
            ("state", {"ts": previous + 40, "state": "DOWN", "reason": "jam"}),
            ("state", {"ts": previous + 50, "state": "RUNNING"}),
        ]
        publish(mosquitto.port, [(f"{topic}/{ch}", body) for ch, body in earlier], client_id="pub-dashboard")
        assert wait_until(lambda: influxdb.count("machine_state", db) >= 3, timeout=10), gw.tail()
        sim = subprocess.run(
            [str(simulator), "simulate", "--broker", f"127.0.0.1:{mosquitto.port}", "--machines", str(MACHINES),
             "--rate", "5", "--duration", "10", "--seed", "3", "--time-scale", "60", "--count-every", "2",
             "--fault-at", "m004:spike:8::spindle_temp_c", "--fault-at", "m007:stuck:2:8:vibration_mm_s",
             "--waveform-hz", "1000", "--waveform-every", "5"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert sim.returncode == 0, sim.stderr
        time.sleep(1.5)  # the last batches, OEE idle closes and a few more gateway_stats points
        assert gw.stop() == 0, gw.tail()
    yield SimulatedRun(influxdb, db, (previous - 60) * 1000, int(time.time() * 1000) + 60_000,
                       frozenset(s.name for s in fleet))
    if influxdb.running:
        influxdb.drop_database(db)


# --- the dashboard's structure ----------------------------------------------------------------------------------
def test_every_panel_has_a_provisioned_datasource_and_a_query_and_a_unique_id() -> None:
    panels = _dashboard()["panels"]
    uid = _influx_datasource()["uid"]
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for p in panels:
        assert p.get("datasource", {}).get("uid") == uid, f"panel {p['id']} {p['title']!r}: datasource"
        assert p.get("targets"), f"panel {p['id']} {p['title']!r} has no target"
        for t in p["targets"]:
            assert t.get("datasource", {}).get("uid") == uid, f"panel {p['id']} target {t['refId']}: datasource"
            assert t.get("rawQuery") is True, f"panel {p['id']} target {t['refId']}: not a raw InfluxQL query"
            assert t.get("query", "").strip(), f"panel {p['id']} target {t['refId']}: empty query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), f"panel {p['id']}: duplicate refIds {refs}"


def test_anomaly_annotations_mark_the_telemetry_panels() -> None:
    annotations = _influx_annotations()
    assert annotations, "no InfluxDB annotation in annotations.list"
    panels = {p["id"]: p for p in _dashboard()["panels"]}
    telemetry = {i for i, p in panels.items() if p["type"] == "timeseries"
                 and any('FROM "telemetry"' in t["query"] for t in p["targets"])}
    assert telemetry
    anomaly = [a for a in annotations if 'FROM "anomaly"' in _annotation_query(a)]
    assert anomaly, "no annotation queries the anomaly measurement"
    for a in anomaly:
        assert a["enable"] is True
        if "target" in a and "query" in a:
            assert a["target"]["query"] == a["query"], "legacy and current annotation queries differ"
        shown_on = set(a["filter"]["ids"]) if "filter" in a and not a["filter"].get("exclude") else set(panels)
        assert shown_on <= set(panels), f"annotation filter names missing panels: {shown_on - set(panels)}"
        assert telemetry <= shown_on, f"telemetry panels without anomaly markers: {telemetry - shown_on}"


# --- every query against the run ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_selected(simulated_run: SimulatedRun) -> dict[str, str]:
    return simulated_run.variables(select="all")


def test_templating_queries_list_the_simulated_plant(simulated_run: SimulatedRun) -> None:
    """With All selected upstream, the chained site → line → machine queries list every simulated machine."""
    values: dict[str, str] = {}
    options: dict[str, set[str]] = {}
    for variable in _dashboard()["templating"]["list"]:
        rows = simulated_run.influx.query(_interpolate(variable["query"], values), simulated_run.db)
        options[variable["name"]] = {str(r["value"]) for r in rows}
        assert options[variable["name"]], f"${variable['name']}: no options"
        values[variable["name"]] = _regex_value(variable, sorted(options[variable["name"]]))
    fleet = fleet_layout(MACHINES)
    assert options["site"] == {s.site for s in fleet}
    assert options["line"] == {s.line for s in fleet}
    assert options["machine"] == simulated_run.machines
    assert options["oee_window"] == {"2s", "shift"}


@pytest.mark.parametrize(("key", "panel", "target"), _panel_targets(), ids=[k for k, _, _ in _panel_targets()])
def test_panel_query_returns_data(
    simulated_run: SimulatedRun, all_selected: dict[str, str], key: str, panel: dict[str, Any],
    target: dict[str, Any],
) -> None:
    query = _interpolate(target["query"], all_selected, simulated_run.time_filter(panel), simulated_run.interval(panel))
    columns = _columns(simulated_run.influx.raw_query(query, simulated_run.db))
    assert columns, f"panel {panel['title']!r} ({key}) returned no data: {query}"
    empty = sorted(c for c, n in columns.items() if n == 0)
    assert not empty, f"panel {panel['title']!r} ({key}): no value in column(s) {empty}: {query}"


@pytest.mark.parametrize("annotation", _influx_annotations(), ids=[a["name"] for a in _influx_annotations()])
def test_annotation_query_returns_events_with_their_columns(
    simulated_run: SimulatedRun, all_selected: dict[str, str], annotation: dict[str, Any]
) -> None:
    query = _interpolate(_annotation_query(annotation), all_selected, simulated_run.time_filter())
    rows = simulated_run.influx.query(query, simulated_run.db)
    assert rows, f"annotation {annotation['name']!r} returned nothing: {query}"
    columns = [annotation.get("textColumn", ""), *annotation.get("tagsColumn", "").split(",")]
    for column in filter(None, (c.strip() for c in columns)):
        assert all(row.get(column) not in (None, "") for row in rows), f"column {column!r} missing: {query}"
    if 'FROM "anomaly"' in query:
        assert {r["machine"] for r in rows} >= {"m004", "m007"}, "the injected spike and stuck sensor"


def test_every_query_runs_with_one_value_selected(simulated_run: SimulatedRun) -> None:
    """The first option of every variable (one site, line, machine): every query is still valid InfluxQL."""
    chosen = simulated_run.variables(select="first")
    assert not any(v.startswith("(") for v in chosen.values()), chosen
    for _key, panel, target in _panel_targets():
        query = _interpolate(target["query"], chosen, simulated_run.time_filter(panel), simulated_run.interval(panel))
        simulated_run.influx.raw_query(query, simulated_run.db)  # raises on any InfluxQL error
    for annotation in _influx_annotations():
        simulated_run.influx.raw_query(
            _interpolate(_annotation_query(annotation), chosen, simulated_run.time_filter()), simulated_run.db)


# --- the README's example queries -------------------------------------------------------------------------------
def _readme_influxql() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## InfluxDB schema"):]
    block = section[section.index("```sql\n") + 7:]
    return [q for q in block[:block.index("```")].splitlines() if q.strip()]


def test_readme_influxql_examples_return_data(simulated_run: SimulatedRun) -> None:
    queries = _readme_influxql()
    assert len(queries) >= 5
    for q in queries:
        rows = simulated_run.influx.query(q, simulated_run.db)
        assert rows, f"README example returned nothing after the simulated run: {q}"
