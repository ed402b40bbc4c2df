# Shared by scripts/test and scripts/run: make this checkout runnable on a fresh
# Debian machine. Sourced, not executed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAILSYNCD_VENV:-$REPO/.venv}"

ensure_system_packages() {
    # Dovecot is the real IMAP/POP3 server that the tests and the demo run on loopback;
    # openssl makes its throwaway CA; systemd-analyze verifies the unit files; strace lets
    # the tests read the order of a real sync's system calls; neomutt, driven in tmux, is
    # the mail reader the mbox tests open our files with; postgresql gives the tests a
    # private PostgreSQL 15 cluster (initdb, pg_ctl) for the shared state database.
    local missing=()
    command -v dovecot >/dev/null 2>&1 || missing+=(dovecot-imapd dovecot-pop3d)
    [ -x /usr/lib/dovecot/pop3 ] || missing+=(dovecot-pop3d)
    [ -x /usr/lib/dovecot/imap ] || missing+=(dovecot-imapd)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    for extra in "$@"; do
        case "$extra" in
            systemd-analyze) command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd) ;;
            strace) command -v strace >/dev/null 2>&1 || missing+=(strace) ;;
            neomutt) command -v neomutt >/dev/null 2>&1 || missing+=(neomutt) ;;
            tmux) command -v tmux >/dev/null 2>&1 || missing+=(tmux) ;;
            postgresql) [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql) ;;
        esac
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "installing ${missing[*]} ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
    # Reinstall only when pyproject.toml changed since the last install.
    local stamp="$VENV/.mailsyncd-installed"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q -e "$REPO[test]"
        touch "$stamp"
    fi
}
