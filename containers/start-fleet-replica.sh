#!/bin/sh
# The command of an egress-guard replica (containers/fleet.compose.yaml, docs/kubernetes.yaml).
#   start-fleet-replica init   once per fleet: the CA and the fake-key HMAC key, created in
#                              the ca_dir of the fleet's config ($EG_CONFIG) under /data
#   start-fleet-replica        a replica: runs the fleet's config (the same for every replica;
#                              absolute paths) with store.replica = $EG_REPLICA, the name of its
#                              audit hash chain (unset: the config's, else <hostname>-<random>);
#                              copies the fleet's CA and HMAC key from $EG_CA_SOURCE (a read-only
#                              volume or Secret) into its own ca_dir (egress-guard writes there);
#                              puts the CA's public half next to its socket in /run/egress-guard
#                              and, if $EG_AGENT is set, fake keys for that agent (agent.env,
#                              session $EG_SESSION); then runs the proxy on $EG_LISTEN (default
#                              127.0.0.1:8080) and on the socket.
set -eu
FLEET=${EG_CONFIG:-/etc/egress-guard/egress-guard.yaml}
SHARED=/run/egress-guard
if [ "${1:-}" = init ]; then
  # init keeps a config that exists: the fleet's, so the CA lands in its ca_dir
  [ -e /data/egress-guard.yaml ] || cp "$FLEET" /data/egress-guard.yaml
  exec egress-guard init --dir /data
fi
CONFIG=/tmp/egress-guard.yaml
CA_DIR=$(python3 - "$FLEET" "$CONFIG" "${EG_REPLICA:-}" <<'PY'
import os, sys, yaml
source, target, replica = sys.argv[1:]
config = yaml.safe_load(open(source))
store = config.get("store")
if isinstance(store, str):
    store = config["store"] = {"url": store}
if replica and isinstance(store, dict):
    store["replica"] = replica
fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as out:
    yaml.safe_dump(config, out, sort_keys=False)
print(config.get("ca_dir", "./certs"))
PY
)
if [ -n "${EG_CA_SOURCE:-}" ]; then
  mkdir -p "$CA_DIR" && chmod 0700 "$CA_DIR"
  for f in "$EG_CA_SOURCE"/*; do   # a Kubernetes Secret's files are symlinks: cat follows
    [ -f "$f" ] || continue
    rm -f "$CA_DIR/${f##*/}" && (umask 077 && cat "$f" > "$CA_DIR/${f##*/}")
  done
fi
if [ -n "${EG_AGENT:-}" ]; then
  { egress-guard env --config "$CONFIG" --format dotenv
    egress-guard keys mint --config "$CONFIG" --agent "$EG_AGENT" --ttl "${EG_TTL:-8h}" \
      ${EG_SESSION:+--session "$EG_SESSION"} --format dotenv
  } | sed "s|$CA_DIR/|$SHARED/|g" > "$SHARED/agent.env.tmp"
  mv "$SHARED/agent.env.tmp" "$SHARED/agent.env"
fi
if [ -w "$SHARED" ]; then
  cp "$CA_DIR/egress-guard-ca.pem" "$CA_DIR/ca-bundle.pem" "$SHARED/"
  chmod 0644 "$SHARED/egress-guard-ca.pem" "$SHARED/ca-bundle.pem"
  set -- --listen-unix "$SHARED/proxy.sock"
fi
exec egress-guard up --config "$CONFIG" --listen "${EG_LISTEN:-127.0.0.1:8080}" "$@"
