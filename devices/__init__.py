"""Devices for factory-gateway: a seeded machine-fleet simulator and a Raspberry Pi sensor agent.

Both publish the wire contract in :mod:`gateway.schema` on
``<root>/<site>/<area>/<line>/<machine>/{telemetry,state,count}``.
"""

from devices.fleet import (
    BrokerAddress,
    Fleet,
    FleetSummary,
    MqttPublisher,
    PublishError,
    fleet_layout,
    run_fleet,
)
from devices.machine import (
    Emission,
    FaultKind,
    FaultPlan,
    FaultRecord,
    Machine,
    MachineSpec,
    ScheduledFault,
    encode_payload,
)

__all__ = [
    "BrokerAddress",
    "Emission",
    "FaultKind",
    "FaultPlan",
    "FaultRecord",
    "Fleet",
    "FleetSummary",
    "Machine",
    "MachineSpec",
    "MqttPublisher",
    "PublishError",
    "ScheduledFault",
    "encode_payload",
    "fleet_layout",
    "run_fleet",
]
