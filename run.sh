#!/usr/bin/env bash
# run.sh: train, or open JupyterLab, a shell or an ssh server, inside an official PyTorch
# CUDA container. The host needs docker, an NVIDIA driver and the NVIDIA Container Toolkit;
# CUDA, cuDNN, PyTorch and torchvision all come with the image.
#
# Usage:
#   ./run.sh [ARGS...]           train: python distill.py ARGS
#   ./run.sh train [ARGS...]     the same by name; ./run.sh train --help shows distill.py's help
#   ./run.sh jupyter [ARGS...]   JupyterLab on http://localhost:PORT (ARGS go to jupyter lab)
#   ./run.sh ssh                 a detached container with sshd, for ssh -p SSH_PORT root@localhost
#   ./run.sh shell [ARGS...]     bash in the container (ARGS go to bash: shell -c 'nvidia-smi')
#   ./run.sh help | -h | --help  this text
# A first argument that is not a mode name goes to distill.py, as do all that follow it.
#
# The folder holding run.sh is mounted at /workspace and is the working directory, so what
# the run writes there stays on the host (owned by root, as the container runs as root).
#
# Environment:
#   IMAGE     image to run (default pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime)
#   PORT      host port for jupyter (default 8888)
#   SSH_PORT  host port for ssh (default 2222)
#   NAME      name of the ssh container (default distill-ssh)
#   SSH_KEY   public key to authorise for ssh (default: the first of ~/.ssh/id_ed25519.pub,
#             ~/.ssh/id_ecdsa.pub, ~/.ssh/id_rsa.pub)
#   CPU=1     run without a GPU: no --gpus flag and no NVIDIA Container Toolkit check
#   DRY_RUN=1 print the docker command, shell-quoted, instead of running it; this skips every
#             docker check, so it works where docker is absent (the ssh key is still needed)
#
# Exit status: the container command's own (docker's 125 if the container could not start),
# or one of these, each after a one-line "run.sh: error:" message on stderr:
#   2  bad usage: PORT or SSH_PORT is not a port number, or arguments follow ssh
#   3  docker is not installed
#   4  the docker daemon cannot be reached
#   5  docker cannot use NVIDIA GPUs (NVIDIA Container Toolkit missing; CPU=1 runs without)
#   6  ssh mode found no usable SSH public key

set -euo pipefail

readonly DEFAULT_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# Scripts run by bash inside the container; the user's arguments arrive as "$@".

# The official images ship torchvision; another IMAGE may not.
IFS= read -r -d '' ENSURE_TORCHVISION <<'EOF' || true
if ! python -c 'import torchvision' 2>/dev/null; then
  echo 'run.sh: torchvision is missing from the image; installing it' >&2
  if [ -f requirements.txt ]; then
    pip install -r requirements.txt
  else
    pip install torchvision
  fi
fi
EOF

IFS= read -r -d '' TRAIN_STEP <<'EOF' || true
exec python distill.py "$@"
EOF

IFS= read -r -d '' JUPYTER_STEP <<'EOF' || true
if ! python -c 'import jupyterlab' 2>/dev/null; then
  echo 'run.sh: installing jupyterlab into the container' >&2
  pip install --quiet jupyterlab
fi
# the container runs as root, which jupyter refuses unless told; its login token stays on
exec jupyter lab --ip=0.0.0.0 --port=8888 --no-browser --allow-root "$@"
EOF

IFS= read -r -d '' SSHD_SCRIPT <<'EOF' || true
set -e
if [ ! -x /usr/sbin/sshd ]; then
  # the pytorch images have neither sshd nor apt package lists
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server
fi
mkdir -p /run/sshd /root/.ssh
ssh-keygen -A
# sshd's StrictModes rejects a key file owned by the host user, so use a root-owned copy
cp /tmp/authorized_key.pub /root/.ssh/authorized_keys
chmod 700 /root/.ssh
chmod 600 /root/.ssh/authorized_keys
# ssh logins start from a clean environment; pam_env gives them the image's paths from here
env | grep -E '^(PATH|LD_LIBRARY_PATH|CUDA_[A-Z_]*|NVIDIA_[A-Z_]*)=' >>/etc/environment
exec /usr/sbin/sshd -D -e \
  -o PasswordAuthentication=no \
  -o KbdInteractiveAuthentication=no \
  -o PermitRootLogin=prohibit-password
EOF

die() {  # die STATUS MESSAGE...: the message parts are joined by spaces
  printf 'run.sh: error: %s\n' "${*:2}" >&2
  exit "$1"
}

