# A stand-in for python:3.11-slim-bookworm, for building docker/*.Dockerfile where no registry can be
# reached (CI: `make images`). Debian bookworm (debootstrapped by scripts/images.sh) with Debian's
# Python 3.11, laid out as the official image has it: `python`, `python3`, `pip`, `pip3` on PATH, pip
# installing into /usr/local as root (no externally-managed refusal), venv with ensurepip, no apt lists.
# It differs from the official image in that Python is Debian's 3.11.2 build at /usr/bin (the official one
# is python.org's latest 3.11 built into /usr/local); nothing in docker/*.Dockerfile depends on either.
ARG DEBIAN_IMAGE=localhost/loraplane-standin/debian:bookworm-minbase
FROM ${DEBIAN_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
ENV LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates netbase tzdata \
      python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
 # The official image's pip installs into /usr/local; Debian's refuses (PEP 668) until this goes.
 && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
 && ln -s /usr/bin/python3 /usr/local/bin/python \
 && ln -s /usr/bin/pip3 /usr/local/bin/pip \
 && python --version && pip --version
CMD ["python3"]
