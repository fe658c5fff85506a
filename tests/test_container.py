"""The Dockerfile's image, built and run for real with podman (scripts/podman.sh): tailcalld is PID 1
of the container, a handler is attached through the mounted socket with the host's tailcallctl and
counts, and the pins go on tracing once the container has stopped.  Run privileged, and with the
least capabilities measured on this kernel (README, "In a container"); each of those is shown to be
needed by a start that fails without it."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import (
    REPO,
    VENV_BIN,
    counting_handler,
    fchmodat,
    read_counter,
    write_config,
)

# The image build comes with the first test; where the container storage is plain copies (the
# vfs driver podman.sh picks on an overlayfs, as in a fresh-machine chroot) it takes minutes.
pytestmark = pytest.mark.timeout(1800)

PODMAN = REPO / "scripts" / "podman.sh"
# The apt and pip layers, tagged so that they outlive the per-run image: a rerun with only the code
# changed builds in seconds.  Deliberately kept, like pip's cache; `podman rmi` it to start afresh.
CACHE_IMAGE = "localhost/tailcalld-test-cache:deps"
SECCOMP_DEFAULT = Path("/usr/share/containers/seccomp.json")  # the engine's own default profile
LEAST_CAPS = ["--cap-drop", "ALL", "--cap-add", "BPF", "--cap-add", "PERFMON"]
ADM_GID = 4  # Debian's group adm, in the image as on every Debian host


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(PODMAN), *args], capture_output=True, text=True, timeout=timeout)


def checked(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"{' '.join(map(str, r.args))}: status {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def image(machine: None) -> Iterator[str]:
    """The image, built from this checkout under a name of this run's, removed at the end."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: scripts/setup.sh (make setup) installs it with runc")
    checked(podman("base", timeout=900))  # the Dockerfile's FROM, in local storage (no registry here)
    tag = f"localhost/tailcalld-test-{secrets.token_hex(4)}:latest"
    try:
        previous = podman("image", "inspect", "--format", "{{.Id}}", CACHE_IMAGE).stdout.strip()
        checked(podman("build", "--target", "deps", "-t", CACHE_IMAGE, str(REPO), timeout=1800))
        if previous and podman("image", "inspect", "--format", "{{.Id}}", CACHE_IMAGE).stdout.strip() != previous:
            podman("rmi", previous)  # the cache of an older pyproject.toml, untagged now; kept if in use
        checked(podman("build", "-t", tag, str(REPO), timeout=1800))
        yield tag
    finally:
        podman("rmi", "-f", tag)


@dataclass
class Container:
    name: str
    run_dir: Path  # the host folder mounted at /run/tailcalld: the socket is there
    config: Path  # the host file mounted as its tailcalld.toml

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The host's tailcallctl, through the mounted socket."""
        return subprocess.run([str(VENV_BIN / "tailcallctl"), "--socket", str(self.run_dir / "tailcalld.sock"), *args],
                              capture_output=True, text=True, timeout=120)

    def state(self) -> dict[str, object]:
        inspected = json.loads(checked(podman("inspect", "--type", "container", self.name)))
        status: dict[str, object] = inspected[0]["State"]
        return status

    def logs(self) -> str:
        r = podman("logs", self.name)
        return r.stdout + r.stderr


@contextlib.contextmanager
def container(image: str, tmp: Path, pin_dir: Path, engine_args: list[str], **settings: object) -> Iterator[Container]:
    """The image run as README.md says, on a pin folder and a socket folder of this test's (and
    ``settings`` in its config); the container is removed whatever happens (the pins are the caller's)."""
    run_dir = tmp / "run"
    run_dir.mkdir(parents=True)
    config = write_config(tmp / "tailcalld.toml", socket="/run/tailcalld/tailcalld.sock", pin_dir=pin_dir,
                          state_dir="/var/lib/tailcalld", **settings)
    c = Container(f"tailcalld-test-{secrets.token_hex(4)}", run_dir, config)
    try:
        checked(podman("run", "-d", "--name", c.name, *engine_args,
                       "-v", "/sys/fs/bpf:/sys/fs/bpf",
                       "-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro",
                       "-v", f"{run_dir}:/run/tailcalld",
                       "-v", f"{config}:/etc/tailcalld/tailcalld.toml:ro", image))
        yield c
    finally:
        podman("rm", "-f", "-t", "5", c.name)


