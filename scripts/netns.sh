#!/usr/bin/env bash
# Run a command inside a private network namespace that has only loopback, with the ROS environment set up.
# Nothing the command starts can reach any network interface but lo: this is how tests, demos and CI keep
# all DDS traffic on this machine. A private /dev/shm goes with it: Fast DDS names its shared-memory ports by
# domain and port number only, so without it two runs on one host (a demo beside a test run, two CI jobs) and
# segments left by killed processes of earlier runs share those ports across the network namespaces.
# Usage: scripts/netns.sh CMD [ARGS...]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${MM_LLM_IN_NETNS:-}" != "1" ]; then
  command -v unshare >/dev/null 2>&1 || { echo "netns: 'unshare' (util-linux) is required" >&2; exit 1; }
  export MM_LLM_IN_NETNS=1
  # As root plain network and mount namespaces; otherwise a user namespace maps us to root inside them.
  if [ "$(id -u)" = 0 ]; then
    exec unshare --net --mount -- "$0" "$@"
  fi
  exec unshare --user --map-root-user --net --mount -- "$0" "$@" || {
    echo "netns: cannot create a network namespace (needs root or unprivileged user namespaces)" >&2; exit 1; }
fi

ip link set lo up
# unshare --mount makes mounts private, so this tmpfs is seen only by what this command starts.
mount -t tmpfs -o mode=1777,nosuid,nodev mm_llm_shm /dev/shm
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
# Large best-effort samples (camera frames) need a bigger shared-memory segment than Fast DDS's default.
export FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$REPO/mm_llm_ros/config/fastdds_large_data.xml}"
# shellcheck disable=SC1091
set +u; . "$REPO/install/setup.bash"; set -u
exec "$@"
