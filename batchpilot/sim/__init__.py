"""Discrete-event simulation of the real scheduler and controllers on hardware we do not have."""
