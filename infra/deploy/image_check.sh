#!/usr/bin/env bash
# The project's image, built from infra/Dockerfile and run, on a machine with no Docker daemon and no
# container registry: buildah (Debian's package) with chroot isolation and vfs storage, over a base
# image made here from Debian's packages (debootstrap bookworm + python3, selected with the Dockerfile's
# BASE build argument), with the CPU build of torch (TORCH_SPEC / TORCH_INDEX_URL build arguments).
# The Dockerfile is built as it is; nothing here repeats its steps.
#
#   sudo bash infra/deploy/image_check.sh [--ref REF] [--keep | --run-only]
#
# Then, inside the image, as user `ray` and through a login shell (`bash --login -c`, as `ray up`'s
# `bash --login -c -i` and KubeRay's `/bin/bash -lc`), in a network and PID namespace of its own (its
# Ray cannot meet another Ray on the machine, and nothing it starts outlives the check):
#   - `python`/`ray` found on PATH after Debian's /etc/profile (infra/deploy/image/profile.sh);
#   - `ray start --head` with token auth, the digits prepared into a local folder, and a tiny
#     `ray job submit -- python -m jobs.train` (tiny U-Net, 2 CPU workers over gloo, 256 images);
#     checkpoints in a local folder and no MLflow: the container has no network, so the project's
#     stack (S3, MLflow) is not reachable from it;
#   - gcc building a Python C extension, as Triton does at run time on a GPU (the image's gcc, libc6-dev
#     and the base's Python.h);
#   - a tiny `torch.compile` (inductor on CPU);
#   - `python -m jobs.sample --help`; DDPM_GIT_COMMIT (the GIT_COMMIT build argument) set, no git.
# Each step prints PASS or FAIL; the check goes on after a failing step and exits 1 if any failed.
#
# Needs: root, `apt-get install -y buildah debootstrap`, Debian's mirror and PyPI (the image's
# apt-get and pip), ~10 GB free under the work folder. No GPU: the CUDA path (Triton, NCCL) is not run.
# Behind a TLS-inspecting proxy, PIP_CERT (the host's CA bundle for pip) is lent to the build's pip.
#   --ref REF   build the files of commit REF (`git archive`), not the working tree
#   --keep      keep the work folder (base image, image, storage) for a look inside; a rerun reuses its
#               base image and builds the image again
#   --run-only  only the run inside an image an earlier --keep left (implies --keep)
# Environment: DDPM_IMAGE_CHECK_DIR (work folder, default /var/tmp/ddpm-image-check; deleted at the end
# unless --keep), DEBIAN_MIRROR (default http://deb.debian.org/debian), TORCH_WHEEL (a local CPU wheel
# of torch, bind-mounted into the build; default: one named torch-2.13.0+cpu-cp311-* in $PIP_FIND_LINKS,
# else TORCH_SPEC=torch==2.13.0 from TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu).
#
# What a run here showed (2 shared cores, Debian bookworm host, buildah 1.28; figures in docs/deploy.md,
# "Built and run here"): the base, the build and every step inside pass (base 65 s, build 186 s, steps
# 142 s). Not covered: the CUDA build of torch, GPUs, NCCL, a network between containers, the project's
# stack (S3, MLflow) from inside the image.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${DDPM_IMAGE_CHECK_DIR:-/var/tmp/ddpm-image-check}
LOG=${WORK%/}.log
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_VERSION=2.13.0
BASE_IMAGE=localhost/ddpm-base:bookworm
IMAGE=localhost/ddpm-pipeline:check
REF=
KEEP=0
RUN_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --ref) REF=${2:?--ref needs a commit}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --run-only) RUN_ONLY=1; KEEP=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "image_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "image_check.sh: run as root (debootstrap, buildah's vfs storage and chroot isolation)" >&2
  exit 2
fi
for cmd in buildah debootstrap unshare ip git; do
  if ! command -v "$cmd" >/dev/null; then
    echo "image_check.sh: $cmd not found (apt-get install -y buildah debootstrap)" >&2
    exit 2
  fi
done
case $WORK in /var/tmp/?* | /tmp/?*) ;; *)
  echo "image_check.sh: DDPM_IMAGE_CHECK_DIR must be under /var/tmp or /tmp (it is deleted at the end)" >&2
  exit 2 ;;
