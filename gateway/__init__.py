"""factory-gateway: MQTT in, anomaly scores and OEE computed in numpy, InfluxDB out."""

__version__ = "0.1.0"
