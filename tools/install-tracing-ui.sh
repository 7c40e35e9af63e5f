#!/usr/bin/env bash
# The tracing UI of `make up`: the Zipkin server's executable jar from Maven Central, run with
# the machine's Java (17 or newer). Kept out of the services' dependencies and out of the
# repository: it is cached under ~/.cache/apilane/zipkin/<version>/, keyed by version and
# checked against a pinned SHA-256. Idempotent: when the jar is there it only prints its path.
# Prints the jar's path on stdout.
set -euo pipefail

ZIPKIN_VERSION=3.6.1
ZIPKIN_SHA256=d8326e0ed4f43855dba81228f688554706e52578a7c782d9a90b73f8680654a1
cache_dir="${APILANE_CACHE:-$HOME/.cache/apilane}/zipkin/${ZIPKIN_VERSION}"
jar="$cache_dir/zipkin-server-${ZIPKIN_VERSION}-exec.jar"

say() { printf 'install-tracing-ui: %s\n' "$*" >&2; }

apt_install() {
    if [[ "$(id -u)" -ne 0 ]]; then
        say "$1 is missing; install it (as root: apt-get install $2)"
        exit 1
    fi
    say "installing $2 (for $1)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2
}

java_major() {
    java -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit }'
}

# Zipkin 3 needs Java 17 or newer.
if ! command -v java >/dev/null 2>&1 || (($(java_major) < 17)); then
    apt_install "Java 17" openjdk-17-jre-headless
fi

# The marker is written only after the checksum matched, so its presence is the fast path.
marker="$jar.sha256-verified"
if [[ -f "$jar" && "$(cat "$marker" 2>/dev/null)" == "$ZIPKIN_SHA256" ]]; then
    echo "$jar"
    exit 0
fi

if ! command -v curl >/dev/null 2>&1; then
    apt_install "curl (fetches the jar from Maven Central)" curl
fi

mkdir -p "$cache_dir"
# Fetched into a scratch directory and moved into place once verified, so an interrupted
# download never leaves a jar the fast path above would trust. Straight from the repository
# (not through mvn): one file, no local repository copy, and curl can show its progress.
scratch="$(mktemp -d "$cache_dir/.fetch.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
url="${MAVEN_REPOSITORY:-https://repo1.maven.org/maven2}/io/zipkin/zipkin-server/${ZIPKIN_VERSION}/zipkin-server-${ZIPKIN_VERSION}-exec.jar"
say "fetching $url (~130 MB, first time only)"
progress=(--no-progress-meter)
[[ -t 2 ]] && progress=(--progress-bar)
curl --fail --location --retry 3 "${progress[@]}" -o "$scratch/zipkin-server-${ZIPKIN_VERSION}-exec.jar" "$url" || {
    say "could not fetch $url (is Maven Central reachable? set MAVEN_REPOSITORY to a mirror)"
    exit 1
}
fetched="$scratch/zipkin-server-${ZIPKIN_VERSION}-exec.jar"
if ! echo "${ZIPKIN_SHA256}  $fetched" | sha256sum --check --status; then
    say "checksum mismatch for $fetched (expected sha256 ${ZIPKIN_SHA256})"
    exit 1
fi
mv -f "$fetched" "$jar"
echo "$ZIPKIN_SHA256" >"$marker"
say "cached $jar"
echo "$jar"
