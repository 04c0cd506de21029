"""Bridges to other tools. Each module imports its tool, so import only the one you use."""