usage() {
  # the header comment above is the manual
  local line
  while IFS= read -r line; do
    [[ $line == '#!'* ]] && continue
    [[ $line == '#'* ]] || break
    line=${line#'#'}
    printf '%s\n' "${line# }"
  done <"${BASH_SOURCE[0]}"
}

is_on() {  # unset, empty and 0 mean off
  [[ -n ${1-} && $1 != 0 ]]
}

check_port() {  # check_port VARIABLE_NAME VALUE
  if ! [[ $2 =~ ^[0-9]{1,5}$ ]] || ((10#$2 < 1 || 10#$2 > 65535)); then
    die 2 "$1=$2 is not a port number (1-65535)"
  fi
}

preflight() {
  command -v docker >/dev/null ||
    die 3 "docker is not installed; see https://docs.docker.com/engine/install/"

  # docker info can exit 0 without a daemon (docker/cli#5900), so look for the server's version
  local info
  info=$(docker info --format '{{json .}}' 2>/dev/null) || info=
  [[ $info == *'"ServerVersion":"'[!\"]* ]] ||
    die 4 "cannot reach the Docker daemon: start it, or check that you may use it (docker group)"

  is_on "${CPU-}" && return 0
  # --gpus works when docker lists an nvidia runtime or CDI device, or finds the toolkit's hook
  if [[ $info != *'"nvidia'* ]] && ! command -v nvidia-container-runtime-hook >/dev/null; then
    die 5 "docker cannot use NVIDIA GPUs: install the NVIDIA Container Toolkit," \
"or run without a GPU: CPU=1 ./run.sh ..."
  fi
}

find_ssh_key() {  # prints the absolute path of the public key to authorise
  local key=${SSH_KEY-} candidate
  if [[ -z $key ]]; then
    for candidate in id_ed25519.pub id_ecdsa.pub id_rsa.pub; do
      if [[ -f ${HOME-}/.ssh/$candidate ]]; then
        key=${HOME-}/.ssh/$candidate
        break
      fi
    done
    [[ -n $key ]] || die 6 "no SSH public key in ~/.ssh (id_ed25519.pub, id_ecdsa.pub," \
"id_rsa.pub); make one with ssh-keygen -t ed25519, or set SSH_KEY=/path/to/key.pub"
  fi
  [[ -f $key && -r $key ]] || die 6 "SSH_KEY=$key is not a readable file"

  local first_line=
  IFS= read -r first_line <"$key" || true
  [[ $first_line != *PRIVATE* ]] ||
    die 6 "$key is a private key; give its .pub file, which is all the container needs"

  # docker takes a relative -v source for a named volume
  [[ $key == /* ]] || key=$PWD/$key
  printf '%s\n' "$key"
}

main() {
  local mode=train
  case ${1-} in
    train | jupyter | ssh | shell) mode=$1; shift ;;
    help | -h | --help) usage; exit 0 ;;
  esac
  if [[ $mode == ssh && $# -gt 0 ]]; then
    die 2 "ssh takes no arguments (got: $*)"
  fi

  local image=${IMAGE:-$DEFAULT_IMAGE}
  local port=${PORT:-8888} ssh_port=${SSH_PORT:-2222} name=${NAME:-distill-ssh}
  check_port PORT "$port"
  check_port SSH_PORT "$ssh_port"

  is_on "${DRY_RUN-}" || preflight

  local script=${BASH_SOURCE[0]}
  [[ $script == */* ]] || script=./$script
  local project_dir
  project_dir=$(cd "${script%/*}" && pwd -P)

  local args=(run --init)
  is_on "${CPU-}" || args+=(--gpus all)
  # the default 64 MB of /dev/shm is too small for DataLoader workers
  args+=(--ipc=host -v "$project_dir":/workspace -w /workspace)
  # without a terminal Python would hold its progress lines in a buffer
  args+=(-e PYTHONUNBUFFERED=1)

  # -t only when both ends are a terminal: through a pseudo-terminal, a log file gets \r\n
  # line ends. -i only with -t, as a run sent to the background (./run.sh >log &) is stopped
  # by the terminal once docker reads stdin; shell mode always has -i, so commands can be
  # piped into it.
  local terminal=0
  [[ -t 0 && -t 1 ]] && terminal=1

  case $mode in
    train | jupyter)
      args+=(--rm)
      ((terminal)) && args+=(-it)
      ;;
    shell)
      args+=(--rm -i)
      ((terminal)) && args+=(-t)
      ;;
  esac

  case $mode in
    train)
      args+=("$image" bash -c "$ENSURE_TORCHVISION$TRAIN_STEP" run.sh "$@")
      ;;
    jupyter)
      args+=(-p "$port":8888 "$image" bash -c "$ENSURE_TORCHVISION$JUPYTER_STEP" run.sh "$@")
      ;;
    shell)
      args+=("$image" bash "$@")
      ;;
    ssh)
      local key
      key=$(find_ssh_key)
      # no --rm: a container whose sshd failed stays for docker logs
      args+=(-d --name "$name" -p "$ssh_port":22 -v "$key":/tmp/authorized_key.pub:ro)
      args+=("$image" bash -c "$SSHD_SCRIPT")
      ;;
  esac

  if is_on "${DRY_RUN-}"; then
    local line
    printf -v line '%q ' docker "${args[@]}"
    printf '%s\n' "${line% }"
    exit 0
  fi

  case $mode in
    ssh)
      docker "${args[@]}"
      echo "run.sh: started $name; the first start installs sshd (watch: docker logs -f $name)"
      echo "log in:  ssh -p $ssh_port root@localhost"
      echo "stop it: docker rm -f $name"
      ;;
    jupyter)
      echo "run.sh: JupyterLab will be at http://localhost:$port/ with the token it prints" >&2
      exec docker "${args[@]}"
      ;;
    *)
      exec docker "${args[@]}"
      ;;
  esac
}

main "$@"
