"""bench/publisher.py: splitting messages over mosquitto_pub processes and the script each one runs."""

from __future__ import annotations

import shlex
from pathlib import Path

from tests.scripts import load_script

bench = load_script("bench/publisher.py", "bench_publisher")


def messages(machines: int, per: int) -> list[tuple[str, bytes]]:
    """Round-robin over machines, as ``telemetry_messages`` sends them."""
    topics = bench.machine_topics(machines)
    return [(topics[i % machines], b'{"seq": %d}' % i) for i in range(machines * per)]


def test_each_process_owns_whole_machines_in_order() -> None:
    msgs = messages(50, 7)
    groups = bench.mosquitto_pub_groups(msgs, 4)
    assert len(groups) == 4
    assert sorted(len(g) for g in groups) == [12, 12, 13, 13]
    owned = [topic for g in groups for topic, _ in g]
    assert sorted(owned) == sorted(set(owned)) == sorted(bench.machine_topics(50))
    for g in groups:
        for topic, payloads in g:
            assert payloads == [p for t, p in msgs if t == topic]  # every message, in publish order


def test_one_process_per_machine_by_default_and_never_more() -> None:
    msgs = messages(5, 3)
    assert [len(g) for g in bench.mosquitto_pub_groups(msgs)] == [1] * 5
    assert [len(g) for g in bench.mosquitto_pub_groups(msgs, 50)] == [1] * 5


def test_script_waits_for_the_barrier_then_publishes_each_topic_qos1_from_its_file() -> None:
    files = [("factory/a/m1/telemetry", Path("/tmp/with space/m1.lines")), ("factory/a/m2/telemetry", Path("/d/m2"))]
    script = bench.mosquitto_pub_script(18830, files)
    first, second = script.split(" \\\n")
    barrier, cmd = first.split(" | ")
    assert barrier == "{ cat >/dev/null; exec cat '/tmp/with space/m1.lines'; }"
    assert shlex.split(cmd) == ["mosquitto_pub", "-h", "127.0.0.1", "-p", "18830", "-q", "1",
                                "-t", "factory/a/m1/telemetry", "-l"]
    assert shlex.split(second) == ["&&", "mosquitto_pub", "-h", "127.0.0.1", "-p", "18830", "-q", "1",
                                   "-t", "factory/a/m2/telemetry", "-l", "</d/m2"]
    assert "-M 100 -t" in bench.mosquitto_pub_script(1883, files[:1], max_inflight=100)
