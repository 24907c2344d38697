"""The PostgreSQL store (a fleet of replicas): see docs/fleet.md."""
