"""Measurement: ranking metrics, baselines, and the cold-start protocol (COLDSTART_PROTOCOL.md)."""
