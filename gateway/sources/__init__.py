"""Sources: where messages come from. aiomqtt/paho live only in :mod:`gateway.sources.mqtt`."""
