#!/bin/sh
# Cronium agent installer, served by the control plane at /install.sh with its settings filled in.
#
#   curl -fsSL URL/install.sh | sudo sh -s -- --token TOKEN [--name N] [--labels k=v,...]
#        [--prefix DIR] [--state-dir DIR] [--version V] [--target TRIPLE] [--from-dir DIR]
#        [--no-service [--detach]]
#   curl -fsSL URL/install.sh | sudo sh -s -- --uninstall [--purge] [--prefix DIR]
#
# It downloads the agent's signed manifest and binary, verifies both ed25519 signatures with
# `openssl pkeyutl -verify -rawin` (OpenSSL 3 or newer) and the binary's sha256 against the
# manifest BEFORE the binary is moved into place or run, refuses a version older than the
# installed one, installs atomically, enrolls (once), and installs and starts the systemd unit
# (or, with --no-service, runs the agent in the foreground, or in the background with --detach).
# Safe to run again.
#
# Environment: CRONIUM_ENROLL_TOKEN (instead of --token); CRONIUM_SYSTEMD_DIR, the directory the
# unit is written to (default /etc/systemd/system; the service is installed only when it exists
# and `systemctl is-system-running` says systemd runs).
set -eu

CRONIUM_URL='@CRONIUM_URL@'
CRONIUM_CA_SHA256='@CRONIUM_CA_SHA256@'
CRONIUM_RELEASE_KEY='@CRONIUM_RELEASE_KEY@'

say() { printf 'cronium-install: %s\n' "$*" >&2; }
die() {
	printf 'cronium-install: error: %s\n' "$*" >&2
	exit 1
}

usage() {
	cat <<'EOF'
Usage: install.sh [options]
  --token TOKEN      enrollment token (or the CRONIUM_ENROLL_TOKEN environment variable)
  --name NAME        the agent's name (default: the host name)
  --labels k=v,...   the agent's labels
  --prefix DIR       install under DIR (binary in DIR/bin; default /usr/local)
  --state-dir DIR    the agent's state (default /var/lib/cronium-agent, or
                     DIR/var/lib/cronium-agent with another --prefix)
  --version V        install version V instead of the latest
  --target TRIPLE    download this target instead of the detected one
  --from-dir DIR     take the release files from DIR instead of downloading them (they are
                     verified all the same); used by the control plane's SSH bootstrap
  --no-service       run the agent in the foreground instead of installing a systemd service
  --detach           with --no-service: start the agent in the background (its own session,
                     output in STATE_DIR/agent.log, pid in STATE_DIR/agent.pid) and return;
                     a run again restarts it
  --uninstall        stop and remove the service and the binary (--purge: the state dir too)
Environment:
  CRONIUM_ENROLL_TOKEN  the enrollment token, instead of --token
  CRONIUM_SYSTEMD_DIR   where the unit cronium-agent.service goes (default /etc/systemd/system)
EOF
}

token=${CRONIUM_ENROLL_TOKEN:-}
name=
labels=
prefix=/usr/local
state_dir=
version=latest
target=
from_dir=
no_service=0
detach=0
uninstall=0
purge=0

while [ $# -gt 0 ]; do
	case $1 in
	--token | --name | --labels | --prefix | --state-dir | --version | --target | --from-dir)
		[ $# -ge 2 ] || die "$1 needs a value"
		option=$1
		value=$2
		shift 2
		;;
	--*=*)
		option=${1%%=*}
		value=${1#*=}
		shift
		;;
	--no-service)
		no_service=1
		shift
		continue
		;;
	--detach)
		detach=1
		shift
		continue
		;;
	--uninstall)
		uninstall=1
		shift
		continue
		;;
	--purge)
		purge=1
		shift
		continue
		;;
	-h | --help)
		usage
		exit 0
		;;
	*) die "unknown option: $1 (see --help)" ;;
	esac
	case $option in
	--token) token=$value ;;
	--name) name=$value ;;
	--labels) labels=$value ;;
	--prefix) prefix=$value ;;
	--state-dir) state_dir=$value ;;
	--version) version=$value ;;
	--target) target=$value ;;
	--from-dir) from_dir=$value ;;
	*) die "unknown option: $option (see --help)" ;;
	esac
done

