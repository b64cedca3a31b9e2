#!/bin/sh
# Starts mosquitto in deploy/compose.yaml (eclipse-mosquitto:2) with the shipped mosquitto.conf, changed
# only where a container differs from a host install: the plain listener faces the compose network (the
# host publishes its port), the password file and the persistence directory are the image's, and the
# acl_file is left out (see the sed below).
# The two users (gateway, devices) come from deploy/.env, so no password hash is kept in the repository.
set -eu

: "${MQTT_GATEWAY_USER:?set it in deploy/.env}" "${MQTT_GATEWAY_PASSWORD:?set it in deploy/.env}"
: "${MQTT_DEVICES_USER:?set it in deploy/.env}" "${MQTT_DEVICES_PASSWORD:?set it in deploy/.env}"

umask 077
mosquitto_passwd -c -b /mosquitto/config/passwd "$MQTT_GATEWAY_USER" "$MQTT_GATEWAY_PASSWORD"
mosquitto_passwd -b /mosquitto/config/passwd "$MQTT_DEVICES_USER" "$MQTT_DEVICES_PASSWORD"
# The simulator publishes every machine under the one devices user, which the acl_file (one user per
# machine or edge node) would refuse: the container runs without it.
sed -e 's|^listener 1883 127\.0\.0\.1$|listener 1883|' \
    -e 's|^password_file .*$|password_file /mosquitto/config/passwd|' \
    -e 's|^persistence_location .*$|persistence_location /mosquitto/data/|' \
    -e '/^acl_file /d' \
    /etc/mosquitto/mosquitto.conf >/mosquitto/config/mosquitto.conf
# mosquitto drops root for its own user before it reads the password file (and on a SIGHUP reload).
chown mosquitto:mosquitto /mosquitto/config/passwd /mosquitto/config/mosquitto.conf

exec mosquitto -c /mosquitto/config/mosquitto.conf
