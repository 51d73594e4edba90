"""Sensing: sensors, the sampler, and report by exception (field connectors go here too)."""
