"""Streaming, vectorised anomaly detectors: per-series state in flat numpy arrays, one batch at a time."""

from gateway.detect.base import BatchLayout, Detector, squash
from gateway.detect.config import DETECTOR_NAMES, DetectionConfig, DetectRule, ResolvedProfile
from gateway.detect.cusum import CusumDetector
from gateway.detect.ewma import EwmaDetector
from gateway.detect.flatline import FlatlineDetector
from gateway.detect.fusion import (
    DETECTOR_CLASSES,
    EVENT_NAMES,
    AnomalyEngine,
    AnomalyEvents,
    make_detector,
)
from gateway.detect.robust import RobustDetector
from gateway.detect.spike import SpikeDetector
from gateway.detect.western_electric import WesternElectricDetector

__all__ = [
    "DETECTOR_CLASSES",
    "DETECTOR_NAMES",
    "EVENT_NAMES",
    "AnomalyEngine",
    "AnomalyEvents",
    "BatchLayout",
    "CusumDetector",
    "DetectRule",
    "DetectionConfig",
    "Detector",
    "EwmaDetector",
    "FlatlineDetector",
    "ResolvedProfile",
    "RobustDetector",
    "SpikeDetector",
    "WesternElectricDetector",
    "make_detector",
    "squash",
]
