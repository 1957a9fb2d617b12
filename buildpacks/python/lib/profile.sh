# Written by the Python buildpack; sourced by slugrunner before the app's process starts.
export VIRTUAL_ENV="$HOME/.heroku/python"
export PATH="$VIRTUAL_ENV/bin:$PATH:$HOME/bin"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-true}"
export LANG="${LANG:-C.UTF-8}"
unset PYTHONHOME

# WEB_CONCURRENCY (gunicorn's default number of workers): one per WEB_MEMORY (MB, default 256)
# of the container's memory limit (1 when there is none), at most 32; a value set is kept
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
export WEB_MEMORY="${WEB_MEMORY:-256}"
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
