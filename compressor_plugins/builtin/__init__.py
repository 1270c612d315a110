"""Squint's built-in compressors, one file each, registered like any plugin."""
