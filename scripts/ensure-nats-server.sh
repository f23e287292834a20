#!/bin/sh
# The cluster tests run a real nats-server (>= 2.9, JetStream). `npm test` calls this
# first: nothing to do when nats-server is there (on PATH, or the project's own copy in
# .nats-server/). Otherwise it is installed from the Debian package: with apt-get as
# root; as any other user, the package is downloaded with apt-get into .nats-server/
# (apt's package lists kept there too, so no root is needed) and its program unpacked
# there with dpkg-deb. Failing both it says how to get it, and the cluster tests fail
# with the same hint: they never skip.
PATH="$PATH:/usr/sbin:/usr/local/sbin"
command -v nats-server >/dev/null 2>&1 && exit 0
here=$(cd "$(dirname "$0")/.." && pwd)
local_dir="$here/.nats-server"
[ -x "$local_dir/nats-server" ] && exit 0
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" = 0 ]; then
    echo "installing nats-server (Debian package) for the cluster tests" >&2
    if apt-get install -y -qq nats-server >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nats-server >/dev/null 2>&1; }; then
      exit 0
    fi
  elif command -v dpkg-deb >/dev/null 2>&1; then
    echo "downloading nats-server (Debian package) into $local_dir for the cluster tests" >&2
    apt="$local_dir/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$local_dir/deb"
    opts="-o Dir::State::Lists=$apt/lists -o Dir::Cache=$apt/cache -o Debug::NoLocking=1 -o APT::Sandbox::User=$(id -un)"
    # shellcheck disable=SC2086 # opts is a list of words
    if apt-get $opts update -qq >/dev/null 2>&1 && (cd "$local_dir/deb" && apt-get $opts download nats-server >/dev/null 2>&1); then
      deb=$(ls "$local_dir"/deb/nats-server_*.deb 2>/dev/null | head -n 1)
      if [ -n "$deb" ] && dpkg-deb -x "$deb" "$local_dir/root" && cp "$local_dir/root/usr/sbin/nats-server" "$local_dir/nats-server" 2>/dev/null; then
        rm -rf "$apt" "$local_dir/deb" "$local_dir/root"
        "$local_dir/nats-server" --version >/dev/null 2>&1 && exit 0
      fi
    fi
    rm -rf "$apt" "$local_dir/deb" "$local_dir/root"
  fi
fi
echo "nats-server is not installed and could not be installed here: the cluster tests will fail." >&2
echo "Install it (apt-get install nats-server on Debian or Ubuntu) or put nats-server >= 2.9 on PATH." >&2
exit 0