esac
# Everything buildah stores stays under $WORK: deleting the folder deletes the images.
B=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot
REUSE_BASE=0
if [ -e "$WORK" ]; then
  if [ -d "$WORK/storage" ] && "${B[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    REUSE_BASE=1  # kept by an earlier --keep: the base is reused, the image built again
  else
    echo "image_check.sh: $WORK exists and holds no base image: remove it first" >&2
    exit 2
  fi
fi
if [ "$RUN_ONLY" = 1 ] && [ "$REUSE_BASE" = 0 ]; then
  echo "image_check.sh: --run-only needs the work folder an earlier --keep left in $WORK" >&2
  exit 2
fi
mkdir -p "$WORK"
exec > >(tee "$LOG") 2>&1
echo "image_check.sh: log in $LOG, work folder $WORK"

cleanup() {
  local rc=$?
  set +e
  "${B[@]}" rm --all >/dev/null 2>&1
  if [ "$KEEP" = 1 ]; then
    echo "kept $WORK (images: ${B[*]} images)"
  else
    "${B[@]}" rmi --all --force >/dev/null 2>&1
    if grep -q -E " $WORK(/| )" /proc/mounts; then
      echo "not deleting $WORK: something is still mounted under it:" >&2
      grep -E " $WORK(/| )" /proc/mounts >&2
    else
      rm -rf --one-file-system "$WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT

declare -A SECONDS_OF
timed() {  # timed NAME command...: runs it, records its wall time
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S) UTC)"
  set +e
  "$@"
  rc=$?
  set -e
  SECONDS_OF[$name]=$(($(date +%s) - t0))
  echo "=== $name: exit $rc after ${SECONDS_OF[$name]} s"
  return "$rc"
}
summary() {
  echo "=== timings"
  for k in base build run; do
    [ -n "${SECONDS_OF[$k]:-}" ] && printf '  %-6s %5d s\n' "$k" "${SECONDS_OF[$k]}"
  done
  return 0
}

# 1. The base image: Debian bookworm from Debian's packages, with python (3.11, as `python`), its venv
# module and headers (a Python.h for C extensions built at run time, as python:3.11-slim has).
# Each function returns at its first failing command (set -e does not hold inside `f || ...`).
make_base() {
  local rootfs=$WORK/rootfs ctr mnt
  if [ "$REUSE_BASE" = 1 ]; then
    echo "reusing $BASE_IMAGE kept in $WORK"
    "${B[@]}" rm --all >/dev/null && "${B[@]}" images
    return
  fi
  nice -n 10 debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-dev,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$MIRROR" || return
  if grep -q " $rootfs/" /proc/mounts; then
    echo "debootstrap left mounts under $rootfs" >&2
    return 1
  fi
  ctr=$("${B[@]}" from scratch) || return
  mnt=$("${B[@]}" mount "$ctr") || return
  cp -a "$rootfs/." "$mnt/" || return
  "${B[@]}" umount "$ctr" >/dev/null || return
  "${B[@]}" config --env LANG=C.UTF-8 \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr" || return
  "${B[@]}" commit --quiet "$ctr" "$BASE_IMAGE" >/dev/null || return
  "${B[@]}" rm "$ctr" >/dev/null || return
  rm -rf --one-file-system "$rootfs"
  "${B[@]}" images
}

