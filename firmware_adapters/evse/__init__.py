"""Charger control (IEC 61851-1): the Charger base, Modbus register maps, drivers."""
