"""Tests of firmware_adapters.modbus."""
