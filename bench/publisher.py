"""Fast QoS 1 publishers and a counting subscriber for the end-to-end benches.

The publisher speaks MQTT 3.1.1 over a plain socket: PUBLISH packets are built before the clock starts
and sent in large ``sendall`` chunks with a window of unacknowledged messages (PUBACKs are counted by a
reader thread), so a publisher process spends almost no CPU per message and does not compete with the
gateway on a 2-core box the way a paho publisher would. Several processes can publish at once.

``publish_mosquitto_pub`` plays the devices with the C client instead (Debian's ``mosquitto_pub -l``, one
process per machine by default, stdin from files written before the clock starts), as issue 14 measured.

The counting subscriber is plain paho (MQTT 5, QoS 1, auto-ack, Receive Maximum 20,000 like the gateway)
doing nothing but counting: the ceiling the gateway is compared with.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

__all__ = [
    "CountingSubscriber",
    "PublishResult",
    "RawPublisher",
    "fixed_rate_messages",
    "machine_topics",
    "mosquitto_pub_groups",
    "mosquitto_pub_script",
    "publish_mosquitto_pub",
    "publish_parallel",
    "telemetry_messages",
]

Message = tuple[str, bytes]


def machine_topics(n: int, channel: str = "telemetry") -> list[str]:
    return [f"factory/plant1/area{i // 10 + 1}/line{i % 2 + 1}/m{i + 1:04d}/{channel}" for i in range(n)]


def telemetry_messages(count: int, machines: int, base_ts: float, seed: int = 0) -> list[Message]:
    """One-sample JSON messages, round-robin over machines, 1 ms apart per machine (unique per series)."""
    rng = np.random.default_rng(seed)
    topics = machine_topics(machines)
    temp = np.round(60 + rng.standard_normal(count), 3).tolist()
    vib = np.round(2 + 0.1 * rng.standard_normal(count), 3).tolist()
    out = []
    for i in range(count):
        seq = i // machines
        ts = round(base_ts + seq * 0.001, 6)
        body = orjson.dumps({"ts": ts, "seq": seq, "values": {"temp_c": temp[i], "vib": vib[i]}})
        out.append((topics[i % machines], body))
    return out


def fixed_rate_messages(count: int, machines: int, base_ts: float, samples: int = 1000,
                        seed: int = 0) -> list[Message]:
    """``{"t0", "dt": 0.001, "values": {"accel_g": [samples floats]}}``; consecutive blocks per machine."""
    rng = np.random.default_rng(seed)
    topics = machine_topics(machines)
    out = []
    for i in range(count):
        k = i // machines
        vals = np.round(rng.standard_normal(samples) * 0.5, 4)
        body = orjson.dumps({"t0": base_ts + k * samples * 0.001, "dt": 0.001, "values": {"accel_g": vals}},
                            option=orjson.OPT_SERIALIZE_NUMPY)
        out.append((topics[i % machines], body))
    return out


# -- MQTT 3.1.1 framing ----------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _connect_packet(client_id: str) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + _utf8(client_id)  # clean, no keepalive
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    var = _utf8(topic) + struct.pack("!H", packet_id)
    return b"\x32" + _varint(len(var) + len(payload)) + var + payload


@dataclass(slots=True)
class PublishResult:
    messages: int
    first_publish: float  # wall clock (time.time())
    last_ack: float

    @property
    def rate(self) -> float:
        return self.messages / max(self.last_ack - self.first_publish, 1e-9)


class RawPublisher:
    """One MQTT 3.1.1 connection publishing pre-built QoS 1 packets with a window of unacked messages."""

    def __init__(self, port: int, client_id: str, *, host: str = "127.0.0.1", window: int = 20000) -> None:
        assert window < 65535  # packet ids are never reused while in flight
        self.window = window
        self.sock = socket.create_connection((host, port))
        self.sock.sendall(_connect_packet(client_id))
        connack = self._recv_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"CONNACK refused: {connack!r}")
        self.acked = 0
        self.last_ack = 0.0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_acks, daemon=True)
        self._reader.start()
        self._next_id = 0

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def _read_acks(self) -> None:
        carry = 0
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            if data[0] != 0x40 and carry == 0:
                raise RuntimeError(f"unexpected packet from broker: {data[:8]!r}")
            total = carry + len(data)  # only PUBACKs (4 bytes each) come back on this connection
            n, carry = divmod(total, 4)
            with self._cond:
                self.acked += n
                self.last_ack = time.time()
                self._cond.notify_all()

    def ids(self, n: int) -> list[int]:
        out = [(self._next_id + i) % 65535 + 1 for i in range(n)]
        self._next_id = (self._next_id + n) % 65535
        return out

    def build(self, messages: Sequence[Message]) -> list[bytes]:
        return [publish_packet(t, p, pid) for (t, p), pid in zip(messages, self.ids(len(messages)), strict=True)]

    def send_all(self, packets: Sequence[bytes], chunk: int = 256) -> PublishResult:
        """Send pre-built packets as fast as the window allows; return when every one is acknowledged."""
        sent = 0
        first = time.time()
        n = len(packets)
        while sent < n:
            k = min(chunk, n - sent)
            with self._cond:
                while sent + k - self.acked > self.window:
                    self._cond.wait()
            self.sock.sendall(b"".join(packets[sent:sent + k]))
            sent += k
        self.wait_acked(n)
        return PublishResult(n, first, self.last_ack)

    def send_now(self, packets: Sequence[bytes]) -> None:
        self.sock.sendall(b"".join(packets))

    def wait_acked(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.acked < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"only {self.acked} of {n} PUBACKs within {timeout} s")
                self._cond.wait(left)

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self.sock.close()


def _publisher_proc(port: int, idx: int, messages: list[Message], ready: Any, go: Any, results: Any) -> None:
    pub = RawPublisher(port, f"bench-pub-{idx}-{time.monotonic_ns()}")
    packets = pub.build(messages)
    ready.release()
    go.wait()
    res = pub.send_all(packets)
    pub.close()
    results.put((idx, res.messages, res.first_publish, res.last_ack))


def publish_parallel(port: int, messages: Sequence[Message], procs: int = 2,
                     before_go: Callable[[], None] | None = None) -> PublishResult:
    """Split ``messages`` over ``procs`` publisher processes, start them together, wait for every PUBACK.

    The packets are built before the start; the result spans the first publish to the last PUBACK.
    """
    ctx = mp.get_context("fork")
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    results = ctx.Queue()
    parts = [list(messages[i::procs]) for i in range(procs)]
    ps = [ctx.Process(target=_publisher_proc, args=(port, i, parts[i], ready, go, results), daemon=True)
          for i in range(procs)]
    for p in ps:
        p.start()
    try:
        for _ in ps:
            if not ready.acquire(timeout=120):
                raise RuntimeError("publisher processes did not get ready")
        if before_go is not None:
            before_go()
        go.set()
        got = [results.get(timeout=600) for _ in ps]
    finally:
        for p in ps:
            p.join(timeout=10)
            if p.is_alive() and p.pid is not None:
                p.kill()
    return PublishResult(sum(g[1] for g in got), min(g[2] for g in got), max(g[3] for g in got))


# -- mosquitto_pub publishers (the C client, as issue 14 measured) -------------------------------------------
def mosquitto_pub_groups(messages: Sequence[Message], procs: int | None = None) -> list[list[tuple[str, list[bytes]]]]:
    """The payloads by topic (each topic's order kept), topics dealt round-robin to ``procs`` publishers.

    ``mosquitto_pub -l`` publishes to one topic, so a publisher owns whole machines; ``None``: one each.

    >>> msgs = [("a", b"1"), ("b", b"2"), ("c", b"3"), ("a", b"4")]
    >>> mosquitto_pub_groups(msgs, 2)
    [[('a', [b'1', b'4']), ('c', [b'3'])], [('b', [b'2'])]]
    >>> [[t for t, _ in g] for g in mosquitto_pub_groups(msgs)]
    [['a'], ['b'], ['c']]
    """
    if procs is not None and procs < 1:
        raise ValueError(f"procs: {procs}; at least 1, or None for one process per topic")
    by_topic: dict[str, list[bytes]] = {}
    for topic, payload in messages:
        by_topic.setdefault(topic, []).append(payload)
    topics = list(by_topic.items())
    n = len(topics) if procs is None else min(procs, len(topics))
    return [topics[i::n] for i in range(n)]


def mosquitto_pub_script(port: int, files: Sequence[tuple[str, Path]], *, host: str = "127.0.0.1",
                         max_inflight: int | None = None) -> str:
    """The ``sh`` script of one publisher: one ``mosquitto_pub -q 1 -l`` per topic, one after another.

    The first connects at once but gets its lines (from its file, through ``cat``) only when the script's
    stdin, the start barrier, reaches end of file: mosquitto_pub sleeps 100 ms after its CONNACK before it
    reads, and again after its last PUBACK, so a second topic in the same script costs those 0.2 s.

    >>> print(mosquitto_pub_script(1883, [("t/a", Path("/d/a")), ("t/b", Path("/d/b"))], max_inflight=100))
    { cat >/dev/null; exec cat /d/a; } | mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -M 100 -t t/a -l \\
    && mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -M 100 -t t/b -l </d/b
    """
    base = ["mosquitto_pub", "-h", host, "-p", str(port), "-q", "1"]
    if max_inflight is not None:
        base += ["-M", str(max_inflight)]  # mosquitto_pub's default is 20 unacknowledged messages
    lines = []
    for i, (topic, path) in enumerate(files):
        cmd = shlex.join([*base, "-t", topic, "-l"])
        lines.append(f"{{ cat >/dev/null; exec cat {shlex.quote(str(path))}; }} | {cmd}" if i == 0
                     else f"&& {cmd} <{shlex.quote(str(path))}")
    return " \\\n".join(lines)


def _client_connections(port: int) -> int | None:
    """Established TCP connections to ``port`` on this host, seen from the client side (None: unknown)."""
    try:
        rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    remote = f":{port:04X}"
    return sum(1 for r in rows if (f := r.split())[2].endswith(remote) and f[3] == "01")


def publish_mosquitto_pub(port: int, messages: Sequence[Message], workdir: Path, procs: int | None = None, *,
                          max_inflight: int | None = None, timeout: float = 600) -> PublishResult:
    """Publish ``messages`` with ``mosquitto_pub -q 1 -l`` processes started together; wait until all exit.

    Each process owns whole machines (``mosquitto_pub_groups``); every machine's payloads are written to a
    file under ``workdir`` before the clock starts, so Python costs no CPU while they publish. A process
    exits 0 only after its last PUBACK, so exit 0 everywhere means the broker took every message. The result
    spans the start barrier's release to the last exit (which includes mosquitto_pub's final 100 ms sleep).
    """
    if shutil.which("mosquitto_pub") is None:
        raise RuntimeError("mosquitto_pub not found (Debian's mosquitto-clients)")
    workdir.mkdir(parents=True, exist_ok=True)
    scripts = []
    for i, group in enumerate(mosquitto_pub_groups(messages, procs)):
        files = []
        for j, (topic, payloads) in enumerate(group):
            if any(b"\n" in p or not p for p in payloads):
                raise ValueError(f"{topic}: mosquitto_pub -l takes one non-empty payload per line")
            path = workdir / f"pub{i}-{j}.lines"
            path.write_bytes(b"\n".join(payloads) + b"\n")
            files.append((topic, path))
        scripts.append(mosquitto_pub_script(port, files, max_inflight=max_inflight))
    before = _client_connections(port)
    barrier_r, barrier_w = os.pipe()
    running: list[subprocess.Popen[bytes]] = []
    errs = [(workdir / f"pub{i}.err").open("wb") for i in range(len(scripts))]
    try:
        for script, err in zip(scripts, errs, strict=True):
            running.append(subprocess.Popen(["sh", "-c", script], stdin=barrier_r, stdout=subprocess.DEVNULL,
                                            stderr=err, start_new_session=True))
        os.close(barrier_r)
        barrier_r = -1
        deadline = time.monotonic() + 30
        while before is not None and time.monotonic() < deadline:
            now = _client_connections(port)
            if now is None or now >= before + len(scripts):
                break
            time.sleep(0.02)
        time.sleep(0.15)  # past mosquitto_pub's 100 ms sleep after the CONNACK: it waits in read(stdin)
        first = time.time()
        os.close(barrier_w)  # end of file on every script's stdin: they all start
        barrier_w = -1
        end = time.monotonic() + timeout
        for p in running:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        last = time.time()
    finally:
        for fd in (barrier_r, barrier_w):
            if fd >= 0:
                os.close(fd)
        for p in running:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the script's own group: its cat and mosquitto_pub too
                p.wait()
        for err in errs:
            err.close()
    failed = [(i, p.returncode) for i, p in enumerate(running) if p.returncode != 0]
    if failed:
        i, code = failed[0]
        text = (workdir / f"pub{i}.err").read_text(errors="replace")[-500:]
        raise RuntimeError(f"{len(failed)} mosquitto_pub script(s) failed, e.g. #{i} exit {code}: {text}")
    return PublishResult(len(messages), first, last)


# -- the counting subscriber (ceiling) --------------------------------------------------------------------
def _subscriber_proc(port: int, topic: str, expect: int, ready: Any, results: Any) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    state = {"n": 0, "bytes": 0, "first": 0.0, "last": 0.0}
    done = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        n = state["n"] + 1
        state["n"] = n
        state["bytes"] += len(msg.payload)
        if n == 1:
            state["first"] = time.time()
        if n >= expect:
            state["last"] = time.time()
            done.set()

    def on_subscribe(*_a: Any) -> None:
        ready.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 20000
    client.connect("127.0.0.1", port, clean_start=True, properties=props)
    client.subscribe(topic, qos=1)
    client.loop_start()
    cpu0 = time.process_time()
    done.wait(timeout=300)
    cpu = time.process_time() - cpu0
    client.loop_stop()
    client.disconnect()
    results.put((state["n"], state["bytes"], state["first"], state["last"], cpu))


class CountingSubscriber:
    """A paho subscriber in its own process that counts ``expect`` messages (QoS 1, auto-ack)."""

    def __init__(self, port: int, expect: int, topic: str = "factory/#") -> None:
        ctx = mp.get_context("fork")
        self._ready = ctx.Event()
        self._results = ctx.Queue()
        self.proc = ctx.Process(target=_subscriber_proc, args=(port, topic, expect, self._ready, self._results),
                                daemon=True)

    def start(self) -> CountingSubscriber:
        self.proc.start()
        if not self._ready.wait(timeout=30):
            self.stop()
            raise RuntimeError("counting subscriber did not subscribe")
        return self

    def result(self, timeout: float = 300) -> tuple[int, int, float, float, float]:
        """(messages, payload bytes, first arrival, last arrival, CPU seconds the process used while they
        arrived) once ``expect`` arrived (or timeout)."""
        res = self._results.get(timeout=timeout)
        self.proc.join(timeout=10)
        return res  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.is_alive() and self.proc.pid is not None:
            self.proc.kill()
            self.proc.join(timeout=5)
