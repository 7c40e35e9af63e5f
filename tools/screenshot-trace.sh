#!/usr/bin/env bash
# Screenshot one trace in the local stack's Zipkin UI (`make up`) with headless Chromium, as
# the README's image was made:
#
#   tools/screenshot-trace.sh <trace-id> [out.png]        # default out: docs/img/failover-trace.png
#   tools/screenshot-trace.sh --text <file.txt> [out.png] # a text file (terminal output) instead
#
# The trace id is what `apilane history` or `apilane simulate failover` links. ZIPKIN_URL
# (default http://127.0.0.1:9411) must be on loopback: the script talks to nothing else.
# Needs Debian's `chromium` (as root: apt-get install -y chromium) and curl.
set -euo pipefail

ZIPKIN_URL="${ZIPKIN_URL:-http://127.0.0.1:9411}"
WINDOW="${WINDOW:-1400,900}"

say() { printf 'screenshot-trace: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 1
}
usage() { die "usage: $0 <trace-id> [out.png] | $0 --text <file.txt> [out.png]"; }

command -v chromium >/dev/null 2>&1 || die "chromium is missing (as root: apt-get install -y chromium)"

profile="$(mktemp -d)"
page=""
cleanup() { rm -rf "$profile" ${page:+"$page"}; }
trap cleanup EXIT

shoot() { # url out.png: Zipkin's UI is a JS app, so give it virtual time to fetch and draw
    # --no-sandbox: Chromium's sandbox does not run as root; the page is local and trusted.
    chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --user-data-dir="$profile" --window-size="$WINDOW" --virtual-time-budget=10000 \
        --screenshot="$2" "$1" >/dev/null 2>&1 || die "chromium failed on $1"
    [[ -s "$2" ]] || die "chromium wrote no screenshot to $2"
    say "wrote $2 ($(stat -c %s "$2") bytes)"
}

# The text as a dark terminal page; HTML-escaped with sed so no other tool is needed.
text_page() { # in.txt out.html
    {
        printf '<!doctype html><meta charset="utf-8"><body style="margin:0;background:#1e1e1e">'
        printf '<pre style="margin:0;padding:14px;color:#d4d4d4;font:13px/1.35 monospace">'
        sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' "$1"
        printf '</pre></body>\n'
    } >"$2"
}

[[ $# -ge 1 ]] || usage
if [[ "$1" == "--text" ]]; then
    [[ $# -ge 2 && -f "$2" ]] || usage
    out="${3:-docs/img/demo-failover.png}"
    page="$(mktemp --suffix=.html)"
    text_page "$2" "$page"
    shoot "file://$page" "$out"
    exit 0
fi

trace_id="$1"
out="${2:-docs/img/failover-trace.png}"
[[ "$trace_id" =~ ^[0-9a-f]{16}([0-9a-f]{16})?$ ]] || die "not a trace id: $trace_id"
[[ "$ZIPKIN_URL" =~ ^http://(127\.[0-9.]+|localhost|\[::1\])(:[0-9]+)?/?$ ]] ||
    die "ZIPKIN_URL must be on loopback, not $ZIPKIN_URL"
ZIPKIN_URL="${ZIPKIN_URL%/}"

# Fail with a reason rather than screenshot Zipkin's "trace not found" page.
services="$(curl -fsS "$ZIPKIN_URL/api/v2/trace/$trace_id" |
    grep -o '"serviceName":"[^"]*"' | sort -u | cut -d'"' -f4 | paste -sd, -)" ||
    die "trace $trace_id is not in Zipkin at $ZIPKIN_URL (is \`make up\` running?)"
say "trace $trace_id spans: ${services:-no services}"
mkdir -p "$(dirname "$out")"
shoot "$ZIPKIN_URL/zipkin/traces/$trace_id" "$out"
