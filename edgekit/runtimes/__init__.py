"""Runtimes: one file per backend. Vendor SDKs are imported inside their functions."""
