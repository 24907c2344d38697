"""The console (`egress-guard console`): a small web UI over the store — live decisions,
spend, denials, approvals, agents — for a browser on the operator's machine."""
