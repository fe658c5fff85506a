# tailcalld in a container: the daemon in the foreground (PID 1), no systemd inside.
# It needs the host's kernel: run it privileged or with the capabilities README.md lists, with the
# host's /sys/fs/bpf, /lib/modules and /usr/src (BCC compiles against the host's headers).
FROM debian:bookworm-slim AS deps

# Debian's python3-bpfcc is bcc's binding (not on PyPI); gcc + libsystemd-dev build
# systemd-python, and gcc's preprocessor also gives tailcalld the syscall table; clang,
# libbpf-dev and bpftool compile the dispatcher and libbpf-style handlers against the host's BTF.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3-bpfcc python3-venv python3-dev gcc libc6-dev pkg-config libsystemd-dev \
      clang libbpf-dev bpftool \
 && rm -rf /var/lib/apt/lists/*

# The dependencies in a layer of their own, keyed on pyproject.toml alone: a change to the code
# rebuilds only the small layer below, not the pip downloads and systemd-python's compile.
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -m venv --system-site-packages /opt/tailcalld \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /opt/tailcalld/bin/pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

FROM deps
COPY README.md ./
COPY tailcalld ./tailcalld
RUN /opt/tailcalld/bin/pip install --no-cache-dir --no-deps . \
 && ln -s /opt/tailcalld/bin/tailcalld /opt/tailcalld/bin/tailcallctl /usr/local/bin/
COPY config/tailcalld.toml /etc/tailcalld/tailcalld.toml

# The control socket; mount a host folder here to reach it with the host's tailcallctl.
VOLUME ["/run/tailcalld"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s CMD ["tailcallctl", "ping"]
# Logs go to the host's journal when /run/systemd/journal is mounted, else to stderr.
ENTRYPOINT ["tailcalld"]
CMD ["--config", "/etc/tailcalld/tailcalld.toml"]
