"""Workflows behind the commands (ingest, retrain, onboard, recommend), shared by the CLI and the evaluation."""
