#!/bin/sh
# Docker HEALTHCHECK of a vimoe-dist container: healthy while the Prometheus endpoint of local rank 0 answers
# (`metrics.port` of the run; rank r serves on metrics.port + r). VIMOE_METRICS_PORT names that port; unset or 0
# means the run serves no metrics, so there is nothing to check and the container counts as healthy.
port=${VIMOE_METRICS_PORT:-0}
if [ "$port" = 0 ]; then
    exit 0
fi
# the endpoint serves Prometheus text; vimoe's series start with vimoe_ or the client's process_/python_ defaults
curl --fail --silent --show-error --max-time 4 "http://${VIMOE_METRICS_HOST:-127.0.0.1}:${port}/metrics" >/dev/null || exit 1
