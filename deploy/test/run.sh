#!/usr/bin/env bash
# Proves the deployments under the real engines, on loopback only:
#
#   systemd  a debootstrap'd Debian 12 with agent-sidecar installed by the README's Debian 12
#            commands (run word for word), booted with `systemd-nspawn -b` (systemd as PID 1,
#            a private network) and driven with nsenter;
#   docker   Debian's dockerd, started by hand; the image built from a local Debian 12 base
#            (Docker Hub cannot be reached) and run read-only, without capabilities, non-root;
#   compose  deploy/docker-compose.yml as written, plus deploy/test/compose.override.yml.
#
# The stand-ins for agentapi and coderd (deploy/test/standins_service.py) run as a second
# systemd unit, and as the `agent` container under Docker.
#
# Usage: bash deploy/test/run.sh [systemd] [docker]     (no argument: both)
#   It needs root, namespaces and a writable /sys/fs/cgroup. Without them it prints a line
#   starting NOTICE and exits 0, except under CI=true, where that is a failure. It needs
#   debootstrap, systemd-container, docker.io and docker-compose (.ci/run installs them) and
#   fails loudly when an engine cannot start. Everything it starts it stops, by PID and by
#   mount, however it exits.
#   ENGINES_KEEP=1 keeps the work directory (rootfs, logs) for a post-mortem.
#   DEBIAN_MIRROR overrides http://deb.debian.org/debian.
set -euo pipefail

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/deploy/test

# Fixed loopback ports. Inside the nspawn container (its own network) nothing can collide;
# under Docker they are the host's, and the compose file's agentapi URL is localhost:3284.
AGENTAPI_PORT=3284
CODERD_PORT=3285
CONTROL_PORT=3286
CONTROL_URL=http://127.0.0.1:$CONTROL_PORT
CODER_URL=http://127.0.0.1:$CODERD_PORT/
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# One debootstrap serves both engines: systemd for nspawn; python3 and its venv module for
# the README's install and for the Docker base image; procps for the unit's /bin/kill.
PACKAGES=systemd,systemd-sysv,procps,python3,python3-venv,ca-certificates
README_MARKER='<!-- deploy/test/run.sh runs this block: debian12-install -->'
CT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# -- output, assertions, timings ----------------------------------------------------------

soft_failures=()
phase_names=()
phase_secs=()
run_started=${EPOCHREALTIME/./}

pass() { printf '  ok    %s\n' "$*"; }
note() { printf '  ..    %s\n' "$*"; }
die() { printf '  FAIL  %s\n' "$*" >&2; exit 1; }
# For an assertion whose failure leaves the rest of the run meaningful: reported at once,
# and the run still exits 1 at the end.
fail_later() {
    printf '  FAIL  %s (the run goes on, and fails at the end)\n' "$*" >&2
    soft_failures+=("$*")
}
elapsed() { # microsecond timestamps -> seconds with one decimal
    local us=$(( $2 - $1 ))
    printf '%d.%d' $(( us / 1000000 )) $(( us % 1000000 / 100000 ))
}
phase_started=0
phase() {
    phase_done
    phase_names+=("$1")
    phase_started=${EPOCHREALTIME/./}
    printf '\n== %s\n' "$1"
}
phase_done() {
    if (( phase_started )); then
        phase_secs+=("$(elapsed "$phase_started" "${EPOCHREALTIME/./}")")
        phase_started=0
    fi
}
# wait_for SECONDS COMMAND...: until COMMAND succeeds; 1 if it has not after SECONDS. For state
# that only a command can report (systemd properties, docker inspect, journal lines),
# polling is the only way.
wait_for() {
    local deadline=$(( ${EPOCHREALTIME/./} + $1 * 1000000 ))
    shift
    until "$@" >/dev/null 2>&1; do
        (( ${EPOCHREALTIME/./} < deadline )) || return 1
        sleep 0.2
    done
}
now() { printf '%s' "$EPOCHREALTIME"; } # unix time, the clock the stand-ins stamp uploads with
# In a pipeline under pipefail, `grep -q` can stop reading early and fail the writer with
# SIGPIPE; these read everything.
contains() { grep -F -- "$1" >/dev/null; }
# A JSON log line's field, whatever the renderer's spacing: has_field event ready.
has_field() { grep -E -- "\"$1\": ?$2" >/dev/null; }

# `agent-sidecar status --json` on stdin -> "MESSAGES AGENT_STATUS"
status_view() {
    python3 -c 'import json, sys; a = json.load(sys.stdin)["agentapi"]; print(a["messages"], a["agent_status"])'
}

# -- privileges and tools ------------------------------------------------------------------

cgroup_mode() { # unified (cgroup v2 only) or hybrid/legacy (v1, with a name=systemd tree)
    if [[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]]; then echo unified; else echo legacy; fi
}
# The cgroup hierarchies systemd (nspawn's container) needs: ours go under each of them.
systemd_cgroup_roots() {
    if [[ $(cgroup_mode) == unified ]]; then
        echo /sys/fs/cgroup
    else
        echo /sys/fs/cgroup/systemd
        [[ -d /sys/fs/cgroup/unified ]] && echo /sys/fs/cgroup/unified
    fi
    return 0
}

