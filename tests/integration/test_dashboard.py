"""Every InfluxQL query of the shipped Grafana dashboard runs against the real InfluxDB 1.x."""

from __future__ import annotations

import json
import time

from tests.gwproc import ROOT
from tests.servers import InfluxDB1


def _queries() -> list[tuple[str, str]]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "factory-gateway.json").read_text())
    out = [("templating", v["query"]) for v in dash["templating"]["list"]]
    for panel in dash["panels"]:
        out.extend((panel["title"], t["query"]) for t in panel["targets"])
    return out


def test_dashboard_queries_run(influx_db: tuple[InfluxDB1, str]) -> None:
    influx, db = influx_db
    ts = int(time.time() - 600) * 10**9
    tags = "area=a,line=l,machine=m1,site=s"
    influx.write(db, "\n".join([
        f"telemetry,{tags} spindle_temp_c=61.5,vibration_mm_s=2.5 {ts}",
        f'machine_state,{tags} state="RUNNING" {ts}',
        f"production,{tags} total=10i,good=9i {ts}",
        f"production,{tags} total=30i,good=28i {ts + 120 * 10**9}",
        f"oee,{tags},window=1h availability=0.9,performance=0.8,quality=0.95,oee=0.684 {ts}",
        f"oee,{tags},window=1m availability=0.9,performance=0.8,quality=0.95,oee=0.684 {ts}",
        f"anomaly,{tags},metric=spindle_temp_c,detector=fused score=0.99,value=90.0,expected=61.0,zscore=7.5 {ts}",
        f"vibration_features,{tags},metric=accel_g rms=1.2,peak=3.0,crest_factor=2.5,kurtosis=3.1,zone=\"B\" {ts}",
        f"gateway_stats,instance=i messages_in=5i,points_written=9i,decode_errors=0i,write_errors=0i,"
        f"wal_bytes=0i,batch_latency_ms=3.5 {ts}",
        f"gateway_stats,instance=i messages_in=50i,points_written=90i {ts + 120 * 10**9}",
    ]))
    for title, q in _queries():
        q = (q.replace("$machine", ".*").replace("$timeFilter", "time > now() - 1d")
              .replace("$__interval", "1m"))
        rows = influx.query(q, db)
        assert rows, f"dashboard query of {title!r} returned nothing: {q}"
