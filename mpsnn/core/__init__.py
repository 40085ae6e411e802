"""Devices, command buffers, enums, structs, errors, padding rules and kernel base classes."""