# 2. The image, from infra/Dockerfile as it is, over that base, with the CPU build of torch.
build() {
  local context=$ROOT commit volumes=() torch_spec torch_index wheel=${TORCH_WHEEL:-} dir
  if [ -n "$REF" ]; then
    context=$WORK/context
    rm -rf "$context" && mkdir -p "$context" || return
    git -C "$ROOT" archive "$REF" | tar -x -C "$context" || return
    commit=$(git -C "$ROOT" rev-parse "$REF^{commit}") || return
  else
    commit=$(git -C "$ROOT" rev-parse HEAD)
    if [ -n "$(git -C "$ROOT" status --porcelain -- pyproject.toml README.md pipeline jobs infra benchmarks)" ]; then
      echo "note: the working tree differs from $commit; GIT_COMMIT says $commit all the same"
    fi
  fi
  if [ -z "$wheel" ]; then
    for dir in ${PIP_FIND_LINKS:-}; do
      for f in "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-*.whl; do
        [ -f "$f" ] && wheel=$f && break 2
      done
    done
  fi
  if [ -n "$wheel" ]; then
    volumes=(--volume "$(cd "$(dirname "$wheel")" && pwd):/wheels:ro")
    torch_spec=/wheels/$(basename "$wheel")
    torch_index=
  else
    torch_spec=${TORCH_SPEC:-torch==$TORCH_VERSION}
    torch_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  fi
  # A host whose pip trusts an extra CA (PIP_CERT: a TLS-inspecting proxy on the way to PyPI) lends the
  # build's pip that bundle, bind-mounted for the RUN steps only: nothing of it stays in the image.
  if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    printf '[global]\ncert = /etc/ddpm-build-ca.crt\n' >"$WORK/pip.conf"
    volumes+=(--volume "$PIP_CERT:/etc/ddpm-build-ca.crt:ro" --volume "$WORK/pip.conf:/etc/pip.conf:ro")
  fi
  echo "context $context, GIT_COMMIT $commit, TORCH_SPEC $torch_spec${torch_index:+, TORCH_INDEX_URL $torch_index}"
  nice -n 10 "${B[@]}" bud --isolation chroot --pull=never --layers=false \
    -f "$context/infra/Dockerfile" --ignorefile "$context/infra/Dockerfile.dockerignore" \
    --build-arg BASE="$BASE_IMAGE" --build-arg TORCH_SPEC="$torch_spec" \
    --build-arg TORCH_INDEX_URL="$torch_index" --build-arg GIT_COMMIT="$commit" \
    "${volumes[@]}" -t "$IMAGE" "$context" || return
  echo "$commit" >"$WORK/commit"
  "${B[@]}" images
}

