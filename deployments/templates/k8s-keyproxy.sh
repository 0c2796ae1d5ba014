#!/bin/sh
# canaryflow key proxy (the sidecar in front of TorchServe in each serving pod; nginx image, busybox sh).
#
# TorchServe keeps token auth on and writes random keys to key_file.json in its working directory (a shared
# emptyDir mounted here read-only at @KEY_DIR@) each time it starts, so nothing outside the pod can know them.
# This script puts the current inference key into the Authorization header nginx adds upstream, reloads nginx when
# the key changes (TorchServe restarted in the pod) and, every RENEW_EVERY_S seconds, has TorchServe issue a new
# inference key with the API key (which never expires) before the old one does.
#
# `keyproxy.sh key NAME` prints the key NAME ("inference", "management", "API") and exits (used by the tests).
set -eu
KEY_FILE=@KEY_DIR@/key_file.json
STATE=/tmp/keyproxy
CONF=/config/nginx.conf
RENEW_EVERY_S=${RENEW_EVERY_S:-0}

key() {
    # key_file.json is {"inference": {"key": "...", "expiration time": "..."}, ...}; flattened first so that
    # pretty-printed and compact files read the same. Empty while TorchServe has not written it (or rewrites it).
    tr -d ' \n\r\t' < "$KEY_FILE" 2>/dev/null \
        | sed -n "s/.*\"$1\":{[^}]*\"key\":\"\([A-Za-z0-9_-]*\)\".*/\1/p" || true
}

write_auth() {
    printf 'proxy_set_header Authorization "Bearer %s";\n' "$1" > "$STATE/auth.conf.tmp"
    mv "$STATE/auth.conf.tmp" "$STATE/auth.conf"
}

if [ "${1:-}" = key ]; then
    key "$2"
    exit 0
fi

mkdir -p "$STATE" /tmp/nginx
write_auth ""  # no key yet: TorchServe refuses, /ping fails, the pod is not Ready
nginx -e stderr -c "$CONF" &
NGINX=$!
trap 'kill -QUIT $NGINX 2>/dev/null; wait $NGINX; exit 0' TERM INT
current=""
since_renewal=0
while kill -0 "$NGINX" 2>/dev/null; do
    new=$(key inference)
    if [ -n "$new" ] && [ "$new" != "$current" ]; then
        # A reload closes idle keep-alive connections (FACTS.md): it happens only when the key changed.
        write_auth "$new" && nginx -e stderr -c "$CONF" -s reload && current=$new
    fi
    if [ "$RENEW_EVERY_S" -gt 0 ] && [ "$since_renewal" -ge "$RENEW_EVERY_S" ] && [ -n "$current" ]; then
        if wget -q -O /dev/null --header "Authorization: Bearer $(key API)" --post-data "" \
                "http://127.0.0.1:@TS_MANAGEMENT@/token?type=inference"; then
            since_renewal=0  # the new key is in key_file.json now; the next pass loads it
        else
            echo "keyproxy: renewing the inference key failed; retrying in 5 s" >&2
        fi
    fi
    sleep 5 &
    wait $! || true
    since_renewal=$((since_renewal + 5))
done
wait "$NGINX"
