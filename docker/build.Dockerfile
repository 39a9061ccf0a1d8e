# The build container for our binaries: Debian 12 (the host's glibc) with what the crate's
# build needs besides Rust: a C compiler and linker (cc), the C library headers, and libclang
# for bindgen (userfaultfd-sys). Rust itself is the host's toolchain, mounted at run time.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y gcc libc6-dev libclang-dev \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
