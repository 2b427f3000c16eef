"""Fixtures for the OBD driver tests: the real peers live in peers.py."""

from tests.firmware_adapters.obd.peers import elm_port, slcan_port

__all__ = ["elm_port", "slcan_port"]
