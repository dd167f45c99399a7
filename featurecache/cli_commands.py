"""Imports every module that registers commands on the CLI app (one line per stage)."""
