#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 with trust auth for
# user postgres, and that its client tools are there. Idempotent: does
# nothing when they already are.
set -euo pipefail

host=127.0.0.1
port=5432

ready() { pg_isready -q -h "$host" -p "$port" -U postgres 2>/dev/null; }

# The restore-and-replay test backs a database up and restores it.
if ! command -v pg_dump >/dev/null 2>&1 || ! command -v pg_restore >/dev/null 2>&1; then
  echo "pg_dump or pg_restore missing; installing the PostgreSQL client" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null
fi

if ready; then
  exit 0
fi

echo "PostgreSQL is not answering on $host:$port; starting it" >&2

# A Debian-packaged cluster, as on a standard development machine.
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 60); do ready && exit 0; sleep 1; done
fi

# Otherwise a private cluster owned by the postgres user, kept under the
# user's cache so later runs reuse it.
bindir=""
for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV) "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"; do
  if [ -x "$candidate/initdb" ] && [ -x "$candidate/pg_ctl" ]; then bindir=$candidate; break; fi
done
if [ -z "$bindir" ]; then
  echo "No PostgreSQL server binaries found; installing them" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -rV | head -1)
fi

data=/var/tmp/bridge-postgres
run_as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ ! -s "$data/PG_VERSION" ]; then
  mkdir -p "$data"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$data"; fi
  run_as_postgres "$bindir/initdb" -A trust -U postgres -D "$data" >/dev/null
fi
run_as_postgres "$bindir/pg_ctl" start -w -t 60 -D "$data" -l "$data/server.log" \
  -o "-p $port -c listen_addresses=$host -k /tmp" >/dev/null
ready || { echo "PostgreSQL did not start; see $data/server.log" >&2; exit 1; }
