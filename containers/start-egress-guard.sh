#!/bin/sh
# The egress-guard container's command (containers/compose.yaml): create the config, CA and
# audit DB in /data if missing; put what the agent may have — the CA's public certificate,
# the bundle, and fake keys for $EG_AGENT (session $EG_SESSION) — next to the socket in
# /run/egress-guard (the agent mounts that volume, never /data: the CA key, the fake keys'
# HMAC key and the audit DB stay here); then run the proxy on loopback and on the socket.
set -eu
CONFIG=/data/egress-guard.yaml
SHARED=/run/egress-guard
egress-guard init --dir /data >/dev/null
if [ -n "${EG_AGENT:-}" ]; then
  # the session is EG_SESSION (compose labels the agent container with it, so that
  # `egress-guard kill --session` finds it); none given: a new one
  { egress-guard env --config "$CONFIG" --format dotenv
    egress-guard keys mint --config "$CONFIG" --agent "$EG_AGENT" --ttl "${EG_TTL:-8h}" \
      ${EG_SESSION:+--session "$EG_SESSION"} --format dotenv
  } | sed "s|/data/certs/|$SHARED/|g" > "$SHARED/agent.env.tmp"
  mv "$SHARED/agent.env.tmp" "$SHARED/agent.env"
fi
cp /data/certs/egress-guard-ca.pem /data/certs/ca-bundle.pem "$SHARED/"
exec egress-guard up --config "$CONFIG" --listen 127.0.0.1:8080 --listen-unix "$SHARED/proxy.sock"
