"""Versioned allowlist presets (YAML), shipped as package data of egress_guard.allowlists."""
