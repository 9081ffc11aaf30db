"""Measurement: ranking metrics, baselines, and the cold-start protocol (docs/protocol.md)."""
