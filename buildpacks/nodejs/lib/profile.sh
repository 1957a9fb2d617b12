# Written by the Node.js buildpack; sourced by slugrunner before the app's process starts.
if [ -x "$HOME/.heroku/node/bin/node" ]; then
  export PATH="$HOME/.heroku/node/bin:$PATH"
  # the npm registry's Node.js trusts only its own CA list; Debian's trusts the system's
  if [ -z "${NODE_EXTRA_CA_CERTS:-}" ] && [ -r /etc/ssl/certs/ca-certificates.crt ]; then
    export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
  fi
fi
export PATH="$PATH:$HOME/bin:$HOME/node_modules/.bin"
export NODE_ENV="${NODE_ENV:-production}"
export NPM_CONFIG_UPDATE_NOTIFIER=false

# WEB_CONCURRENCY: one process per WEB_MEMORY (MB, default 512) of the container's memory
# limit (1 when there is none), at most 32; a value set by the app is kept
if [ -z "${MEMORY_AVAILABLE:-}" ]; then
  for _limit in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do
    if [ -r "$_limit" ]; then
      _limit=$(cat "$_limit")
      case $_limit in
        '' | max | *[!0-9]*) ;;
        *) [ "${#_limit}" -le 15 ] && MEMORY_AVAILABLE=$((_limit / 1048576)) ;;
      esac
      break
    fi
  done
  unset _limit
fi
export WEB_MEMORY="${WEB_MEMORY:-512}"
if [ -z "${WEB_CONCURRENCY:-}" ]; then
  WEB_CONCURRENCY=1
  if [ -n "${MEMORY_AVAILABLE:-}" ]; then
    export MEMORY_AVAILABLE
    WEB_CONCURRENCY=$((MEMORY_AVAILABLE / WEB_MEMORY))
    [ "$WEB_CONCURRENCY" -ge 1 ] || WEB_CONCURRENCY=1
    [ "$WEB_CONCURRENCY" -le 32 ] || WEB_CONCURRENCY=32
  fi
fi
export WEB_CONCURRENCY
