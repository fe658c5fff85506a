# tailcalld in a container: the daemon in the foreground, no systemd inside.
# It needs the host's kernel: run it privileged (or with CAP_BPF and CAP_PERFMON), with the host's
# /sys/fs/bpf, /lib/modules and /usr/src (BCC compiles against the host's headers); see README.
FROM debian:bookworm-slim

# Debian's python3-bpfcc is bcc's binding (not on PyPI); gcc + libsystemd-dev build
# systemd-python, and gcc's preprocessor also gives tailcalld the syscall table; clang,
# libbpf-dev and bpftool compile the dispatcher and libbpf-style handlers against the host's BTF.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3-bpfcc python3-venv python3-dev gcc libc6-dev pkg-config libsystemd-dev \
      clang libbpf-dev bpftool \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY tailcalld ./tailcalld
RUN python3 -m venv --system-site-packages /opt/tailcalld \
 && /opt/tailcalld/bin/pip install --no-cache-dir . \
 && ln -s /opt/tailcalld/bin/tailcalld /opt/tailcalld/bin/tailcallctl /usr/local/bin/
COPY config/tailcalld.toml /etc/tailcalld/tailcalld.toml

# The control socket; mount a host folder here to reach it with the host's tailcallctl.
VOLUME ["/run/tailcalld"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s CMD ["tailcallctl", "status"]
# Logs go to the host's journal when /run/systemd/journal is mounted, else to stderr.
ENTRYPOINT ["tailcalld"]
CMD ["--config", "/etc/tailcalld/tailcalld.toml"]
