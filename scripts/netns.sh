#!/usr/bin/env bash
# Run a command inside a private network namespace that has only loopback, with the ROS environment set up.
# Nothing the command starts can reach any network interface but lo: this is how tests, demos and CI keep
# all DDS traffic on this machine. Usage: scripts/netns.sh CMD [ARGS...]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${MM_LLM_IN_NETNS:-}" != "1" ]; then
  command -v unshare >/dev/null 2>&1 || { echo "netns: 'unshare' (util-linux) is required" >&2; exit 1; }
  export MM_LLM_IN_NETNS=1
  # As root a plain network namespace; otherwise a user namespace maps us to root inside it.
  if [ "$(id -u)" = 0 ]; then
    exec unshare --net -- "$0" "$@"
  fi
  exec unshare --user --map-root-user --net -- "$0" "$@" || {
    echo "netns: cannot create a network namespace (needs root or unprivileged user namespaces)" >&2; exit 1; }
fi

ip link set lo up
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
# Large best-effort samples (camera frames) need a bigger shared-memory segment than Fast DDS's default.
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$REPO/mm_llm_ros/config/fastdds_large_data.xml}"
# shellcheck disable=SC1091
set +u; . "$REPO/install/setup.bash"; set -u
exec "$@"
