"""Sandbox tiers behind one interface (sandboxd.tiers.base.Backend)."""
