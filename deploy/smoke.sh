#!/usr/bin/env bash
# make deploy-smoke: `ray up deploy/onprem.yaml` for real, against this machine over SSH; then the
# server's health, a classification, a short training and /metrics; then `ray down`. Each step is
# timed. Needs root (it installs and starts an SSH server) and the venv (make install). CI does
# not run it: it adds a user and an sshd to the machine, and takes minutes.
#
# The node's user is `alexnet-smoke`, an unprivileged user of its own, not root: `ray up` runs
# `ray stop` on the head (onprem.yaml's start commands), and so does `ray down` (hard-coded in Ray),
# and `ray stop` signals every Ray process it is allowed to: as root, every Ray on this machine,
# other people's included; as its own user, its own alone. Its Ray also keeps to the user's temp
# dir (RAY_TMPDIR, where no one else's `ray.init(address="auto")` looks) and to ports no default
# Ray takes. The launcher's cluster state and config cache go to a temp dir of its own too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
user="${SMOKE_USER:-alexnet-smoke}"
declare -A port=([ray]=26379 [dashboard]=28265 [client]=20001 [agent]=25365 [grpc]=25051 [metrics]=29464)
target="127.0.0.1:${port[grpc]}"
work="$(mktemp -d /tmp/alexnet-mp-smoke.XXXXXX)"
config="$work/onprem-smoke.yaml"
cluster_up=0 step_name="" timings=()

finish_step() {
    [[ -n "$step_name" ]] || return 0
    timings+=("$(awk -v name="$step_name" -v t0="$step_t0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%-56s %7.1f s", name, t1 - t0 }')")
    step_name=""
}
step() { finish_step; step_name="$1"; step_t0="$(date +%s.%N)"; echo; echo "=== $1  ($(date -u +%H:%M:%S) UTC)"; }

sha10() { printf %s "$1" | sha256sum | cut -c1-10; }

# The smoke user's processes are ours: by pid, TERM, then KILL what is left after 10 s.
stop_smoke_user_processes() {
    for pid in $(pgrep -u "$user" || true); do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 20); do pgrep -u "$user" -r R,S,D >/dev/null || return 0; sleep 0.5; done
    for pid in $(pgrep -u "$user" -r R,S,D || true); do kill -KILL "$pid" 2>/dev/null || true; done
}

cleanup() {
    local rc=$?
    finish_step
    if (( cluster_up )); then  # after a failure too: leave nothing running
        echo "=== cleanup after a failure: ray down"
        ray down -y "$config" || true
    fi
    [[ -f "$work/sshd.pid" ]] && { kill "$(cat "$work/sshd.pid")" 2>/dev/null || true; }
    stop_smoke_user_processes
    rm -rf "$work" "/tmp/ray_ssh_$(sha10 "$(id -un)")/$(sha10 alexnet-mp-smoke)"  # Ray's SSH control dir for the cluster
    echo; echo "=== timings (exit $rc)"; printf '%s\n' "${timings[@]}"
    exit "$rc"
}
trap cleanup EXIT
started="$(date +%s)"

step "1. sshd on 127.0.0.1, a throwaway key"
if ! [[ -x /usr/sbin/sshd ]] || ! command -v rsync nc >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync netcat-openbsd >/dev/null
fi
id "$user" &>/dev/null || useradd --create-home --shell /bin/bash "$user"
usermod -p '*' "$user"  # no password, but not locked: sshd without PAM refuses locked accounts even with a key
home="$(getent passwd "$user" | cut -d: -f6)"
ssh-keygen -q -t ed25519 -N '' -C alexnet-mp-smoke -f "$work/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
install -d -m 700 -o "$user" -g "$user" "$home/.ssh" "$home/rt"
install -m 600 -o "$user" -g "$user" "$work/id_ed25519.pub" "$home/.ssh/authorized_keys"
# The node as its owner would set it up: Ray's files in the user's own temp dir.
grep -qs RAY_TMPDIR "$home/.bashrc" || echo 'export RAY_TMPDIR="$HOME/rt"' >> "$home/.bashrc"
ssh_port=22  # Ray's SSH has no port option; on another port it goes through netcat (smoke_config.py)
ss -Hltn "sport = :22" | grep -q . && ssh_port=22022
cat > "$work/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $ssh_port
HostKey $work/host_key
PidFile $work/sshd.pid
AllowUsers $user
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
EOF
mkdir -p /run/sshd
/usr/sbin/sshd -f "$work/sshd_config" -E "$work/sshd.log"
ssh -i "$work/id_ed25519" -p "$ssh_port" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    "$user@127.0.0.1" 'echo "ssh: $(whoami)@$(hostname) on port '"$ssh_port"'"'

step "2. ray up (local provider, 127.0.0.1)"
HOME="$work" ray get-auth-token --generate >/dev/null  # Ray's own token maker, into $work/.ray/auth_token
chmod 600 "$work/.ray/auth_token"
python deploy/smoke_config.py deploy/onprem.yaml --user "$user" --key "$work/id_ed25519" --ssh-port "$ssh_port" \
    --token "$work/.ray/auth_token" $(for name in "${!port[@]}"; do echo "--port $name=${port[$name]}"; done) > "$config"
export TMPDIR="$work/launcher" && mkdir -p "$TMPDIR"  # Ray's files on the launcher side: state, config cache
cluster_up=1
ray up -y --no-config-cache "$config"

step "3. wait for the server"
until grpcurl -plaintext -max-time 5 "$target" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; do
    if (( $(date +%s) - started > 1500 )); then echo "no server; its log:"; cat "$home/.alexnet-mp/serve.log"; exit 1; fi
    sleep 2
done

step "4. health (grpcurl) and the CLI on the head (ray exec)"
grpcurl -plaintext "$target" grpc.health.v1.Health/Check
ray exec "$config" "alexnet-mp --target $target info"

step "5. classify an image"
python -c "import numpy as np; from PIL import Image; x = (np.indices((256, 256)).sum(0) // 16 % 2 * 255).astype(np.uint8)
Image.fromarray(np.stack([x] * 3, -1)).save('$work/checks.png')"
alexnet-mp --target "$target" classify "$work/checks.png" --top-k 3

step "6. a short training (built-in data, 1 epoch, width 0.25)"
alexnet-mp --target "$target" train --builtin --set epochs=1 --set width=0.25 --set steps_per_epoch=6 \
    --set batch_size=16 --set val_images=64 --set publish_every=3 --follow

step "7. scrape /metrics"
curl -sf "http://127.0.0.1:${port[metrics]}/metrics" > "$work/metrics.txt"
echo "$(grep -c '^alexnet_' "$work/metrics.txt") alexnet_ samples; some of them:"
grep -E '^alexnet_(training_steps_total|training_loss|model_version|classify_requests_total)' "$work/metrics.txt"

step "8. stop the server, ray down"
ray exec "$config" "~/alexnet-mp/deploy/start-server.sh stop"
ray down -y "$config"
cluster_up=0
sleep 3
left="$(pgrep -u "$user" -r R,S,D -a || true)"  # not zombies: sshd reaps its sessions
echo "processes of $user left: ${left:-none}"
finish_step
echo; echo "smoke run passed in $(( $(date +%s) - started )) s"
