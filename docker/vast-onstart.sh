#!/usr/bin/env bash
# Vast.ai on-start helper, for the ssh/jupyter launch modes: there Vast replaces the image's
# ENTRYPOINT with its own init and runs the template's on-start script instead. Use as on-start:
#
#   klein-vast-onstart            (or: bash /usr/local/bin/klein-vast-onstart)
#
# It (1) copies the container environment into /etc/environment, which ssh logins do not otherwise
# see, so `python -m worker enqueue ...` works from a shell on the box, and (2) starts the supervising
# entrypoint in the background as the unprivileged `worker` user, logging to $KLEIN_LOG_FILE.
# In the "args" (entrypoint) launch mode none of this is needed: the image starts the workers itself.
set -euo pipefail

LOG_FILE="${KLEIN_LOG_FILE:-/var/log/klein-worker.log}"
ENTRYPOINT="${KLEIN_ENTRYPOINT:-/usr/local/bin/klein-entrypoint}"
RUN_AS="${KLEIN_RUN_AS:-worker}"
ENV_FILE="${KLEIN_ENV_FILE:-/etc/environment}"

# KEY="VALUE" lines for pam_env; values it cannot represent (quotes, newlines) are left out.
export_environment() {
    local name value tmp
    tmp="$(mktemp)"
    if [[ -f "$ENV_FILE" ]]; then
        # Keep what the file had for names this container does not set (PATH from the image, say).
        grep -vE "^($(compgen -e | paste -sd '|' -))=" "$ENV_FILE" >"$tmp" || true
    fi
    while IFS= read -r name; do
        case "$name" in
            HOME | PWD | OLDPWD | SHLVL | _ | HOSTNAME | TERM | USER | LOGNAME) continue ;;
        esac
        value="${!name}"
        [[ "$value" == *$'\n'* || "$value" == *'"'* ]] && continue
        printf '%s="%s"\n' "$name" "$value" >>"$tmp"
    done < <(compgen -e)
    # The file now carries credentials (AWS keys, HF token): readable by root only; pam_env reads
    # it as root at login.
    install -m 0600 "$tmp" "$ENV_FILE"
    rm -f "$tmp"
}

if [[ -w "$ENV_FILE" || (! -e "$ENV_FILE" && -w "$(dirname "$ENV_FILE")") ]]; then
    export_environment
fi

cmd=("$ENTRYPOINT")
if [[ "$(id -u)" == 0 ]] && id "$RUN_AS" >/dev/null 2>&1; then
    # runuser keeps the environment (no login shell), which is what carries the configuration.
    cmd=(runuser -u "$RUN_AS" -- "$ENTRYPOINT")
fi

touch "$LOG_FILE"
if [[ "${1:-}" == "--foreground" ]]; then
    exec "${cmd[@]}" >>"$LOG_FILE" 2>&1
fi
nohup "${cmd[@]}" >>"$LOG_FILE" 2>&1 &
echo "klein-worker started (pid $!), logging to $LOG_FILE"
