"""Secrets for credential injection: reference syntax, stores, injection (issue 3)."""
