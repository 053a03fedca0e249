"""Accounting (parameters, FLOPs, memory), scaling-law fits and plots."""
