"""Real components for the tests, on loopback: the generic TLS upstream (`upstream`), the
real proxy in a thread (`proxy`), clients through it (`clients`: curl and raw sockets), the
fake LLM APIs (`llm`: one per provider), their WebSocket side (`ws_upstream`), HTTP/2 peers
(`h2`) and a real full disk (`small_disk`). tests/conftest.py puts tests/ on sys.path: import
them as `support.…`."""
