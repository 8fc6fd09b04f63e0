"""Shared helpers for tests: test PKI, real upstream servers, process management."""
