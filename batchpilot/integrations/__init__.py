"""Adapters that bring batchpilot's controllers into other engines."""