missing_privilege() {
    if (( EUID != 0 )); then echo "not root"; return; fi
    if ! unshare --mount --pid --fork true 2>/dev/null; then echo "cannot unshare namespaces"; return; fi
    local root probe
    for root in $(systemd_cgroup_roots); do
        probe=$root/agent-sidecar-engines-probe-$$
        if ! mkdir "$probe" 2>/dev/null; then echo "cannot write $root"; return; fi
        rmdir "$probe"
    done
}

preflight() {
    local why
    why=$(missing_privilege)
    if [[ -n $why ]]; then
        if [[ ${CI:-} == true ]]; then
            die "the real-engine test cannot run here ($why), and CI=true requires it"
        fi
        echo "NOTICE: real-engine deployment test skipped: $why (it needs root, namespaces and a writable /sys/fs/cgroup; CI runs it)"
        exit 0
    fi
    local tool missing=()
    for tool in debootstrap systemd-nspawn nsenter unshare chroot dockerd containerd runc \
                docker-compose python3 tar; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ -x /usr/bin/docker ]] || missing+=(/usr/bin/docker)
    (( ${#missing[@]} == 0 )) || die "missing ${missing[*]}: apt-get install debootstrap systemd-container docker.io docker-compose"
}

# -- cleanup: everything started here, by PID and by mount ---------------------------------

# Host directories the engines create at fixed places (nspawn's locks, containerd's shim
# sockets, dockerd's plugin directory): removed at the end if this run made them, and only
# while empty.
engine_dirs=(/run/systemd /run/systemd/nspawn /run/containerd /run/docker /etc/docker)
new_dirs=()
remember_dirs() {
    local dir
    for dir in "${engine_dirs[@]}"; do [[ -e $dir ]] || new_dirs+=("$dir"); done
}

work=""
machine=agent-sidecar-engines-$$
cgroup_name=agent-sidecar-engines-$$
nspawn_pid=""
leader=""
dockerd_pid=""

# Processes of this run that no PID variable holds: their command line names the work
# directory (containerd, its shims, debootstrap's helpers) or their root is in it (what
# debootstrap runs chrooted).
pids_under() {
    local dir=$1 pid args root
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [[ $pid != "$$" && $pid != "$BASHPID" ]] || continue
        mapfile -d '' args 2>/dev/null <"/proc/$pid/cmdline" || continue
        root=$(readlink "/proc/$pid/root" 2>/dev/null) || continue
        [[ " ${args[*]} " == *"$dir/"* || $root == "$dir/"* ]] && echo "$pid"
    done
    return 0
}

# A long step runs in the background and is waited for: bash runs the INT/TERM trap (and
# so the cleanup) only between commands, and `wait` is one it can interrupt.
child=""
step() {
    "$@" &
    child=$!
    local rc=0
    wait "$child" || rc=$?
    child=""
    return "$rc"
}

stop_pid() { # stop_pid PID SECONDS: SIGTERM, then SIGKILL after SECONDS
    local pid=$1 timeout_s=$2 waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && (( waited < timeout_s * 5 )); do
        sleep 0.2; waited=$(( waited + 1 ))
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop_container() {
    [[ -n $nspawn_pid ]] || return 0
    # SIGTERM makes nspawn ask the container's systemd to power off, and wait for it. If it
    # had to be killed, what is left of the container is killed by cgroup (remove_cgroups).
    stop_pid "$nspawn_pid" 20
    wait "$nspawn_pid" 2>/dev/null || true
    nspawn_pid=""
    leader=""
}

stop_dockerd() {
    [[ -n $dockerd_pid ]] || return 0
    local ids
    ids=$(/usr/bin/docker ps -aq 2>/dev/null) || true
    # shellcheck disable=SC2086 # one argument per container id
    [[ -z $ids ]] || /usr/bin/docker rm -f -v $ids >/dev/null 2>&1 || true
    stop_pid "$dockerd_pid" 20
    wait "$dockerd_pid" 2>/dev/null || true
    dockerd_pid=""
}

remove_cgroups() { # the container's cgroups and the containers' (dockerd's --cgroup-parent)
    local dir
    for dir in $(systemd_cgroup_roots | sed "s#\$#/$cgroup_name#") \
               /sys/fs/cgroup/"$cgroup_name-docker" /sys/fs/cgroup/*/"$cgroup_name-docker"; do
        [[ -d $dir ]] || continue
        # Anything still in them was started by this run; then remove them deepest first.
        find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do
            kill -KILL "$pid" 2>/dev/null || true
        done
        find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    phase_done
    [[ -z $child ]] || stop_pid "$child" 5
    stop_container
    stop_dockerd
    if [[ -n $work ]]; then
        # Twice: what was killed may have been about to start another.
        for _ in 1 2; do
            for pid in $(pids_under "$work"); do kill -KILL "$pid" 2>/dev/null; done
        done
        # Mounts left under the work directory (an interrupted debootstrap, a volume), deepest
        # first; then the directory, never crossing into a mount that would not go.
        awk -v w="$work" 'index($5, w "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
            while read -r mnt; do umount -l "$mnt"; done
    fi
    remove_cgroups
    rmdir "/run/systemd/nspawn/propagate/$machine" 2>/dev/null
    local dir
    for dir in "${new_dirs[@]}"; do
        [[ -d $dir ]] && find "$dir" -depth -type d -empty -delete
    done
    if [[ -n $work ]]; then
        if [[ ${ENGINES_KEEP:-} == 1 ]]; then
            echo "kept the work directory: $work"
        else
            rm -rf --one-file-system "$work"
        fi
    fi
    exit "$rc"
}

summary() {
    phase_done
    printf '\n== timings\n'
    local i
    for i in "${!phase_names[@]}"; do
        printf '  %-62s %6ss\n' "${phase_names[$i]}" "${phase_secs[$i]}"
    done
    printf '  %-62s %6ss\n' total "$(elapsed "$run_started" "${EPOCHREALTIME/./}")"
    if (( ${#soft_failures[@]} )); then
        printf '\nFAILED: %d assertion(s):\n' "${#soft_failures[@]}" >&2
        printf '  - %s\n' "${soft_failures[@]}" >&2
        exit 1
    fi
    printf '\nall real-engine assertions passed\n'
}

# -- the shared Debian 12 rootfs -----------------------------------------------------------

rootfs=""

in_root() { # run a command in the rootfs before boot: own mount and PID namespace, host network
    unshare --mount --pid --fork --mount-proc="$rootfs/proc" \
        chroot "$rootfs" /usr/bin/env -i PATH="$CT_PATH" HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

build_wheel() {
    phase "build the wheel from the checkout"
    step python3 -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo" \
        >"$work/wheel.log" 2>&1 || { cat "$work/wheel.log"; die "pip wheel failed"; }
    wheel=$(echo "$work"/dist/agent_sidecar-*.whl)
    [[ -f $wheel ]] || die "pip wheel made no agent_sidecar wheel"
    pass "built $(basename "$wheel")"
}

debootstrap_rootfs() {
    phase "debootstrap Debian 12 (once, for both engines)"
    rootfs=$work/rootfs
    step debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log"; die "debootstrap failed"; }
    # Trust what the host trusts: CI reaches PyPI through a TLS proxy whose CA only the host's
    # bundle has. Debian's pip (in a venv too) reads this bundle.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    # debootstrap writes no /etc/hosts; an installed Debian has one, and without it
    # "localhost" (the daemon's default agentapi URL) does not resolve in a private network.
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$rootfs/etc/hosts"
    pass "bookworm with $PACKAGES ($(in_root python3 --version))"
    if [[ $run_docker == 1 ]]; then
        # The Docker base, taken before the systemd phase installs anything into the rootfs.
        tar -C "$rootfs" --numeric-owner -cf "$work/base.tar" \
            --exclude='./var/cache/apt/archives/*.deb' --exclude='./dev/*' \
            --exclude='./proc/*' --exclude='./sys/*' .
        pass "base image tarball for docker import: $(du -m "$work/base.tar" | cut -f1) MB"
    fi
}

# -- systemd: the unit under systemd as PID 1 ---------------------------------------------

in_ct() { # run a command inside the booted container, in all its namespaces, clean env
    nsenter --target "$leader" --all -- /usr/bin/env -i PATH="$CT_PATH" LANG=C.UTF-8 \
        SYSTEMD_COLORS=0 SYSTEMD_PAGER= "$@"
}
ctl_ct() { # the stand-ins' control API, from the host's python3, in the container's network
    nsenter --target "$leader" --net -- python3 "$here/ctl.py" --url "$CONTROL_URL" "$@"
}
# systemctl for jobs: bounded, because a start waits for READY=1 up to TimeoutStartSec=10min.
sctl() { in_ct timeout 60 systemctl "$@"; }
unit_prop() { in_ct systemctl show --property="$2" --value "$1"; }
# Journal lines since a point in time (not a cursor: the daemon runs as User=, so journald
# files its lines apart from systemd's, and cursors do not order across journal files).
unit_log() { # unit_log UNIX_TIME [journalctl options]: the unit's lines since then
    local since=$1; shift
    in_ct journalctl --no-pager --quiet --output=cat --unit=agent-sidecar --since="@$since" "$@"
}
unit_log_has() { unit_log "$1" | contains "$2"; }
unit_log_event() { unit_log "$1" | has_field event "\"$2\""; }

readme_install_block() { # the fenced sh block after the marker, as it is in the README
    awk -v marker="$README_MARKER" '
        $0 == marker { found = 1; next }
        found == 1 && /^```sh$/ { found = 2; next }
        found == 2 && /^```$/ { exit }
        found == 2 { print }' "$repo/README.md"
}

install_as_the_readme_says() {
    local block script
    block=$(readme_install_block)
    [[ -n $block ]] || die "README.md has no install block after the marker: $README_MARKER"
    # The block takes a package spec; it names the package, and this run installs the wheel it
    # built. That one word is the only change, and it must be there exactly once.
    script=$(printf '%s\n' "$block" | sed "s#pip install agent-sidecar\( \|\$\)#pip install /tmp/$(basename "$wheel")\1#")
    [[ $(diff <(printf '%s\n' "$block") <(printf '%s\n' "$script") | grep -c '^>') == 1 ]] ||
        die "the README's install block must have exactly one 'pip install agent-sidecar'"
    cp "$wheel" "$rootfs/tmp/"
    printf '%s\n' "$block" | sed 's/^/          # /'
    step in_root sh -euxc "$script" >"$work/install.log" 2>&1 || { tail -n 30 "$work/install.log"; die "the README's Debian 12 install failed"; }
    in_root agent-sidecar --version >/dev/null || die "agent-sidecar is not on PATH after the README's install"
    pass "the README's Debian 12 install, run word for word with the wheel as the spec: $(in_root agent-sidecar --version)"
}

prepare_systemd_rootfs() {
    phase "systemd: install into the rootfs as the README says"
    install_as_the_readme_says
    # The workspace user, the unit's User=.
    in_root useradd --create-home --shell /bin/bash coder
    install -m 0644 "$repo/systemd/agent-sidecar.service" "$rootfs/etc/systemd/system/"
    install -d -m 0700 "$rootfs/etc/agent-sidecar"
    write_env_file
    # A settings file, readable by the unit's user, that the reload check rewrites.
    printf 'settle_s = 0.5\n' >"$rootfs/etc/agent-sidecar.toml"
    chmod 0644 "$rootfs/etc/agent-sidecar.toml"
    # The stand-ins: not in the wheel, so copied in (the package next to the script that
    # imports it), with their unit and env file.
    install -d "$rootfs/opt/engines-test/standins" "$rootfs/etc/engines-test"
    install -m 0644 "$here/standins_service.py" "$rootfs/opt/engines-test/"
    install -m 0644 "$repo"/standins/*.py "$rootfs/opt/engines-test/standins/"
    install -m 0644 "$here/engines-standins.service" "$rootfs/etc/systemd/system/"
    (umask 077; printf 'CODER_AGENT_TOKEN=%s\nTASK_ID=%s\n' "$token" "$task" \
        >"$rootfs/etc/engines-test/standins.env")
    pass "unit installed unchanged, env file 0600, stand-ins unit beside it"
}

write_env_file() { # write_env_file [EXTRA_LINE]: /etc/agent-sidecar/env as the README shows
    (umask 077; {
        printf 'CODER_AGENT_URL=%s\n' "$CODER_URL"
        printf 'CODER_AGENT_TOKEN_FILE=/run/coder/agent-token\n'
        printf 'AGENT_SIDECAR_TASK_ID=%s\n' "$task"
        printf 'AGENT_SIDECAR_CONFIG=/etc/agent-sidecar.toml\n'
        [[ $# == 0 ]] || printf '%s\n' "$1"
    } >"$rootfs/etc/agent-sidecar/env")
}

boot_container() {
    phase "systemd: boot the rootfs with systemd-nspawn -b"
    local root
    # With --keep-unit and --register=no nspawn asks no systemd on the host for a scope: the
    # container lives in the cgroup it is started from. Give it cgroups of its own, so its
    # systemd never sees (or cleans up) the host's.
    for root in $(systemd_cgroup_roots); do mkdir "$root/$cgroup_name"; done
    (
        for root in $(systemd_cgroup_roots); do echo "$BASHPID" >"$root/$cgroup_name/cgroup.procs"; done
        exec systemd-nspawn --quiet --boot --register=no --keep-unit --private-network \
            --machine="$machine" --directory="$rootfs"
    ) >"$work/nspawn.log" 2>&1 </dev/null &
    nspawn_pid=$!
    local deadline=$(( ${EPOCHREALTIME/./} + 30 * 1000000 ))
    until leader=$(pgrep --parent "$nspawn_pid" --exact systemd); do
        kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/nspawn.log"; die "systemd-nspawn exited"; }
        (( ${EPOCHREALTIME/./} < deadline )) || die "no systemd in the container after 30s"
        sleep 0.1
    done
    wait_for 30 system_up || die "the container did not finish booting in 30s: $(tail -n 20 "$work/nspawn.log")"
    local state
    state=$(in_ct systemctl is-system-running) || true
    [[ $state == running ]] || note "system state $state; failed units: $(in_ct systemctl --failed --plain --no-legend | tr '\n' ' ')"
    pass "booted: systemd $(in_ct systemctl --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p') is PID 1 of the container (host PID $leader), private network"
}

systemd_phase() {
    prepare_systemd_rootfs
    boot_container

    phase "systemd: start, READY, status, socket, relay, upload"
    # The token file, readable by the unit's user (the daemon reads it, not systemd).
    in_ct install -d -o coder -g coder -m 0700 /run/coder
    printf '%s\n' "$token" | in_ct sh -c 'umask 077; cat >/run/coder/agent-token; chown coder:coder /run/coder/agent-token'
    sctl start engines-standins || die "the stand-ins unit did not start: $(in_ct journalctl -u engines-standins -n 20 --no-pager)"
    ctl_ct ready
    local t0 since
    t0=${EPOCHREALTIME/./}
    since=$(now)
    # The README's command. Type=notify: it returns once the daemon sent READY=1.
    sctl enable --now agent-sidecar 2>/dev/null ||
        die "systemctl enable --now agent-sidecar failed: $(unit_log "$since" | tail -n 20)"
    local active sub status_text
    active=$(unit_prop agent-sidecar ActiveState)
    sub=$(unit_prop agent-sidecar SubState)
    status_text=$(unit_prop agent-sidecar StatusText)
    [[ $active/$sub == active/running ]] || die "after READY: $active ($sub)"
    in_ct systemctl status agent-sidecar --no-pager | contains 'active (running)' || die "systemctl status does not say active (running)"
    [[ $status_text == "following agentapi, "* ]] || die "StatusText after READY: '$status_text'"
    unit_log_event "$since" ready || die "active, but the daemon logged no ready event"
    pass "READY=1 after $(elapsed "$t0" "${EPOCHREALTIME/./}")s: active (running), StatusText=\"$status_text\""

    local dir_mode sock_mode
    dir_mode=$(in_ct stat -c '%a %U %F' /run/agent-sidecar)
    sock_mode=$(in_ct stat -c '%a %U %F' /run/agent-sidecar/agent-sidecar.sock)
    if [[ $dir_mode == "700 coder directory" && $sock_mode == "600 coder socket" ]]; then
        pass "socket 0600 in a 0700 directory, both the unit's User= (coder)"
    else
        fail_later "socket modes: /run/agent-sidecar is '$dir_mode', the socket '$sock_mode'"
    fi

    # A send by the unit's user, through the hardened unit's socket, reaches agentapi; the
    # conversation then reaches coderd.
    in_ct runuser -u coder -- env AGENT_SIDECAR_SOCKET=/run/agent-sidecar/agent-sidecar.sock \
        agent-sidecar send "hello from systemd" || die "agent-sidecar send (as coder) failed"
    ctl_ct wait-received "hello from systemd" >/dev/null
    ctl_ct wait-stored >/dev/null
    pass "a send by the unit's User= reached agentapi; coderd holds the conversation"

    # StatusText= follows the conversation: after that turn (user message, streamed reply,
    # running -> stable, all within a second), it must show where the conversation ended.
    local messages expected
    messages=$(ctl_ct messages)
    expected="following agentapi, $messages messages, agent stable"
    if wait_status_text "$expected" 5; then
        pass "StatusText= is current after a conversation change: \"$(unit_prop agent-sidecar StatusText)\""
    else
        fail_later "StatusText= went stale: \"$(unit_prop agent-sidecar StatusText)\", the conversation has $messages messages and the agent is stable"
    fi

    local exposure
    exposure=$(in_ct systemd-analyze security --no-pager agent-sidecar.service |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    if [[ -n $exposure ]] && awk -v e="$exposure" 'BEGIN { exit !(e <= 3.0) }'; then
        pass "systemd-analyze security on the live unit: exposure $exposure (<= 3.0)"
    else
        fail_later "systemd-analyze security on the live unit: exposure '${exposure:-unknown}', above 3.0"
    fi

    phase "systemd: journald priorities"
    # Cut agentapi's event stream: the daemon logs a warning and reconnects.
    since=$(now)
    local cut
    cut=$(ctl_ct drop)
    wait_for 10 unit_log_event "$since" agentapi_disconnected ||
        die "no agentapi_disconnected in the journal 10s after cutting $cut stream(s) : $(unit_log "$since" | tail -n 10)"
    if unit_log "$since" --priority=warning | has_field event '"agentapi_disconnected"'; then
        pass "journalctl -u agent-sidecar -p warning shows the daemon's warning"
    else
        fail_later "journalctl -u agent-sidecar -p warning does not show the daemon's agentapi_disconnected warning (journald has it at priority $(in_ct journalctl --unit=agent-sidecar --since="@$since" --output=json --no-pager | grep -F agentapi_disconnected | sed -n 's/.*"PRIORITY":"\([0-9]\)".*/\1/p' | head -n1))"
    fi

    phase "systemd: reload"
    local pid
    pid=$(unit_prop agent-sidecar MainPID)
    since=$(now)
    # settle_s 60: from here on, a change reaches coderd only by the final upload at stop.
    printf 'settle_s = 60\n' >"$rootfs/etc/agent-sidecar.toml"
    sctl reload agent-sidecar || die "systemctl reload failed"
    wait_for 10 unit_log_event "$since" config_reloaded ||
        die "no config_reloaded in the journal 10s after systemctl reload: $(unit_log "$since" | tail -n 10)"
    unit_log "$since" | grep -F config_reloaded | has_field applied '\["settle_s"\]' ||
        die "the reload did not apply settle_s: $(unit_log "$since" | grep -F config_reloaded)"
    [[ $(unit_prop agent-sidecar MainPID) == "$pid" && $(unit_prop agent-sidecar ActiveState) == active ]] ||
        die "the reload restarted the daemon"
    pass "systemctl reload: the daemon re-read its settings file (settle_s applied), same PID $pid"

    phase "systemd: a bad configuration does not restart in a loop"
    since=$(now)
    write_env_file "AGENT_SIDECAR_SETTLE_S=-1"
    if sctl restart agent-sidecar 2>/dev/null; then die "the daemon started with settle_s=-1"; fi
    local result code state
    state=$(unit_prop agent-sidecar ActiveState)/$(unit_prop agent-sidecar SubState)
    result=$(unit_prop agent-sidecar Result)
    code=$(unit_prop agent-sidecar ExecMainStatus)
    # A restart would show as activating/auto-restart at once: systemd decides when it fails.
    if [[ $state == failed/failed && $code == 2 ]] && unit_log_has "$since" "invalid settle_s"; then
        pass "exit 2, unit failed (not auto-restart), the journal says: $(unit_log "$since" | grep -F 'invalid settle_s' | head -n1)"
    else
        fail_later "a bad configuration left the unit $state (result $result, main exit $code), so it restarts into the same error; the journal: $(unit_log "$since" | tail -n 3 | paste -sd '|')"
    fi
    write_env_file
    sctl stop agent-sidecar # ends a restart loop, had there been one
    in_ct systemctl reset-failed agent-sidecar

    phase "systemd: the watchdog restarts a stopped daemon"
    # With the unit's own WatchdogSec: the daemon pings every half of it, so a stopped one
    # is killed 15 to 30 s later, then restarted after RestartSec.
    sctl start agent-sidecar || die "the daemon did not start again after the bad configuration"
    local restarts watchdog
    watchdog=$(unit_prop agent-sidecar WatchdogUSec)
    pid=$(unit_prop agent-sidecar MainPID)
    restarts=$(unit_prop agent-sidecar NRestarts)
    since=$(now)
    t0=${EPOCHREALTIME/./}
    in_ct kill -STOP "$pid"
    wait_for 60 watchdog_restarted "$pid" ||
        die "the watchdog ($watchdog) did not restart the SIGSTOPped daemon in 60s: $(unit_log "$since" | tail -n 10)"
    unit_log_has "$since" "Watchdog timeout" || die "the restart was not the watchdog's"
    pass "SIGSTOP -> watchdog timeout (WatchdogSec=$watchdog) -> restarted in $(elapsed "$t0" "${EPOCHREALTIME/./}")s (PID $pid -> $(unit_prop agent-sidecar MainPID), NRestarts $restarts -> $(unit_prop agent-sidecar NRestarts))"
    if unit_log_has "$since" "Fatal Python error: Aborted" && unit_log_has "$since" '  File "'; then
        pass "PYTHONFAULTHANDLER=1: the watchdog's SIGABRT left a Python traceback in the journal"
    else
        fail_later "no Python traceback in the journal after the watchdog's SIGABRT (PYTHONFAULTHANDLER=1)"
    fi

    phase "systemd: stop makes the final upload"
    # A message the daemon has seen but not uploaded (settle_s is 60 now): only the final
    # upload from memory can bring it to coderd.
    local count
    count=$(ctl_ct add user "said just before the stop")
    wait_for 10 daemon_holds "$count stable" ||
        die "the daemon holds '$(daemon_view)', not '$count stable', 10s after a message was added"
    local stop_s
    since=$(now)
    t0=${EPOCHREALTIME/./}
    sctl stop agent-sidecar || die "systemctl stop failed"
    stop_s=$(elapsed "$t0" "${EPOCHREALTIME/./}")
    result=$(unit_prop agent-sidecar Result)
    code=$(unit_prop agent-sidecar ExecMainStatus)
    [[ $result == success && $code == 0 ]] || die "systemctl stop: result $result, exit status $code"
    unit_log "$since" | grep -F final_flush_done | has_field delivered true ||
        die "no delivered final flush in the journal: $(unit_log "$since" | tail -n 5)"
    ctl_ct --timeout 5 wait-stored --after "$since" >/dev/null
    pass "systemctl stop took ${stop_s}s, exit 0; the final upload brought the last message to coderd"

    phase "systemd: power off the container"
    stop_container
    pass "container powered off"
}

system_up() {
    local state
    state=$(in_ct timeout 10 systemctl is-system-running --wait) || true
    [[ $state == running || $state == degraded ]]
}

daemon_view() { # what the daemon holds, asked as its user: "MESSAGES AGENT_STATUS"
    in_ct runuser -u coder -- agent-sidecar status --json \
        --socket /run/agent-sidecar/agent-sidecar.sock | status_view
}
daemon_holds() { [[ $(daemon_view) == "$1" ]]; }

wait_status_text() { # wait_status_text PREFIX SECONDS
    local deadline=$(( ${EPOCHREALTIME/./} + $2 * 1000000 ))
    until [[ $(unit_prop agent-sidecar StatusText) == "$1"* ]]; do
        (( ${EPOCHREALTIME/./} < deadline )) || return 1
        sleep 0.2
    done
}

watchdog_restarted() { # the unit runs again, with another main PID
    local main
    main=$(unit_prop agent-sidecar MainPID)
    [[ $main != 0 && $main != "$1" && $(unit_prop agent-sidecar ActiveState) == active ]]
}

# -- docker and compose --------------------------------------------------------------------

docker() { /usr/bin/docker "$@"; } # Debian's client, the daemon's own version
ctl() { python3 "$here/ctl.py" --url "$CONTROL_URL" "$@"; } # stand-ins on the host's loopback

start_dockerd() {
    phase "docker: start Debian's dockerd"
    local d=$work/docker
    mkdir -p "$d"
    # Its own data root, exec root, socket, pidfile and key: it shares nothing with another
    # Docker on this machine. No bridge, no iptables, no ip_forward change: containers use
    # the host's network, and everything listens on loopback.
    printf '{"deprecated-key-path": "%s/key.json"}\n' "$d" >"$d/daemon.json"
    dockerd --config-file "$d/daemon.json" --data-root "$d/data" --exec-root "$d/exec" \
        --pidfile "$d/dockerd.pid" --host "unix://$d/docker.sock" --storage-driver overlay2 \
        --iptables=false --ip-forward=false --ip-masq=false --bridge=none \
        --cgroup-parent "/$cgroup_name-docker" --log-level warn >"$d/dockerd.log" 2>&1 &
    dockerd_pid=$!
    export DOCKER_HOST=unix://$d/docker.sock DOCKER_CONFIG=$d/client
    local deadline=$(( ${EPOCHREALTIME/./} + 30 * 1000000 ))
    until docker version >/dev/null 2>&1; do
        kill -0 "$dockerd_pid" 2>/dev/null || { tail -n 20 "$d/dockerd.log"; die "dockerd exited"; }
        (( ${EPOCHREALTIME/./} < deadline )) || { tail -n 20 "$d/dockerd.log"; die "dockerd did not answer in 30s"; }
        sleep 0.2
    done
    pass "dockerd $(docker version --format '{{.Server.Version}}') (PID $dockerd_pid), $(docker info --format '{{.Driver}}') storage"
}

build_image() {
    phase "docker: base image and docker build"
    docker import --message "Debian 12 from debootstrap, with Debian's python3" \
        "$work/base.tar" agent-sidecar-test/debian12-python:latest >/dev/null
    rm -f "$work/base.tar"
    pass "imported the debootstrap rootfs as agent-sidecar-test/debian12-python"
    # The name the compose file gives the image, so Compose uses it as is.
    step docker build --network host --build-arg PYTHON_IMAGE=agent-sidecar-test/debian12-python:latest \
        --tag agent-sidecar:local "$repo" >"$work/docker-build.log" 2>&1 ||
        { tail -n 30 "$work/docker-build.log"; die "docker build failed"; }
    pass "docker build --build-arg PYTHON_IMAGE=<the Debian 12 base> --network host"
    local id
    id=$(docker run --rm --network none --entrypoint id agent-sidecar:local)
    if [[ $id == "uid=10001(sidecar) gid=10001(sidecar) groups=10001(sidecar)" ]]; then
        pass "the image's user has its own group: $id"
    else
        fail_later "the image's USER 10001:10001 is '$id'"
    fi
}

standins_container() { # standins_container NAME: the stand-ins on the host's loopback
    # The image has Python and aiohttp; the stand-ins (not in the wheel) are mounted in.
    docker run --detach --name "$1" --network host --read-only \
        --env CODER_AGENT_TOKEN --env PYTHONPATH=/opt/standins \
        --volume "$here:/opt/engines-test:ro" --volume "$repo/standins:/opt/standins/standins:ro" \
        --entrypoint /opt/agent-sidecar/bin/python agent-sidecar:local \
        /opt/engines-test/standins_service.py --task-id "$task" >/dev/null
    ctl ready ||
        { docker logs "$1" | tail -n 20; die "the stand-ins container did not come up"; }
}

container_view() { docker exec "$1" agent-sidecar status --json | status_view; }
container_holds() { [[ $(container_view "$1") == "$2" ]]; }
health() { docker inspect --format '{{.State.Health.Status}}' "$1"; }
wait_healthy() { # wait_healthy CONTAINER SECONDS [NAME]
    local deadline=$(( ${EPOCHREALTIME/./} + $2 * 1000000 )) name=${3:-$1}
    until [[ $(health "$1") == healthy ]]; do
        [[ $(docker inspect --format '{{.State.Running}}' "$1") == true ]] ||
            { docker logs "$1" 2>&1 | tail -n 20; die "$name exited $(docker inspect --format '{{.State.ExitCode}}' "$1") before it was healthy"; }
        (( ${EPOCHREALTIME/./} < deadline )) ||
            { docker logs "$1" 2>&1 | tail -n 20; die "$name not healthy in $2s: $(health "$1")"; }
        sleep 0.2
    done
}

ports_free() { # the host's loopback ports the containers listen on (host networking)
    python3 - "$AGENTAPI_PORT" "$CODERD_PORT" "$CONTROL_PORT" <<'PY'
import socket, sys
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            sys.exit(f"127.0.0.1:{port} is taken ({exc.strerror}); the Docker phase needs it")
PY
}

docker_run_phase() {
    phase "docker: run the image read-only, no capabilities, non-root"
    ports_free || die "stop what listens there, or run: bash deploy/test/run.sh systemd"
    standins_container engines-standins
    local t0
    t0=${EPOCHREALTIME/./}
    # As the README says, with --stop-timeout above shutdown_timeout_s. The health-check
    # interval is the image's 30s shortened to 1s, so the run need not wait for it.
    # settle_s 60: a change reaches coderd only by the final upload at stop.
    docker run --detach --name engines-sidecar --network host \
        --read-only --cap-drop ALL --security-opt no-new-privileges \
        --stop-timeout 15 --health-interval 1s \
        --env CODER_AGENT_URL="$CODER_URL" --env CODER_AGENT_TOKEN \
        --env AGENT_SIDECAR_TASK_ID="$task" \
        --env AGENT_SIDECAR_AGENTAPI_URL="http://127.0.0.1:$AGENTAPI_PORT" \
        --env AGENT_SIDECAR_SETTLE_S=60 \
        agent-sidecar:local >/dev/null
    wait_healthy engines-sidecar 30
    pass "HEALTHCHECK (agent-sidecar check) turned healthy after $(elapsed "$t0" "${EPOCHREALTIME/./}")s"
    local uid
    uid=$(docker exec engines-sidecar id -u)
    [[ $uid != 0 ]] || die "the daemon runs as root"
    [[ $(docker inspect --format '{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}}' engines-sidecar) == "true [ALL] [no-new-privileges]" ]] ||
        die "the container is not read-only / without capabilities / no-new-privileges"
    pass "running as uid $uid with a read-only root, no capabilities, no-new-privileges"

    docker exec engines-sidecar agent-sidecar send "hello from docker" || die "agent-sidecar send in the container failed"
    ctl wait-received "hello from docker" >/dev/null
    pass "a send in the container reached agentapi"
    # The agent's reply streams on; stop once the daemon holds the finished turn (the user
    # message, the reply, stable again). settle_s is 60: none of it is uploaded yet.
    wait_for 10 container_holds engines-sidecar "3 stable" ||
        die "the daemon in the container holds '$(container_view engines-sidecar)', not the finished turn"

    local started stop_s code
    started=$(now)
    t0=${EPOCHREALTIME/./}
    docker stop engines-sidecar >/dev/null
    stop_s=$(elapsed "$t0" "${EPOCHREALTIME/./}")
    code=$(docker inspect --format '{{.State.ExitCode}}' engines-sidecar)
    [[ $code == 0 ]] || { docker logs engines-sidecar 2>&1 | tail -n 10; die "docker stop: exit $code"; }
    docker logs engines-sidecar 2>&1 | grep -F final_flush_done | has_field delivered true ||
        die "no delivered final flush in the container's log"
    ctl --timeout 5 wait-stored --after "$started" >/dev/null
    pass "docker stop took ${stop_s}s, exit 0; the final upload brought the conversation to coderd"

    # `docker run --user` with another uid: the README's recipe (a volume owned by that uid,
    # mounted with volume-nocopy so Docker does not copy the image's 10001:0700 onto it).
    docker volume create --driver local --opt type=tmpfs --opt device=tmpfs \
        --opt o=uid=1000,gid=1000,mode=0700 engines-run >/dev/null
    docker run --detach --name engines-sidecar-1000 --network host --user 1000:1000 \
        --read-only --cap-drop ALL --security-opt no-new-privileges --health-interval 1s \
        --mount type=volume,source=engines-run,target=/run/agent-sidecar,volume-nocopy \
        --env AGENT_SIDECAR_AGENTAPI_URL="http://127.0.0.1:$AGENTAPI_PORT" \
        agent-sidecar:local >/dev/null
    wait_healthy engines-sidecar-1000 30
    pass "docker run --user 1000:1000 with the README's volume recipe turned healthy"
    docker rm --force --volumes engines-sidecar-1000 engines-sidecar engines-standins >/dev/null
    docker volume rm engines-run >/dev/null
}

compose() {
    docker-compose --project-name agent-sidecar-engines --file "$repo/deploy/docker-compose.yml" \
        --file "$here/compose.override.yml" "$@"
}

compose_phase() {
    phase "compose: deploy/docker-compose.yml with the test overrides"
    # What `docker compose up` takes from its environment, as the compose file says.
    export CODER_AGENT_URL=$CODER_URL AGENT_SIDECAR_TASK_ID=$task
    compose up --detach --no-build >"$work/compose.log" 2>&1 ||
        { cat "$work/compose.log"; die "docker-compose up failed"; }
    ctl ready ||
        { compose logs --no-color agent | tail -n 20; die "the agent container's stand-ins did not come up"; }
    local sidecar
    sidecar=$(compose ps -q agent-sidecar)
    wait_healthy "$sidecar" 30 "the compose file's agent-sidecar"
    pass "docker-compose up: the sidecar is healthy next to the agent container"
    compose exec -T agent agent-sidecar send "hello from the agent container" ||
        { compose logs --no-color agent-sidecar | tail -n 20; die "agent-sidecar send in the agent container failed"; }
    ctl wait-received "hello from the agent container" >/dev/null
    pass "agent-sidecar send in the agent container reached agentapi (shared socket volume, uid 1000)"
    ctl wait-stored >/dev/null
    pass "the sidecar uploaded the conversation to coderd"
    compose down --volumes --timeout 15 >>"$work/compose.log" 2>&1 || die "docker-compose down failed"
    pass "docker-compose down"
}

# -- main ----------------------------------------------------------------------------------

main() {
    run_systemd=0
    run_docker=0
    (( $# )) || set -- systemd docker
    local arg
    for arg; do
        case $arg in
            systemd) run_systemd=1 ;;
            docker) run_docker=1 ;;
            *) echo "usage: $0 [systemd] [docker]" >&2; exit 2 ;;
        esac
    done

    preflight
    remember_dirs
    work=$(mktemp -d /var/tmp/agent-sidecar-engines.XXXXXX)
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    task=$(cat /proc/sys/kernel/random/uuid)
    token=$(cat /proc/sys/kernel/random/uuid) # a made-up agent token; never printed
    export CODER_AGENT_TOKEN=$token           # docker run --env CODER_AGENT_TOKEN reads it here

    echo "real-engine deployment test: $* (work directory $work)"
    build_wheel
    debootstrap_rootfs
    if (( run_systemd )); then systemd_phase; fi
    if (( run_docker )); then
        start_dockerd
        build_image
        docker_run_phase
        compose_phase
        phase "docker: stop dockerd"
        stop_dockerd
        pass "dockerd stopped"
    fi
    summary
}

# Sourced (to debug one step at a time), it only defines the functions.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
