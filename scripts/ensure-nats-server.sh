#!/bin/sh
# The cluster tests run a real nats-server (>= 2.9, JetStream). `npm test` calls this
# first: nothing to do when nats-server is there; otherwise it is installed from the
# Debian package when this runs as root with apt-get. Failing that it says how to get
# it, and the cluster tests fail with the same hint: they never skip.
PATH="$PATH:/usr/sbin:/usr/local/sbin"
command -v nats-server >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing nats-server (Debian package) for the cluster tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y -qq nats-server >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nats-server >/dev/null 2>&1; }; then
    exit 0
  fi
fi
echo "nats-server is not installed and could not be installed here: the cluster tests will fail." >&2
echo "Install it (apt-get install nats-server on Debian or Ubuntu) or put nats-server >= 2.9 on PATH." >&2
exit 0
