"""Shipped scenario configs, training presets and latency profiles (YAML package data)."""
