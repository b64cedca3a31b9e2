"""bench/publisher.py's mosquitto_pub publishers against the real broker: every message, in order per topic."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.scripts import load_script
from tests.servers import Mosquitto

bench = load_script("bench/publisher.py", "bench_publisher")


def test_mosquitto_pub_publishers_deliver_every_message_in_order(tmp_path: Path, mosquitto: Mosquitto) -> None:
    topics = [f"bench-mqpub/m{i}/telemetry" for i in range(5)]
    msgs = [(topics[i % 5], b'{"seq": %d}' % i) for i in range(500)]
    client = ["mosquitto_sub", "-p", str(mosquitto.port), "-i", "test-bench-mqpub", "-t", "bench-mqpub/#"]
    session = [*client, "-c", "-q", "1"]
    subprocess.run([*session, "-E"], check=True, timeout=30)  # the session queues what comes before it reads
    sub = subprocess.Popen([*session, "-v", "-C", "500", "-W", "60"], stdout=subprocess.PIPE)
    try:
        res = bench.publish_mosquitto_pub(mosquitto.port, msgs, tmp_path, 2)  # 2 processes: 3 and 2 topics
        out, _ = sub.communicate(timeout=60)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
        subprocess.run([*client, "-E"], check=True, timeout=30)  # a clean connect ends the session
    assert res.messages == 500
    assert res.last_ack >= res.first_publish
    got = [tuple(line.split(" ", 1)) for line in out.decode().splitlines()]
    assert sorted(got) == sorted((t, p.decode()) for t, p in msgs)
    for topic in topics:
        assert [p for t, p in got if t == topic] == [p.decode() for t, p in msgs if t == topic]
