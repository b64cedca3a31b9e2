#!/bin/sh
# Add a device to the mosquitto password file: add-device.sh <name> [passwd file, default /etc/mosquitto/passwd].
# <name> is the JSON <machine> level or the Sparkplug edge_node_id: deploy/mosquitto/acl's patterns then
# grant it its own topics, so no ACL line is needed. The password comes from DEVICE_PASSWORD (or a prompt);
# mosquitto_passwd -b still shows it in `ps` for an instant. Certificate devices (use_identity_as_username
# true on the TLS listener) need no password entry: issue the certificate with CN=<name>.
# Reload the broker afterwards: systemctl reload mosquitto (or kill -HUP its pid).
set -eu
name=${1:?usage: add-device.sh <machine or edge_node_id> [passwd file]}
file=${2:-/etc/mosquitto/passwd}
case $name in *[/+#]*|'') echo "add-device.sh: $name must not contain / + #" >&2; exit 2;; esac
if [ -z "${DEVICE_PASSWORD:-}" ]; then
    printf 'password for %s: ' "$name" >&2; stty -echo 2>/dev/null || true
    read -r DEVICE_PASSWORD; stty echo 2>/dev/null || true; echo >&2
fi
[ -f "$file" ] || { touch "$file"; chmod 600 "$file"; }
mosquitto_passwd -b "$file" "$name" "$DEVICE_PASSWORD"
echo "added $name to $file"
