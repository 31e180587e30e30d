"""Matchers (semantic OT and baselines), assignment, and flow graphs across layers."""
