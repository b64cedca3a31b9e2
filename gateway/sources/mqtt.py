"""MQTT source adapter (aiomqtt 2.x over paho-mqtt 2.x).

aiomqtt owns the connection lifecycle (connect, subscribe, keepalive, disconnect errors); messages are
taken straight from paho's ``on_message`` callback and handed to the pipeline without a queue hop or a
``Message`` copy, and acknowledged manually (``manual_ack_set``) only once the pipeline says the points
are durable. Acks go out in arrival order; acks for a previous connection are dropped (the broker
redelivers those messages, and device timestamps make the rewrite idempotent).

Every access to a private aiomqtt/paho attribute is one of the ``_paho_*`` helpers below, and
``tests/unit/test_mqtt_private.py`` pins them against the installed versions: an upgrade that renames
one fails there, not in production.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import struct
import time
from collections.abc import Sequence
from typing import Any

import aiomqtt
from paho.mqtt.client import PUBACK, MQTTMessage
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.batch import AckToken
from gateway.config import MqttConfig
from gateway.sources import MessageCallback
from gateway.sources.mqtt_frame import MalformedPacket, PacketFramer, Publish
from gateway.stats import MqttSnapshot

__all__ = ["PAHO_PRIVATE", "MqttSource"]

log = logging.getLogger("gateway.sources.mqtt")

_PUBACK = struct.Struct("!BBH")  # PUBACK, remaining length 2, message id (MQTT 3.1.1 and 5: success)


# -- the private aiomqtt/paho attributes the adapter relies on (and only here) ---------------------------
# (owner, attribute): what tests/unit/test_mqtt_private.py checks on the installed versions.
PAHO_PRIVATE = (
    ("aiomqtt.Client", "_client"),  # the paho client: manual acks, direct on_message, publish from a callback
    ("aiomqtt.Client", "_disconnected"),  # future resolved when the connection drops
    ("paho.Client", "_handle_on_message"),  # per-message dispatch, replaced by a direct call
    ("paho.Client", "_packet_queue"),  # queue raw bytes: many PUBACKs in one write
    ("paho.MQTTMessage", "_topic"),  # raw topic bytes, when they are not UTF-8
    ("paho.Client", "_sock"),  # fast receive: the connected socket, read in whole chunks
    ("paho.Client", "_in_packet"),  # fast receive: paho's partial-packet state, taken over at the switch
    ("paho.Client", "_packet_handle"),  # fast receive: non-PUBLISH packets handed back to paho
    ("paho.Client", "_loop_rc_handle"),  # fast receive: connection lost / protocol error, as paho does it
    ("paho.Client", "_last_bytes_received"),  # keepalive time: fast receive sets it, the stall watchdog reads it
)

_READ = 256 * 1024  # bytes per socket read on the fast path
_TRICKLE = 64 * 1024  # a read of less is a trickle: the next waits [mqtt] read_coalesce_ms


def _paho_of(client: aiomqtt.Client) -> PahoClient:
    return client._client


def _paho_disconnected(client: aiomqtt.Client) -> asyncio.Future[Any]:
    return client._disconnected


def _paho_deliver_to(paho: PahoClient, deliver: Any) -> None:
    # Per message, paho matches the topic against per-topic callbacks (we register none) and logs
    # every packet; both cost more than our decode. Deliver straight to the pipeline instead.
    paho._handle_on_message = deliver  # type: ignore[method-assign]


def _paho_queue_pubacks(paho: PahoClient, blob: bytes) -> None:
    # paho queues and sends each PUBACK on its own (a wake-up write and a send per message);
    # one queued blob of PUBACK packets is the same bytes on the wire, sent in one go.
    paho._packet_queue(PUBACK, blob, 0, 0)


def _paho_last_bytes_in(paho: PahoClient) -> float:
    # paho 2.x's time (its time_func, time.monotonic) of the last bytes read, also set when it sends a
    # PINGREQ; the fast path keeps it current (_paho_bytes_received)
    return float(paho._last_bytes_received)


def _paho_raw_topic(msg: MQTTMessage) -> bytes:
    return bytes(msg._topic)


def _paho_socket(paho: PahoClient) -> Any:
    return paho._sock


def _paho_take_partial(paho: PahoClient) -> bytes:
    # paho reads a packet in pieces: the bytes of the one it is in the middle of, as they came off the
    # wire (command, remaining-length bytes, body so far), so the framer continues where paho stopped
    inp = paho._in_packet
    if inp["command"] == 0:
        return b""
    partial = bytes([inp["command"], *inp["remaining_count"]]) + bytes(inp["packet"])
    _paho_reset_reader(paho)
    return partial


def _paho_reset_reader(paho: PahoClient) -> None:
    paho._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                       "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}


def _paho_handle_raw(paho: PahoClient, raw: bytes) -> int:
    # one complete packet framed by us, processed by paho exactly as if its own reader had read it
    i = 1
    while raw[i] & 0x80:
        i += 1
    body = bytearray(raw[i + 1:])
    paho._in_packet = {"command": raw[0], "have_remaining": 1, "remaining_count": list(raw[1:i + 1]),
                       "remaining_mult": 1, "remaining_length": len(body), "packet": body,
                       "to_process": 0, "pos": 0}
    try:
        rc = int(paho._packet_handle())
    except Exception as exc:  # paho's MalformedPacket, as its _packet_read maps it
        log.warning("broker packet 0x%02x refused by paho: %s", raw[0], exc)
        rc = int(MQTTErrorCode.MQTT_ERR_PROTOCOL)
    finally:
        _paho_reset_reader(paho)
    return rc


def _paho_lost(paho: PahoClient, rc: MQTTErrorCode) -> None:
    paho._loop_rc_handle(rc)


def _paho_bytes_received(paho: PahoClient) -> None:
    paho._last_bytes_received = time.monotonic()  # paho's time_func: its keepalive pings read this


class MqttSource:
    """Subscribes, feeds every message to ``on_message`` and acknowledges on request."""

    def __init__(self, cfg: MqttConfig, on_message: MessageCallback) -> None:
        self.cfg = cfg
        self.on_message = on_message
        self.generation = 0
        self.connected = asyncio.Event()
        self.connects = 0
        self.messages = 0
        self.last_error: str | None = None  # why the last connection failed or ended (readiness shows it)
        self._paho: PahoClient | None = None
        self._subscribed: dict[str, int] = {}  # filter -> QoS on the live connection
        self._unsubscribe: set[str] = set()  # filters dropped by a reload, still in the broker's session
        self._changed = asyncio.Event()  # a reload changed self.cfg
        self._will: aiomqtt.Will | None = None
        self._birth: tuple[str, bytes, int, bool] | None = None  # published after each subscribe
        self.published = 0
        self.fast = False  # the fast receive path reads the live connection
        self.fast_connects = 0  # connections the fast path took over
        self.coalesced = 0  # reads the fast path put off to take more at once

    # -- acking ---------------------------------------------------------------------------------
    def ack(self, tokens: Sequence[AckToken]) -> int:
        """Acknowledge ``tokens`` (arrival order) on the current connection; return how many went out."""
        paho = self._paho
        if paho is None:
            return 0
        gen = self.generation
        pubacks = []
        sent = 0
        for tok in tokens:
            if tok.generation != gen or tok.qos == 0:
                continue
            if tok.qos == 1:
                pubacks.append(_PUBACK.pack(PUBACK, 2, tok.mid))
            else:
                if pubacks:  # keep arrival order across QoS levels
                    _paho_queue_pubacks(paho, b"".join(pubacks))
                    pubacks = []
                paho.ack(tok.mid, tok.qos)
            sent += 1
        if pubacks:
            _paho_queue_pubacks(paho, b"".join(pubacks))
        return sent

    # -- publishing -----------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Queue one message on the live connection; False when there is none (nothing is kept for later).

        Synchronous, so a decoder can answer from the message callback (paho's publish only queues).
        """
        paho = self._paho
        if paho is None:
            return False
        info = paho.publish(topic, payload, qos=qos, retain=retain)
        ok = info.rc == 0
        self.published += ok
        return ok

    def will(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True, birth: bytes | None = None
    ) -> None:
        """Set the Will of the next connections; ``birth`` goes out on ``topic`` after each subscribe."""
        self._will = aiomqtt.Will(topic, payload, qos=qos, retain=retain)
        self._birth = (topic, birth, qos, retain) if birth is not None else None

    # -- connection -----------------------------------------------------------------------------
    def _client(self, cfg: MqttConfig) -> aiomqtt.Client:
        v5 = cfg.protocol == "5"
        props: Properties | None = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if cfg.clean_session else cfg.session_expiry_s
            props.ReceiveMaximum = cfg.receive_maximum
        tls_context: ssl.SSLContext | None = None
        if cfg.tls is not None:
            tls_context = ssl.create_default_context(cafile=str(cfg.tls.ca_file) if cfg.tls.ca_file else None)
            if cfg.tls.cert_file is not None and cfg.tls.key_file is not None:
                tls_context.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
            if cfg.tls.insecure:
                tls_context.check_hostname = False
        kwargs: dict[str, Any] = {}
        if v5:
            kwargs["clean_start"] = cfg.clean_session
            kwargs["properties"] = props
        else:
            kwargs["clean_session"] = cfg.clean_session
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            identifier=cfg.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password else None,
            keepalive=cfg.keepalive_s,
            tls_context=tls_context,
            timeout=10,
            will=self._will,
            **kwargs,
        )
        paho = _paho_of(client)  # the adapter owns paho: manual acks, direct callback
        paho.manual_ack_set(True)
        _paho_deliver_to(paho, self._deliver)
        if not log.isEnabledFor(logging.DEBUG):
            paho.disable_logger()
        return client

    def _deliver(self, msg: MQTTMessage) -> None:
        self.messages += 1
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # brokers refuse these; if one slips through, the decoder rejects it
            topic = _paho_raw_topic(msg).decode("utf-8", "backslashreplace")
        token = AckToken(msg.mid, msg.qos, self.generation) if msg.qos > 0 else None
        self.on_message(topic, msg.payload if type(msg.payload) is bytes else bytes(msg.payload), token)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, subscribe and keep reconnecting (capped backoff with jitter) until ``stop``."""
        attempt = 0
        while not stop.is_set():
            applied = self.cfg  # the settings this connection is made with; a reload may change self.cfg
            try:
                client = self._client(applied)
                # before connecting: a persistent session's queued messages follow the CONNACK at once,
                # and their tokens must carry this connection's generation to be acked on it
                self.generation += 1
                self._paho = _paho_of(client)
                async with client:
                    self.connects += 1
                    if applied.fast_receive:  # at once: a session's backlog follows the CONNACK, before any SUBACK
                        self._take_over_reads(applied)
                    attempt = 0
                    subs: list[tuple[str, int]] = [(s.topic, s.qos or 0) for s in applied.subscriptions()]
                    await client.subscribe(subs)
                    self._subscribed = dict(subs)
                    log.info("connected to %s:%d, subscribed to %s", applied.host, applied.port, subs)
                    if self._birth is not None:  # after subscribing, as a Sparkplug host must
                        topic, payload, qos, retain = self._birth
                        await client.publish(topic, payload, qos=qos, retain=retain)
                    self.connected.set()
                    await self._until_disconnected(client, stop, applied)
            except aiomqtt.MqttError as exc:
                error: aiomqtt.MqttError | None = exc
            else:
                error = None
            finally:  # before any back-off: acks for this connection must not go out any more
                self.connected.clear()
                self._paho = None
                self.fast = False
            if error is None or stop.is_set():
                continue
            attempt += 1
            self.last_error = str(error)
            delay = random.uniform(0.5, 1.0) * min(self.cfg.reconnect_max_s, 0.5 * 2 ** min(attempt, 10))
            log.warning("MQTT connection to %s:%d lost or refused (%s); retry in %.1f s",
                        applied.host, applied.port, error, delay)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    # -- fast receive ---------------------------------------------------------------------------
    def _take_over_reads(self, applied: MqttConfig) -> None:
        """Replace aiomqtt's reader (paho's one-packet-at-a-time ``loop_read``) by :meth:`_fast_read`."""
        paho = self._paho
        if paho is None or _paho_socket(paho) is None:
            return
        sock = _paho_socket(paho)
        loop = asyncio.get_running_loop()
        framer = PacketFramer(v5=applied.protocol == "5")
        fd = sock.fileno()
        loop.remove_reader(fd)  # the loop runs no reader in between: paho's state is final here
        framer.feed(_paho_take_partial(paho))  # never a whole packet (paho would have handled it)
        loop.add_reader(fd, self._fast_read, paho, sock, framer)
        self.fast = True
        self.fast_connects += 1
        log.info("fast receive on (whole socket reads, %d KiB)", _READ // 1024)

    def _fast_read(self, paho: PahoClient, sock: Any, framer: PacketFramer) -> None:
        """One readable event: read what is there, frame it, deliver PUBLISHes, give the rest to paho; after a
        trickle, stop reading for ``read_coalesce_ms`` (the kernel keeps what arrives meanwhile; a reload's
        value applies at the next read)."""
        chunks = []
        try:
            while True:
                data = sock.recv(_READ)
                if not data:
                    break
                chunks.append(data)
                pending = getattr(sock, "pending", None)  # TLS: decrypted bytes the kernel no longer flags
                if pending is None or not pending():
                    break
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except OSError as exc:
            log.warning("MQTT socket read failed: %s", exc)
            _paho_lost(paho, MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return
        if not chunks:  # readable with nothing to read: the broker closed the connection
            _paho_lost(paho, MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return
        _paho_bytes_received(paho)
        try:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            packets = framer.feed(data)
        except MalformedPacket as exc:
            log.warning("malformed packet from the broker (%s); reconnecting", exc)
            _paho_lost(paho, MQTTErrorCode.MQTT_ERR_PROTOCOL)
            return
        on_message = self.on_message
        gen = self.generation
        delivered = 0
        for pkt in packets:
            if isinstance(pkt, Publish):
                try:
                    topic = pkt.topic.decode()
                except UnicodeDecodeError:  # the decoder rejects it with the topic shown
                    topic = pkt.topic.decode("utf-8", "backslashreplace")
                delivered += 1
                on_message(topic, pkt.payload, AckToken(pkt.mid, 1, gen) if pkt.qos else None)
            else:
                rc = _paho_handle_raw(paho, pkt)
                if rc:
                    self.messages += delivered
                    _paho_lost(paho, MQTTErrorCode(rc))
                    return
                if self._paho is not paho:  # paho dropped the connection (e.g. DISCONNECT)
                    break
        self.messages += delivered
        pause = self.cfg.read_coalesce_ms
        if pause > 0.0 and len(data) < _TRICKLE and self._paho is paho:
            loop = asyncio.get_running_loop()
            fd = sock.fileno()
            loop.remove_reader(fd)
            self.coalesced += 1
            loop.call_later(pause / 1000.0, self._resume_reads, paho, sock, framer, fd)

    def _resume_reads(self, paho: PahoClient, sock: Any, framer: PacketFramer, fd: int) -> None:
        """Read again after a pause, if the connection paused is still the live one (else its successor's
        reader is in place, or none is needed)."""
        if self._paho is paho and self.fast and _paho_socket(paho) is sock and sock.fileno() == fd:
            asyncio.get_running_loop().add_reader(fd, self._fast_read, paho, sock, framer)

    async def _until_disconnected(self, client: aiomqtt.Client, stop: asyncio.Event, applied: MqttConfig) -> None:
        """Wait for ``stop``, a disconnect or a reload; the watchdog reconnects a connection that went silent.

        Returns (so the caller reconnects at once) when a reload changed how to connect.
        """
        disconnected = _paho_disconnected(client)
        stop_task: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            while True:
                self._changed.clear()
                if await self._sync(client, applied):  # also catches a reload made while connecting
                    log.info("reconnecting to apply the reloaded [mqtt] settings")
                    return
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    done, _ = await asyncio.wait(
                        {stop_task, disconnected, changed}, timeout=min(5.0, self.cfg.stall_timeout_s),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    changed.cancel()
                if stop_task in done:
                    return
                if disconnected in done:
                    exc = disconnected.exception()
                    raise aiomqtt.MqttError(f"disconnected: {exc}")
                # paho records the last bytes of any packet (PINGRESP too): silence means a stall.
                last = _paho_last_bytes_in(_paho_of(client))
                if last and time.monotonic() - last > max(self.cfg.stall_timeout_s, 2.5 * self.cfg.keepalive_s):
                    raise aiomqtt.MqttError("connection stalled (no packets from the broker); reconnecting")
        finally:
            stop_task.cancel()

    # -- reload ---------------------------------------------------------------------------------
    _CONNECTION_KEYS = frozenset({
        "host", "port", "client_id", "protocol", "clean_session", "session_expiry_s", "receive_maximum",
        "keepalive_s", "username", "password", "password_file", "tls",
    })

    def snapshot(self) -> MqttSnapshot:
        """The connection for :mod:`gateway.stats`."""
        return MqttSnapshot(
            host=self.cfg.host, port=self.cfg.port, connected=self.connected.is_set(), messages=self.messages,
            reconnects=max(0, self.connects - 1), last_error=self.last_error,
        )

    def reconfigure(self, cfg: MqttConfig) -> None:
        """Take reloaded ``[mqtt]`` settings; the connection task applies them (:meth:`_sync`).

        Filters a reload removes are unsubscribed explicitly, because a persistent session keeps them
        at the broker across reconnects. A reconnect loses nothing: unacknowledged messages are
        redelivered by the broker.
        """
        old, self.cfg = self.cfg, cfg
        topics = {s.topic for s in cfg.subscriptions()}
        self._unsubscribe |= {s.topic for s in old.subscriptions()} - topics
        self._unsubscribe -= topics
        self._changed.set()

    async def _sync(self, client: aiomqtt.Client, applied: MqttConfig) -> bool:
        """Bring the live connection's subscriptions to ``self.cfg``; True if it must reconnect instead."""
        if self._unsubscribe:
            topics = sorted(self._unsubscribe)
            try:
                await client.unsubscribe(topics)
            except aiomqtt.MqttError as exc:
                log.warning("could not unsubscribe from %s (retried at the next connection): %s", topics, exc)
            else:
                self._unsubscribe.difference_update(topics)
                for t in topics:
                    self._subscribed.pop(t, None)
                log.info("unsubscribed from %s", topics)
        want = {s.topic: s.qos or 0 for s in self.cfg.subscriptions()}
        added: list[tuple[str, int]] = [(t, q) for t, q in want.items() if self._subscribed.get(t) != q]
        if added:  # at once, even when a reconnect follows: nothing published meanwhile is missed
            try:
                await client.subscribe(added)
            except aiomqtt.MqttError as exc:  # the next connection subscribes the whole list
                log.warning("could not subscribe to %s after the reload: %s", added, exc)
            else:
                self._subscribed.update(added)
                log.info("subscribed to %s", added)
        return any(getattr(self.cfg, k) != getattr(applied, k) for k in self._CONNECTION_KEYS)
