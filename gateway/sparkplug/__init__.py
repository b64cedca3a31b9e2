"""Sparkplug B (Eclipse Sparkplug 3.0) host application: births, aliases, sequence, rebirth, STATE.

Enabled by a subscription with ``format = "sparkplug"``; :mod:`gateway.sparkplug.decode` holds the
decoder, ``sparkplug_b.proto`` the schema (``sparkplug_b_pb2.py`` is generated from it).
"""

from __future__ import annotations

from gateway.sparkplug.decode import DataType, SparkplugDecoder, host_state_payloads, rebirth_payload

__all__ = ["DataType", "SparkplugDecoder", "host_state_payloads", "rebirth_payload"]