# Paths go into a systemd unit and sed expressions: keep them plain.
safe_path() {
	case $2 in
	/*) ;;
	*) die "$1 must be an absolute path, got '$2'" ;;
	esac
	case $2 in
	*[!A-Za-z0-9/._-]*) die "$1 may contain only letters, digits and / . _ -, got '$2'" ;;
	esac
}
prefix=${prefix%/}
[ -n "$prefix" ] || prefix=/
safe_path --prefix "$prefix"
if [ -z "$state_dir" ]; then
	if [ "$prefix" = /usr/local ]; then
		state_dir=/var/lib/cronium-agent
	else
		state_dir=$prefix/var/lib/cronium-agent
	fi
fi
safe_path --state-dir "$state_dir"
if [ -n "$from_dir" ]; then
	safe_path --from-dir "${from_dir%/}"
	[ -d "$from_dir" ] || die "--from-dir: $from_dir is not a directory"
fi
if [ "$detach" = 1 ] && [ "$no_service" = 0 ]; then
	die "--detach goes with --no-service (the systemd service runs in the background anyway)"
fi
case $version in
'' | *[!0-9A-Za-z.+-]*) die "--version: '$version' is not a version" ;;
esac

bin=$prefix/bin/cronium-agent
systemd_dir=${CRONIUM_SYSTEMD_DIR:-/etc/systemd/system}
systemd_dir=${systemd_dir%/}
safe_path CRONIUM_SYSTEMD_DIR "$systemd_dir"
unit=$systemd_dir/cronium-agent.service
pid_file=$state_dir/agent.pid

# stop_detached: stops an agent started with --detach (its pid file names it), if it runs.
stop_detached() {
	[ -f "$pid_file" ] || return 0
	old_pid=$(cat "$pid_file" 2>/dev/null || true)
	case $old_pid in
	'' | *[!0-9]*) ;;
	*)
		# Only an agent of this install: its command line names this binary.
		if [ -r "/proc/$old_pid/cmdline" ] && tr '\0' ' ' <"/proc/$old_pid/cmdline" | grep -q "cronium-agent"; then
			kill "$old_pid" 2>/dev/null || true
			tries=0
			while kill -0 "$old_pid" 2>/dev/null && [ "$tries" -lt 100 ]; do
				sleep 0.1
				tries=$((tries + 1))
			done
			kill -KILL "$old_pid" 2>/dev/null || true
			say "stopped the detached agent (pid $old_pid)"
		fi
		;;
	esac
	rm -f "$pid_file"
}

if [ "$uninstall" = 1 ]; then
	if [ -f "$unit" ] && command -v systemctl >/dev/null 2>&1; then
		systemctl disable --now cronium-agent.service >/dev/null 2>&1 || true
		rm -f "$unit"
		systemctl daemon-reload || true
		say "removed the cronium-agent service"
	fi
	stop_detached
	rm -f "$bin"
	say "removed $bin"
	if [ "$purge" = 1 ]; then
		rm -rf "$state_dir"
		say "removed $state_dir"
	else
		say "kept the agent's identity and spool in $state_dir (--purge removes them); revoke the agent on the control plane with DELETE /api/v1/agents/ID"
	fi
	exit 0
fi

enrolled=0
[ -f "$state_dir/agent.json" ] && enrolled=1
if [ "$enrolled" = 0 ] && [ -z "$token" ]; then
	die "--token is required: the agent in $state_dir is not enrolled yet (create a token with 'cronium enroll-token create')"
fi
if [ "$no_service" = 0 ]; then
	[ "$(id -u)" = 0 ] || die "installing the systemd service needs root: run with sudo, or use --no-service"
	command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this host has no systemd; use --no-service and supervise the agent yourself"
	# systemctl alone is not systemd: containers often have it without systemd running ("offline").
	systemd_state=$(systemctl is-system-running 2>/dev/null) || true
	case $systemd_state in
	'' | offline | unknown) die "systemd is not running on this host (systemctl is-system-running: ${systemd_state:-no answer}); use --no-service and supervise the agent yourself. Nothing was installed." ;;
	esac
	[ -d "$systemd_dir" ] || die "$systemd_dir does not exist: cannot install the systemd unit there (CRONIUM_SYSTEMD_DIR chooses another directory); or use --no-service. Nothing was installed."
fi

# Signatures are checked with OpenSSL 3 (ed25519 over the raw bytes needs `pkeyutl -rawin`).
command -v openssl >/dev/null 2>&1 ||
	die "openssl not found: it is needed to verify the agent's ed25519 signature (OpenSSL 3 or newer; Debian/Ubuntu: apt-get install openssl, RHEL/Fedora: dnf install openssl). Nothing was installed."
openssl_version=$(openssl version 2>/dev/null || true)
case $openssl_version in
"OpenSSL "[3-9].* | "OpenSSL "[1-9][0-9]*) ;;
*) die "cannot verify ed25519 signatures with '$openssl_version': OpenSSL 3 or newer is needed. Nothing was installed." ;;
esac

if [ -z "$target" ]; then
	[ "$(uname -s)" = Linux ] || die "unsupported system $(uname -s): the agent runs on Linux"
	machine=$(uname -m)
	case $machine in
	x86_64 | amd64) target=x86_64-unknown-linux-gnu ;;
	aarch64 | arm64) target=aarch64-unknown-linux-gnu ;;
	*) die "unsupported architecture $machine (give --target TRIPLE if the control plane has a build for it)" ;;
	esac
fi
case $target in
'' | .* | *[!0-9A-Za-z_.-]*) die "--target: '$target' is not a target triple" ;;
esac

if [ -n "$from_dir" ]; then
	fetch() { cp "$from_dir/${1##*/}" "$2"; }
