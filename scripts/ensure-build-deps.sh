#!/usr/bin/env bash
# The system libraries the build links: OpenSSL for librdkafka's TLS and
# SASL/SCRAM, libcurl for its OAUTHBEARER/OIDC token requests, and
# pkg-config, by which both are found. Installs what is missing (Debian's
# packages), once; does nothing when they are there.
set -euo pipefail

missing=()
pkg-config --version >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
pkg-config --exists libcurl 2>/dev/null || missing+=(libcurl4-openssl-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing ${missing[*]} (for librdkafka's TLS, SASL and OIDC)" >&2
  sudo=
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
