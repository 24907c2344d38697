"""egress-guard: a default-deny, auditing, credential-swapping TLS egress proxy for AI agents."""

__version__ = "0.1.0"
