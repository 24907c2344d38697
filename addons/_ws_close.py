"""Closing a WebSocket that mitmproxy relays: mitmproxy 12 has no API for it.

A close frame is fed to the connection's WebsocketLayer as if the agent had sent it (the
layer then closes both sides with that code); when the layer is gone or no longer open, the
agent's connection is cut instead.
"""

from __future__ import annotations

from typing import Any

from mitmproxy import http

from egress_guard.addons.killswitch import cut_client


def _ws_layer(proxyserver: Any, flow: http.HTTPFlow) -> Any:
    """The mitmproxy layer relaying this flow's frames. Found by walking the connection's
    layers: children are held as `layer` (NextLayer), `child_layer`, `streams` (HttpLayer),
    a delegating `_handle_event`, or a context's `layers`."""
    from mitmproxy.proxy.layers.websocket import WebsocketLayer

    handler = proxyserver.connections.get(flow.client_conn.id)
    stack = [getattr(handler, "layer", None)]
    seen: set[int] = set()
    while stack:
        layer = stack.pop()
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, WebsocketLayer) and layer.flow is flow:
            return layer
        delegate = getattr(getattr(layer, "_handle_event", None), "__self__", None)
        stack += [getattr(layer, "layer", None), getattr(layer, "child_layer", None), delegate]
        streams = getattr(layer, "streams", None)
        if isinstance(streams, dict):
            stack += list(streams.values())
        stack += list(getattr(getattr(layer, "context", None), "layers", None) or ())
    return None


def close_websocket(proxyserver: Any, flow: http.HTTPFlow, code: int, reason: str) -> None:
    """Close both sides of the flow's WebSocket with `code` and `reason` (cut to 120 bytes, as
    a close frame allows), or cut the agent's connection."""
    import wsproto.events
    from wsproto.connection import ConnectionState

    layer = _ws_layer(proxyserver, flow)
    client_ws = getattr(layer, "client_ws", None)
    if client_ws is not None and client_ws.state is ConnectionState.OPEN:
        short = reason.encode()[:120].decode(errors="ignore")
        client_ws._events.append(wsproto.events.CloseConnection(code=code, reason=short))
        proxyserver.inject_websocket(flow, False, b"", True)  # makes the layer read it
    else:
        cut_client(proxyserver, flow.client_conn.id)
