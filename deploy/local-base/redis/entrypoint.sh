#!/bin/sh
# As the official image's entrypoint: a `redis-server` command runs as the redis user on a /data
# it owns, with protected mode off (the official build compiles it off), because the other
# containers reach it over the stack's network without a password.
set -e
if [ "$1" = "redis-server" ] && [ "$(id -u)" = "0" ]; then
    chown -R redis:redis /data
    shift
    exec setpriv --reuid=redis --regid=redis --init-groups redis-server --protected-mode no "$@"
fi
exec "$@"