elif command -v curl >/dev/null 2>&1; then
	fetch() { curl -fsSL --proto '=http,https' -o "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
	fetch() { wget -q -O "$2" "$1"; }
else
	die "neither curl nor wget found: install one of them"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cronium-install.XXXXXX")
new=
cleanup() {
	rm -rf "$tmp"
	if [ -n "$new" ]; then rm -f "$new"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
printf '%s\n' "$CRONIUM_RELEASE_KEY" >"$tmp/release-key.pem"

base=$CRONIUM_URL/downloads/agent/$version/$target
download() {
	if [ -n "$from_dir" ]; then
		fetch "$1" "$tmp/$1" || die "cannot read $from_dir/$1. Nothing was installed."
	else
		fetch "$base/$1" "$tmp/$1" || die "cannot download $base/$1 (missing on the control plane, or the network failed). Nothing was installed."
	fi
}

# verify FILE WHAT: FILE.sig must be a valid signature of FILE by the release key.
verify() {
	[ -s "$tmp/$1.sig" ] || die "the signature of $2 is missing or empty: refusing it. Nothing was installed."
	if ! output=$(openssl pkeyutl -verify -pubin -inkey "$tmp/release-key.pem" -rawin -in "$tmp/$1" -sigfile "$tmp/$1.sig" 2>&1); then
		die "the signature of $2 does not verify with this control plane's release key (tampered, or signed with another key): refusing it. Nothing was installed."
	fi
	case $output in
	*"Signature Verified Successfully"*) ;;
	*) die "the signature of $2 does not verify with this control plane's release key: refusing it. Nothing was installed." ;;
	esac
}

# manifest_field NAME: a field of the verified manifest (one field per line, as cronium writes it).
manifest_field() {
	sed -n 's/^ *"'"$1"'": *"\{0,1\}\([^",]*\)"\{0,1\},\{0,1\} *$/\1/p' "$tmp/cronium-agent.manifest.json" | head -n 1
}

# version_compare A B: prints -1, 0 or 1 (semver precedence; the +build part is ignored).
version_compare() {
	awk -v a="$1" -v b="$2" '
	function split_pre(v, parts,   i) { sub(/\+.*/, "", v); i = index(v, "-"); if (i) { parts["pre"] = substr(v, i + 1); v = substr(v, 1, i - 1) } else parts["pre"] = ""; parts["core"] = v }
	BEGIN {
		split_pre(a, pa); split_pre(b, pb)
		split(pa["core"], x, "."); split(pb["core"], y, ".")
		for (k = 1; k <= 3; k++) {
			if (x[k] + 0 < y[k] + 0) { print -1; exit }
			if (x[k] + 0 > y[k] + 0) { print 1; exit }
		}
		if (pa["pre"] == pb["pre"]) print 0
		else if (pa["pre"] == "") print 1
		else if (pb["pre"] == "") print -1
		else if (pa["pre"] < pb["pre"]) print -1
		else print 1
	}'
}

if [ -n "$from_dir" ]; then
	say "taking the agent ($version, $target) from $from_dir"
else
	say "downloading the agent ($version, $target) from $CRONIUM_URL"
fi
download cronium-agent.manifest.json
download cronium-agent.manifest.json.sig
verify cronium-agent.manifest.json "the release manifest"
release_version=$(manifest_field version)
release_target=$(manifest_field target)
release_sha256=$(manifest_field sha256)
release_size=$(manifest_field size)
case $release_version in
'' | *[!0-9A-Za-z.+-]*) die "the signed manifest has no valid version" ;;
esac
[ "$release_target" = "$target" ] || die "the signed manifest is for $release_target, not $target: refusing it"
if [ "$version" != latest ] && [ "$release_version" != "$version" ]; then
	die "asked for version $version but the signed manifest says $release_version: refusing it"
fi

installed=
if [ -x "$bin" ]; then
	installed=$("$bin" version 2>/dev/null | awk 'NR == 1 { print $2 }') || installed=
