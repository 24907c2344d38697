#!/bin/sh
# The PostgreSQL container's command (containers/fleet.compose.yaml): on first start (empty
# $PGDATA) create the cluster, the role $PG_USER (default eg) with the password read from
# $PG_PASSWORD_FILE (a compose or Kubernetes secret; never an environment variable, which
# `docker inspect` shows) and the database $PG_DATABASE (default egress_guard) it owns; allow
# password logins (scram-sha-256) over the network; then run the server in the foreground.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
PG_USER=${PG_USER:-eg}
PG_DATABASE=${PG_DATABASE:-egress_guard}
PG_PASSWORD_FILE=${PG_PASSWORD_FILE:-/run/secrets/pg-password}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ ! -r "$PG_PASSWORD_FILE" ]; then
    echo "start-postgres: cannot read the password file $PG_PASSWORD_FILE (PG_PASSWORD_FILE)" >&2
    exit 1
  fi
  # the superuser is postgres, with peer login over the socket only; the password is read by
  # psql from the file (never in argv or the environment) and stored as a SCRAM verifier
  initdb -D "$PGDATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 -E UTF8 \
    --locale=C.UTF-8 >/dev/null
  cat >> "$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
password_encryption = scram-sha-256
unix_socket_directories = '/run/postgresql'
CONF
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  # psql reads the file itself (\set from `cat`) and quotes it as a literal (:'password')
  psql -v ON_ERROR_STOP=1 -q -d postgres -v user="$PG_USER" -v db="$PG_DATABASE" \
    -v pwfile="$PG_PASSWORD_FILE" <<'SQL'
\set password `cat :'pwfile'`
CREATE ROLE :"user" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"user";
SQL
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "start-postgres: created database $PG_DATABASE owned by $PG_USER"
fi
exec postgres -D "$PGDATA"
