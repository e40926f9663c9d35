"""Continual segmentation benchmark harness: data, engine, metrics, results store, reports.

Nothing is imported or scanned at import time; every registry is explicit.
"""

__version__ = "0.1.0"