def wait_ready(c: Container) -> dict[str, object]:
    """The daemon's ping reply once it answers; fails with the container's logs if it exits first."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = c.ctl("ping", "--json")
        if r.returncode == 0:
            reply: dict[str, object] = json.loads(r.stdout)
            return reply
        assert c.state()["Running"], f"the container stopped:\n{c.logs()}"
        time.sleep(0.2)
    raise AssertionError(f"tailcalld in the container did not answer within 90 s:\n{c.logs()}")


def wait_exited(c: Container) -> dict[str, object]:
    deadline = time.monotonic() + 90
    while (state := c.state())["Running"]:
        assert time.monotonic() < deadline, f"the container is still running:\n{c.logs()}"
        time.sleep(0.2)
    return state


def seccomp_allowing_bpf(path: Path) -> Path:
    """The engine's default seccomp profile with bpf() and perf_event_open() allowed to every
    container (it allows them only with CAP_SYS_ADMIN): the kernel's own checks of CAP_BPF and
    CAP_PERFMON then decide.  README shows the same change as a jq filter."""
    profile = json.loads(SECCOMP_DEFAULT.read_text())
    gated = {"bpf", "perf_event_open"}
    kept = []
    for rule in profile["syscalls"]:
        if gated & set(rule["names"]):
            if rule["action"] != "SCMP_ACT_ALLOW":
                continue  # the EPERM for containers without CAP_SYS_ADMIN
            rule["includes"] = {}
        kept.append(rule)
    profile["syscalls"] = kept
    path.write_text(json.dumps(profile))
    return path


def engine_args(configuration: str, tmp: Path) -> list[str]:
    if configuration == "privileged":
        return ["--privileged"]
    if configuration == "CAP_SYS_ADMIN alone, default seccomp":
        return ["--cap-drop", "ALL", "--cap-add", "SYS_ADMIN"]
    if configuration == "least capabilities, seccomp unconfined":
        return [*LEAST_CAPS, "--security-opt", "seccomp=unconfined"]
    if not SECCOMP_DEFAULT.exists():
        pytest.skip(f"the engine's default seccomp profile is not at {SECCOMP_DEFAULT}")
    return [*LEAST_CAPS, "--security-opt", f"seccomp={seccomp_allowing_bpf(tmp / 'seccomp.json')}"]


@pytest.mark.parametrize("configuration", ["privileged", "least capabilities, seccomp unconfined",
                                           "least capabilities, default seccomp allowing bpf",
                                           "CAP_SYS_ADMIN alone, default seccomp"])
def test_the_image_runs_as_pid_1_attaches_counts_and_its_pins_outlive_it(image: str, tmp_path: Path,
                                                                          pin_root: Path, configuration: str) -> None:
    counter = pin_root / "maps" / "counter"
    source = tmp_path / "count.c"
    source.write_text(counting_handler(counter))
    with container(image, tmp_path, pin_root / "daemon", engine_args(configuration, tmp_path)) as c:
        assert wait_ready(c)["pid"] == 1  # the daemon is the container's init
        # The attach compiles in a worker whose parent is PID 1: it must not take that for an orphan.
        attach = c.ctl("attach", "fchmodat", str(source))
        assert attach.returncode == 0, attach.stdout + attach.stderr + c.logs()
        fchmodat(100)
        assert read_counter(counter) == 100
        listed = json.loads(checked(c.ctl("list", "--json")))
        assert [s["syscall"] for s in listed["slots"]] == ["fchmodat"], listed

        checked(podman("stop", "-t", "30", c.name, timeout=60))
        state = wait_exited(c)
        assert state["ExitCode"] == 0, c.logs()  # SIGTERM to PID 1 is a plain stop
        fchmodat(100)  # the daemon is gone; the pinned dispatcher and handler still run
        assert read_counter(counter) == 200


@pytest.mark.parametrize(("missing", "args", "said"), [
    ("CAP_BPF", ["--cap-drop", "ALL", "--cap-add", "PERFMON", "--security-opt", "seccomp=unconfined"],
     "Operation not permitted"),  # creating the prog array
    ("CAP_PERFMON", ["--cap-drop", "ALL", "--cap-add", "BPF", "--security-opt", "seccomp=unconfined"],
     "the kernel refused"),  # loading the dispatcher, a tracing program
    ("bpf() in the engine's default seccomp profile (allowed there with CAP_SYS_ADMIN only)", LEAST_CAPS,
     "Operation not permitted"),
])
def test_each_part_of_the_least_configuration_is_needed(image: str, tmp_path: Path, pin_root: Path,
                                                        missing: str, args: list[str], said: str) -> None:
    """The measurement behind README's capability list, made again: without any one of them the
    start fails, says why and exits non-zero."""
    with container(image, tmp_path, pin_root / "daemon", args) as c:
        state = wait_exited(c)
        assert state["ExitCode"] != 0, f"started without {missing}:\n{c.logs()}"
        reason = [line for line in c.logs().splitlines() if "cannot start" in line]
        assert reason and said in reason[0], c.logs()


def test_allowed_group_needs_cap_chown_in_a_container(image: str, tmp_path: Path, pin_root: Path) -> None:
    """README: add CHOWN when the config sets allowed_group (the socket goes to that group)."""
    unconfined = ["--security-opt", "seccomp=unconfined"]
    with container(image, tmp_path / "without", pin_root / "daemon", [*LEAST_CAPS, *unconfined],
                   allowed_group="adm") as c:
        assert wait_exited(c)["ExitCode"] != 0, c.logs()
        said = [line for line in c.logs().splitlines() if "cannot start" in line]
        assert said and "Operation not permitted" in said[0] and "tailcalld.sock" in said[0], c.logs()
    with container(image, tmp_path / "with", pin_root / "daemon", [*LEAST_CAPS, "--cap-add", "CHOWN", *unconfined],
                   allowed_group="adm") as c:
        wait_ready(c)
        assert (c.run_dir / "tailcalld.sock").stat().st_gid == ADM_GID  # no user namespace: the host's gid 4


def slow_libbpf_source(levels: int = 22) -> str:
    """libbpf C whose preprocessing takes clang seconds (2**levels expansions): clang runs as a child
    of the compile worker, so a compile killed at its timeout orphans it."""
    lines = ["#include <linux/bpf.h>", "#include <bpf/bpf_helpers.h>", "#define E0(x) x+1",
             *[f"#define E{i}(x) E{i - 1}(E{i - 1}(x))" for i in range(1, levels + 1)],
             f'SEC("raw_tracepoint/sys_enter") int slow(void *ctx) {{ return E{levels}(0); }}',
             'char _license[] SEC("license") = "GPL";']
    return "\n".join(lines) + "\n"


def zombie_children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    zombies = []
    for kid in kids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                zombies.append(kid)
    return zombies


def test_as_pid_1_the_daemon_reaps_the_clang_of_a_killed_compile(image: str, tmp_path: Path, pin_root: Path) -> None:
    """A compile killed at compile_timeout orphans its clang, and the orphans of a container go to
    its PID 1, the daemon: it must wait for them, or each stays a zombie."""
    source = tmp_path / "slow.bpf.c"
    source.write_text(slow_libbpf_source())
    with container(image, tmp_path, pin_root / "daemon", ["--privileged"]) as c:
        assert wait_ready(c)["pid"] == 1
        # A short compile_timeout only now: at the start it also bounds bpftool's vmlinux.h.
        with c.config.open("a") as config:  # the same file (inode): the container sees the change
            config.write("compile_timeout = 1.0\n")
        checked(podman("kill", "--signal", "HUP", c.name))
        deadline = time.monotonic() + 60
        while "reloaded" not in c.logs():
            assert time.monotonic() < deadline and c.state()["Running"], c.logs()
            time.sleep(0.2)
        for _ in range(3):
            r = c.ctl("attach", "fchmodat", str(source))
            assert r.returncode != 0 and "[compile_timeout]" in r.stderr, r.stdout + r.stderr
        daemon = int(c.state()["Pid"])  # as the host sees it
        deadline = time.monotonic() + 60
        while zombies := zombie_children(daemon):
            assert time.monotonic() < deadline, f"zombies of the daemon: {zombies}"
            time.sleep(0.2)
        assert c.ctl("ping").returncode == 0
