# Debian 12's own QEMU 7.2 (plain bookworm) with our binaries.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y qemu-system-x86 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && qemu-system-x86_64 --version | grep -q 'version 7\.2\.'
# The lab looks for 7.2 under its cache directory on a host; here it is installed normally.
ENV POSTCOPY_SIDECAR_QEMU72=/usr/bin/qemu-system-x86_64
# Last: only this layer changes when our code does.
COPY postcopy-sidecar lab-vm /usr/local/bin/
