# Output and environment helpers shared by this buildpack's scripts (sourced, not run).

# -----> Step
topic() { echo "-----> $*"; }

# details, seven spaces in (a filter: `cmd | indent`)
indent() { sed -u 's/^/       /'; }

#  !     warning (stdout, like Heroku's, so it shows in the build log in order)
warn() {
  local line
  for line in "$@"; do echo " !     $line"; done
}

# warning lines, then exit 1
fail() {
  echo
  warn "$@"
  echo
  exit 1
}

# Export the app's config vars (one file per variable in ENV_DIR) for the build, as Heroku's
# buildpacks do; those that would break the build's own tools are left out.
export_env_dir() {
  local dir=${1:-} path name
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  for path in "$dir"/*; do
    [ -f "$path" ] || continue
    name=${path##*/}
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    case $name in
      PATH | GIT_DIR | CPATH | CPPATH | LD_PRELOAD | LIBRARY_PATH | LD_LIBRARY_PATH | HOME) ;;
      *) export "$name=$(cat "$path")" ;;
    esac
  done
}