# 3. Inside the image. The script is the login shell's -c argument, run as user ray.
read -r -d '' SMOKE <<'EOF' || true
failed=0
step() {  # step NAME command...: PASS/FAIL and its time; never stops the check
  local name=$1 t0=$(date +%s) rc
  shift
  echo "--- $name"
  "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then echo "PASS $name ($(( $(date +%s) - t0 )) s)"
  else echo "FAIL $name (exit $rc after $(( $(date +%s) - t0 )) s)"; failed=1; fi
}
login_shell() {
  echo "user $(id -un) uid $(id -u), HOME=$HOME, cwd $(pwd), login shell: $(shopt -q login_shell && echo yes || echo no)"
  echo "PATH=$PATH"
  echo "python: $(command -v python), ray: $(command -v ray)"
  shopt -q login_shell && [ "$(command -v python)" = /opt/venv/bin/python ] && [ "$(command -v ray)" = /opt/venv/bin/ray ]
}
imports() {
  python - <<'PY'
import os, shutil, torch, ray, mlflow, pipeline, jobs.train
print("torch", torch.__version__, "cuda", torch.version.cuda, "ray", ray.__version__, "mlflow", mlflow.__version__)
print("DDPM_GIT_COMMIT", os.environ.get("DDPM_GIT_COMMIT"), "git:", shutil.which("git"))
assert os.environ.get("DDPM_GIT_COMMIT") == os.environ["EXPECTED_COMMIT"], "GIT_COMMIT did not reach the image"
PY
}
ray_head() {
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
  # Its output to a file: Ray's daemons must not hold this shell's stdout.
  ray start --head --num-cpus 4 --dashboard-host 127.0.0.1 --disable-usage-stats </dev/null >"$HOME/ray-start.log" 2>&1
  local rc=$?
  tail -n 5 "$HOME/ray-start.log"
  return $rc
}
digits() {
  python -m jobs.prepare_data --out "$HOME/data/digits" </dev/null 2>&1 | grep -v -i warn | tail -n 5
  test -e "$HOME/data/digits"
}
train() {
  ray job submit --address http://127.0.0.1:8265 --submission-id image-check-train -- \
    python -m jobs.train --model.preset tiny --diffusion.num-timesteps 100 \
      --data.url "$HOME/data/digits" --data.loader-workers 1 --train.batch-size 32 --train.total-images 256 \
      --train.warmup-images 32 --train.checkpoint-every-images 256 --train.sample-every-images 0 \
      --train.log-every-steps 2 --train.progress-every-s 5 --sample.method ddim --sample.steps 10 \
      --storage.checkpoint-url "$HOME/checkpoints" --cluster.num-workers 2 </dev/null 2>&1 | tail -n 40
  local status
  status=$(ray job status --address http://127.0.0.1:8265 image-check-train 2>&1)
  printf '%s\n' "$status" | tail -n 1
  printf '%s\n' "$status" | grep -q -i succeeded
}
triton_cc() {  # what Triton does on a GPU at run time: gcc builds a Python C extension (Python.h, libc)
  local d
  d=$(mktemp -d) && cd "$d" || return
  printf '%s\n' '#include <Python.h>' \
    'static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "ccheck", NULL, -1, NULL};' \
    'PyMODINIT_FUNC PyInit_ccheck(void) { return PyModule_Create(&m); }' >ccheck.c
  gcc -shared -fPIC -O2 -I"$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    ccheck.c -o "ccheck$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" || return
  python -c 'import ccheck; print("gcc built and imported", ccheck.__file__)'
  local rc=$?
  cd - >/dev/null
  return $rc
}
compiled() {
  python - <<'PY'
import time, torch
t = time.time()
f = torch.compile(lambda x: torch.sin(x) * 2 + torch.cos(x))
x = torch.randn(128)
assert torch.allclose(f(x), torch.sin(x) * 2 + torch.cos(x), atol=1e-5)
print(f"torch.compile (inductor, CPU): compiled and ran in {time.time() - t:.1f} s")
PY
}
sample_help() {
  local out
  out=$(python -m jobs.sample --help 2>/dev/null) || return
  printf '%s\n' "$out" | head -n 3
}
step "login shell as ray: python and ray on PATH" login_shell
step "imports; GIT_COMMIT in the image" imports
step "ray start --head (token auth)" ray_head
step "digits into a local folder (jobs.prepare_data)" digits
step "ray job submit -- python -m jobs.train (tiny, 2 workers)" train
step "C compiler for Triton: gcc builds a Python extension" triton_cc
step "torch.compile (inductor on CPU)" compiled
step "python -m jobs.sample --help" sample_help
exit $failed
EOF

run() {
  local ctr
  ctr=$("${B[@]}" from --pull=never "$IMAGE") || return
  # A network namespace with only loopback and a PID namespace whose end stops every process in it.
  nice -n 10 timeout --kill-after 30 1500 unshare --net --pid --fork --kill-child --mount-proc -- bash -c \
    'ip link set lo up && "$@"' _ \
    "${B[@]}" run --isolation chroot --user ray --env EXPECTED_COMMIT="$(cat "$WORK/commit")" "$ctr" -- \
    bash --login -c "$SMOKE"
}

rc=0
if [ "$RUN_ONLY" = 1 ]; then
  "${B[@]}" inspect --type image "$IMAGE" >/dev/null && [ -f "$WORK/commit" ] \
    || { echo "--run-only: no image kept in $WORK" >&2; exit 2; }
  "${B[@]}" rm --all >/dev/null
else
  timed base make_base || rc=$?
  [ "$rc" = 0 ] && { timed build build || rc=$?; }
fi
[ "$rc" = 0 ] && { timed run run || rc=$?; }
summary
if [ "$rc" = 0 ]; then echo "image check: PASS"; else echo "image check: FAIL (exit $rc)"; fi
exit "$rc"
