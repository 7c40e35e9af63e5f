#!/usr/bin/env bash
# The tracing UI of `make up`: the Zipkin server's executable jar from Maven Central, run with
# the machine's Java (17 or newer). Kept out of the services' dependencies and out of the
# repository: it is cached under ~/.cache/apilane/zipkin/<version>/, keyed by version and
# checked against a pinned SHA-256. Idempotent: when the jar is there it only prints its path.
# Prints the jar's path on stdout.
set -euo pipefail

ZIPKIN_VERSION=3.6.1
ZIPKIN_SHA256=d8326e0ed4f43855dba81228f688554706e52578a7c782d9a90b73f8680654a1
ARTIFACT="io.zipkin:zipkin-server:${ZIPKIN_VERSION}:jar:exec"
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

if ! command -v mvn >/dev/null 2>&1; then
    apt_install "Maven (fetches the jar from Maven Central)" maven
fi

mkdir -p "$cache_dir"
# A private local repository, removed afterwards: the jar is ~130 MB and needs no second copy
# in ~/.m2. Fetched into a scratch directory and moved into place once verified, so an
# interrupted download never leaves a jar the fast path above would trust.
scratch="$(mktemp -d "$cache_dir/.fetch.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
say "fetching ${ARTIFACT} from Maven Central (~130 MB, first time only)"
mvn -B -q --strict-checksums \
    -Dmaven.repo.local="$scratch/m2" \
    dependency:copy -Dartifact="$ARTIFACT" -DoutputDirectory="$scratch" -Dmdep.overWriteReleases=true >&2
fetched="$scratch/zipkin-server-${ZIPKIN_VERSION}-exec.jar"
if ! echo "${ZIPKIN_SHA256}  $fetched" | sha256sum --check --status; then
    say "checksum mismatch for $fetched (expected sha256 ${ZIPKIN_SHA256})"
    exit 1
fi
mv -f "$fetched" "$jar"
echo "$ZIPKIN_SHA256" >"$marker"
say "cached $jar"
echo "$jar"
