# QEMU 10.0 from bookworm-backports with our binaries.
ARG BASE
FROM ${BASE}
# The backports source: the host's bookworm stanza with the suite changed (made by
# build-images.sh from the host's apt sources).
COPY backports.sources /etc/apt/sources.list.d/backports.sources
RUN apt-get update \
 && apt-get install -y -t bookworm-backports qemu-system-x86 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && qemu-system-x86_64 --version | grep -q 'version 10\.0\.'
# Last: only this layer changes when our code does.
COPY postcopy-sidecar lab-vm /usr/local/bin/
