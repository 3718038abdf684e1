"""Integrations with third-party Django packages, each importable only with its package."""
