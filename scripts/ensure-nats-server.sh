#!/bin/sh
# The cluster tests run a real nats-server (>= 2.9, JetStream). `npm test` calls this
# first: nothing to do when nats-server is there (on PATH, or the project's own copy in
# .nats-server/ that runs). Otherwise it is installed from the Debian package: with
# apt-get as root; as any other user, the package is downloaded with apt-get (apt's
# package lists kept in a directory of this run's, so no root is needed) and its
# program unpacked with dpkg-deb, then moved into .nats-server/ in one rename. Failing
# both it says how to get it, and the cluster tests fail with the same hint: they
# never skip.
PATH="$PATH:/usr/sbin:/usr/local/sbin"
command -v nats-server >/dev/null 2>&1 && exit 0
here=$(cd "$(dirname "$0")/.." && pwd)
local_dir="$here/.nats-server"
"$local_dir/nats-server" --version >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" = 0 ]; then
    echo "installing nats-server (Debian package) for the cluster tests" >&2
    if apt-get install -y -qq nats-server >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nats-server >/dev/null 2>&1; }; then
      exit 0
    fi
  elif command -v dpkg-deb >/dev/null 2>&1; then
    echo "downloading nats-server (Debian package) into $local_dir for the cluster tests" >&2
    mkdir -p "$local_dir"
    # This run's own directory: two runs at once do not share apt's state or files.
    work=$(mktemp -d "$local_dir/download.XXXXXX") || exit 0
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
    get() {
      apt-get -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1 -o "APT::Sandbox::User=$(id -un)" "$@" >/dev/null 2>&1
    }
    if get update -qq && (cd "$work/deb" && get download nats-server); then
      deb=$(ls "$work"/deb/nats-server_*.deb 2>/dev/null | head -n 1)
      if [ -n "$deb" ] && dpkg-deb -x "$deb" "$work/root" && "$work/root/usr/sbin/nats-server" --version >/dev/null 2>&1; then
        mv -f "$work/root/usr/sbin/nats-server" "$local_dir/nats-server"
        rm -rf "$work"
        exit 0
      fi
    fi
    rm -rf "$work"
  fi
fi
echo "nats-server is not installed and could not be installed here: the cluster tests will fail." >&2
echo "Install it (apt-get install nats-server on Debian or Ubuntu) or put nats-server >= 2.9 on PATH." >&2
exit 0