fi
replace=1
fresh=0
if [ -n "$installed" ]; then
	case $(version_compare "$release_version" "$installed") in
	-1) die "refusing to install cronium-agent $release_version: $installed is installed and newer (downgrades are refused). Nothing was changed." ;;
	0)
		say "cronium-agent $installed is installed already: keeping it"
		replace=0
		;;
	*) say "upgrading cronium-agent $installed to $release_version" ;;
	esac
fi

if [ "$replace" = 1 ]; then
	download cronium-agent
	download cronium-agent.sig
	verify cronium-agent "the agent binary"
	actual_sha256=$(openssl dgst -sha256 -r "$tmp/cronium-agent" | awk '{ print $1 }')
	[ "$actual_sha256" = "$release_sha256" ] || die "the agent binary's sha256 differs from the signed manifest's: refusing it. Nothing was installed."
	actual_size=$(wc -c <"$tmp/cronium-agent" | tr -d ' ')
	[ "$actual_size" = "$release_size" ] || die "the agent binary has $actual_size bytes, the signed manifest says $release_size: refusing it. Nothing was installed."
	# Verified: now (and only now) it goes next to its final place and is renamed over it.
	mkdir -p "$prefix/bin"
	new=$prefix/bin/.cronium-agent.new.$$
	cp "$tmp/cronium-agent" "$new"
	chmod 0755 "$new"
	mv -f "$new" "$bin"
	new=
	if [ -z "$installed" ]; then fresh=1; fi
	say "installed cronium-agent $release_version at $bin (signature verified)"
fi

if [ "$enrolled" = 1 ]; then
	say "already enrolled ($state_dir/agent.json): skipping enrollment"
else
	mkdir -p "$state_dir"
	chmod 0700 "$state_dir"
	set -- enroll --server "$CRONIUM_URL" --ca-sha256 "$CRONIUM_CA_SHA256" --state-dir "$state_dir"
	# --opt=value: a value that starts with '-' is never taken for an option.
	if [ -n "$name" ]; then set -- "$@" "--name=$name"; fi
	if [ -n "$labels" ]; then set -- "$@" "--labels=$labels"; fi
	# The token travels in the environment, never in the agent's arguments.
	if ! CRONIUM_ENROLL_TOKEN=$token "$bin" "$@"; then
		# Nothing stays installed by a run that could not enroll.
		if [ "$fresh" = 1 ]; then rm -f "$bin"; fi
		rmdir "$state_dir" 2>/dev/null || true
		die "enrollment was refused (see the message above): the token may be used up, expired or mistyped; create a new one with 'cronium enroll-token create'"
	fi
	say "enrolled the agent (state in $state_dir)"
fi

# The agent's self-updater verifies releases only with the key pinned here (never one sent later),
# and reads its version from the signed manifest of the binary it runs.
if [ ! -f "$state_dir/release-key.pub" ]; then
	cp "$tmp/release-key.pem" "$state_dir/release-key.pub"
fi
if [ "$replace" = 1 ]; then
	cp "$tmp/cronium-agent.manifest.json" "$state_dir/installed.manifest.json"
	cp "$tmp/cronium-agent.manifest.json.sig" "$state_dir/installed.manifest.json.sig"
fi

if [ "$no_service" = 1 ] && [ "$detach" = 1 ]; then
	stop_detached
	# Its own session, no terminal, every descriptor redirected: it outlives this shell (and an
	# SSH session that ran it).
	setsid "$bin" run --state-dir "$state_dir" </dev/null >>"$state_dir/agent.log" 2>&1 &
	printf '%s\n' "$!" >"$pid_file"
	say "started the agent in the background (pid $!, log $state_dir/agent.log)"
	exit 0
fi

if [ "$no_service" = 1 ]; then
	say "starting the agent in the foreground"
	cleanup
	trap - EXIT
	exec "$bin" run --state-dir "$state_dir"
fi

cat >"$tmp/cronium-agent.service" <<'CRONIUM_UNIT'
@CRONIUM_SERVICE_UNIT@
CRONIUM_UNIT
sed -e "s|@BIN@|$bin|g" -e "s|@BIN_DIR@|$prefix/bin|g" -e "s|@STATE_DIR@|$state_dir|g" "$tmp/cronium-agent.service" >"$unit.new"
chmod 0644 "$unit.new"
mv -f "$unit.new" "$unit"
systemctl daemon-reload
systemctl enable cronium-agent.service >/dev/null
systemctl restart cronium-agent.service
say "the cronium-agent service is running (systemctl status cronium-agent)"
