"""Offloading: experts in host memory, a device expert cache, copies beside the compute."""
