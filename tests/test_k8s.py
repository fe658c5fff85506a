"""contrib/k8s/: every manifest valid against the Kubernetes schema (kubernetes-validate bundles the
schemas, so this needs no cluster and no network), the ConfigMaps read by tailcalld's own config
loader and apply-file reader, the shipped handler loaded by a real daemon, and the DaemonSet's
parts agreeing with each other and with what tests/test_container.py measured."""

from __future__ import annotations

import copy
import os
import json
import secrets
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from harness import REPO, VENV_BIN, DaemonProcess
from tailcalld import desired
from tailcalld.config import load_settings
from test_container import LEAST_CAPS, checked, image, podman  # noqa: F401  (image: the fixture)

# The image build comes with the first test; where the container storage is plain copies (the
# vfs driver podman.sh picks on an overlayfs, as in a fresh-machine chroot) it takes minutes.
pytestmark = pytest.mark.timeout(1800)

K8S = REPO / "contrib" / "k8s"
# The oldest Kubernetes release still in wide use that has everything the manifests use, and the newest bundled.
VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]
METRICS_PORT = 9479


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def resource(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def daemonset() -> dict[str, Any]:
    return resource("DaemonSet", "tailcalld")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = daemonset()["spec"]["template"]["spec"]
    return spec


def daemon_container() -> dict[str, Any]:
    [c] = [c for c in pod_spec()["containers"] if c["name"] == "tailcalld"]
    return c


def config_text() -> str:
    text: str = resource("ConfigMap", "tailcalld-config")["data"]["tailcalld.toml"]
    return text


def config() -> dict[str, Any]:
    return tomllib.loads(config_text())


def mount_of(volume: str, container: dict[str, Any]) -> dict[str, Any]:
    [m] = [m for m in container["volumeMounts"] if m["name"] == volume]
    return m


def host_path_volumes() -> dict[str, str]:
    """volume name -> host path."""
    return {v["name"]: v["hostPath"]["path"] for v in pod_spec()["volumes"] if "hostPath" in v}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    docs = documents()
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "DaemonSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_can_fail() -> None:
    """A misspelt field of the DaemonSet is caught: the check above is a real one."""
    broken = copy.deepcopy(daemonset())
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_the_config_map_loads_with_tailcallds_own_loader(tmp_path: Path) -> None:
    """What a node's daemon reads."""
    path = tmp_path / "tailcalld.toml"
    path.write_text(config_text())
    settings = load_settings(path)
    assert str(settings.socket) == "/run/tailcalld/tailcalld.sock"
    assert str(settings.pin_dir).startswith("/sys/fs/bpf/")
    assert settings.metrics_listen == f"0.0.0.0:{METRICS_PORT}"
    assert str(settings.desired_slots) == "/etc/tailcalld-slots/slots.toml"


def test_the_daemonset_wires_the_config_maps_to_the_daemon() -> None:
    c = daemon_container()
    cfg = config()
    config_file = PurePosixPath(c["args"][c["args"].index("--config") + 1])
    assert PurePosixPath(mount_of("config", c)["mountPath"]) == config_file.parent
    assert PurePosixPath(mount_of("slots", c)["mountPath"]) == PurePosixPath(cfg["desired_slots"]).parent
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "tailcalld-config"
    assert volumes["slots"]["configMap"]["name"] == "tailcalld-slots"
    slots = resource("ConfigMap", "tailcalld-slots")["data"]
    assert PurePosixPath(cfg["desired_slots"]).name in slots
    # The apply file from the version's own folder (root's 0755), not the kubelet's 0777 one.
    assert mount_of("slots", c)["subPath"] == "..data"
    assert all("subPath" not in m for m in c["volumeMounts"] if m["name"] != "slots")
    # The state and the pins on the host.
    hosts = host_path_volumes()
    mounted = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert hosts[mounted[cfg["state_dir"]]] == cfg["state_dir"]
    assert PurePosixPath(cfg["pin_dir"]).is_relative_to(hosts[mounted["/sys/fs/bpf"]])


def test_the_daemonset_has_the_host_mounts_and_the_capabilities_measured() -> None:
    spec = pod_spec()
    assert spec["hostPID"] is True
    c = daemon_container()
    hosts = host_path_volumes()
    mounted = {m["mountPath"]: hosts[m["name"]] for m in c["volumeMounts"] if m["name"] in hosts}
    for path in ["/sys/fs/bpf", "/sys/kernel/btf", "/lib/modules", "/usr/src", "/run/tailcalld"]:
        assert mounted.get(path) == path, f"{path} is not the host's"
    # The bpffs mount reaches the host from the (privileged) init container that makes it ...
    [init] = spec["initContainers"]
    assert init["securityContext"]["privileged"] is True
    assert mount_of("bpffs", init)["mountPropagation"] == "Bidirectional"
    # ... and the daemon, which may not have Bidirectional (privileged containers only), sees it.
    assert mount_of("bpffs", c)["mountPropagation"] == "HostToContainer"
    security = c["securityContext"]
    assert not security.get("privileged", False)
    measured = [LEAST_CAPS[i + 1] for i, arg in enumerate(LEAST_CAPS) if arg == "--cap-add"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": measured}
    assert security["seccompProfile"] == {"type": "Unconfined"}


def test_the_probes_ping_the_daemon_and_the_metrics_port_is_scraped() -> None:
    c = daemon_container()
    ping = ["tailcallctl", "--socket", config()["socket"], "ping"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["exec"]["command"] == ping, probe
    port = int(config()["metrics_listen"].rsplit(":", 1)[1])
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]
    annotations = daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}


def write_slots(folder: Path) -> Path:
    """The slots ConfigMap as the DaemonSet mounts it: one file per key."""
    folder.mkdir()
    for name, text in resource("ConfigMap", "tailcalld-slots")["data"].items():
        (folder / name).write_text(text)
    return folder / PurePosixPath(config()["desired_slots"]).name


def test_the_apply_file_reads_with_tailcallds_own_reader(tmp_path: Path) -> None:
    """As the daemon's desired_slots reads it: the file and every handler file it names, which
    must all be in the ConfigMap (a missing one is a DesiredFileError)."""
    apply_file = write_slots(tmp_path / "slots")
    request, read = desired.read_request(apply_file)
    assert [s["slot"] for s in request["slots"]] == ["fchmodat"]
    assert {f.name for f in read} == set(resource("ConfigMap", "tailcalld-slots")["data"])


def test_the_shipped_handlers_load_on_this_kernel(tmp_path: Path, daemon: DaemonProcess) -> None:
    """Each slot's handler, compiled and loaded by a real daemon for the verifier (check): a node
    would load the same."""
    apply_file = write_slots(tmp_path / "slots")
    for entry in tomllib.loads(apply_file.read_text())["slot"]:
        r = daemon.ctl("check", str(apply_file.parent / entry["file"]))
        assert r.returncode == 0, r.stdout + r.stderr


# -- the DaemonSet's pod, run by podman as a kubelet would run it ------------------------------

@dataclass
class KubeletVolume:
    """A ConfigMap volume laid out as the kubelet lays it: each key a link to ``..data/KEY``,
    ``..data`` a link to a timestamped folder, swapped by one rename on each edit."""

    folder: Path
    version: int = 0

    def write(self, data: dict[str, str]) -> None:
        self.version += 1
        stamp = f"..{self.version}"
        (self.folder / stamp).mkdir(parents=True)
        self.folder.chmod(0o777)  # as the kubelet makes it (an emptyDir underneath)
        for name, text in data.items():
            (self.folder / stamp / name).write_text(text)
            link = self.folder / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        (self.folder / "..data_tmp").symlink_to(stamp)
        (self.folder / "..data_tmp").rename(self.folder / "..data")


def config_for_test(pin_dir: Path) -> str:
    """The ConfigMap's tailcalld.toml with this test's pin folder, and desired_slots' files
    checked every second rather than every ten."""
    data = config() | {"pin_dir": str(pin_dir), "miss_log_interval": 1}
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in data.items())


def engine_args_of(container: dict[str, Any], host_paths: dict[str, Path]) -> list[str]:
    """podman run's options for a container of the pod spec: its security context and mounts, each
    hostPath at ``host_paths.get(path, path)`` (a test's own folder instead of the host's)."""
    security = container.get("securityContext", {})
    args = ["--privileged"] if security.get("privileged") else []
    args += [f"--cap-drop={c}" for c in security.get("capabilities", {}).get("drop", [])]
    args += [f"--cap-add={c}" for c in security.get("capabilities", {}).get("add", [])]
    if security.get("seccompProfile", {}).get("type") == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    propagation = {"Bidirectional": ",rshared", "HostToContainer": ",rslave"}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    for m in container.get("volumeMounts", []):
        volume = volumes[m["name"]]
        source = volume["hostPath"]["path"] if "hostPath" in volume else volume["configMap"]["name"]
        host = host_paths.get(source, Path(source))
        if "subPath" in m:  # resolved once, when the container is made, as the kubelet does
            host = Path(os.path.realpath(host / m["subPath"]))
        mode = ("ro" if m.get("readOnly") else "rw") + propagation.get(m.get("mountPropagation", ""), "")
        args += ["-v", f"{host}:{m['mountPath']}:{mode}"]
    return args


def exec_in(container: str, *command: str) -> subprocess.CompletedProcess[str]:
    """``podman exec``, as the kubelet runs an exec probe.  Where podman itself runs in a chroot
    (fresh-machine.sh), runc cannot pivot_root, so it chroots the container instead, and an exec
    (which joins the container's namespaces, not its chroot) cannot even enter its working
    folder: the test cannot run there, which is said as a skip, not a failure."""
    done = podman("exec", container, *command)
    if done.returncode != 0 and "chdir to cwd" in done.stderr and "set in config.json failed" in done.stderr:
        pytest.skip(f"podman exec does not work here (podman in a chroot?): {done.stderr.strip()[:300]}")
    return done


@dataclass
class Pod:
    name: str
    slots: KubeletVolume
    run_dir: Path  # the host folder mounted at /run/tailcalld
    image: str
    host_paths: dict[str, Path]

    def start(self) -> None:
        """The daemon container, made from the spec (a new one for each pod, as a rollout makes)."""
        spec, c = pod_spec(), daemon_container()
        pid_mode = ["--pid", "host"] if spec["hostPID"] else []
        checked(podman("run", "-d", "--name", self.name, *pid_mode, *engine_args_of(c, self.host_paths), self.image,
                       *c["args"]))

    def rollout_restart(self) -> None:
        """`kubectl rollout restart`: this node's pod replaced by a new one (pins and state stay)."""
        checked(podman("stop", "-t", "30", self.name, timeout=60))
        checked(podman("rm", "-f", self.name))
        self.start()

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "tailcallctl"), "--socket", str(self.run_dir / "tailcalld.sock"), *args],
                              capture_output=True, text=True, timeout=120)

    def probe(self, which: str) -> subprocess.CompletedProcess[str]:
        return exec_in(self.name, *daemon_container()[which]["exec"]["command"])

    def logs(self) -> str:
        r = podman("logs", self.name)
        return r.stdout + r.stderr

    def wait_started(self) -> None:
        """Until the startup probe passes, as the kubelet waits; fails if the container stops."""
        deadline = time.monotonic() + 90
        while (r := self.probe("startupProbe")).returncode != 0:
            state = json.loads(checked(podman("inspect", "--type", "container", self.name)))[0]["State"]
            assert state["Running"], f"the container stopped:\n{self.logs()}"
            assert time.monotonic() < deadline, r.stdout + r.stderr + self.logs()
            time.sleep(0.5)


@pytest.fixture
def pod(image: str, tmp_path: Path, pin_root: Path) -> Iterator[Pod]:  # noqa: F811
    """The DaemonSet's pod on this machine: its init container run to completion, then the daemon
    container; the ConfigMaps as kubelet volumes, /run/tailcalld and /var/lib/tailcalld in folders
    of this test's.  The container is removed whatever happens."""
    spec = pod_spec()
    config_volume, slots_volume = KubeletVolume(tmp_path / "config"), KubeletVolume(tmp_path / "slots")
    config_volume.write({"tailcalld.toml": config_for_test(pin_root / "daemon")})
    slots_volume.write(resource("ConfigMap", "tailcalld-slots")["data"])
    host_paths = {"tailcalld-config": config_volume.folder, "tailcalld-slots": slots_volume.folder,
                  "/run/tailcalld": tmp_path / "run", "/var/lib/tailcalld": tmp_path / "state"}
    for made in ("/run/tailcalld", "/var/lib/tailcalld"):
        host_paths[made].mkdir()
    [init] = spec["initContainers"]
    checked(podman("run", "--rm", *engine_args_of(init, host_paths), "--entrypoint", init["command"][0], image,
                   *init["command"][1:]))
    p = Pod(f"tailcalld-test-{secrets.token_hex(4)}", slots_volume, host_paths["/run/tailcalld"], image, host_paths)
    try:
        p.start()
        yield p
    finally:
        podman("rm", "-f", "-t", "5", p.name)


def test_the_daemonsets_pod_runs_and_its_probes_pass(pod: Pod) -> None:
    pod.wait_started()
    for which in ("livenessProbe", "readinessProbe"):
        r = pod.probe(which)
        assert r.returncode == 0, r.stdout + r.stderr
    pid = json.loads(checked(pod.ctl("ping", "--json")))["pid"]
    assert pid != 1 and Path(f"/proc/{pid}").exists()  # hostPID: the daemon is one of the host's processes


def test_the_pod_serves_metrics_on_the_annotated_port(pod: Pod) -> None:
    pod.wait_started()
    port = daemonset()["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    text = checked(exec_in(pod.name, "python3", "-c", fetch))
    assert "tailcalld_build_info" in text, text[:2000]


def slot_functions(pod: Pod) -> dict[str, str | None]:
    listed = json.loads(checked(pod.ctl("list", "--json")))
    return {s["syscall"]: s["function"] for s in listed["slots"]}


def wait_slots(pod: Pod, expected: dict[str, str | None]) -> None:
    deadline = time.monotonic() + 120
    while (now := slot_functions(pod)) != expected:
        assert time.monotonic() < deadline, f"slots {now}, not {expected}:\n{pod.logs()}"
        time.sleep(0.5)


def test_editing_the_slots_config_map_rolls_a_handler_out_and_back(pod: Pod) -> None:
    """README's roll-out and roll-back: a ConfigMap edit as the kubelet delivers it (a new
    version's folder and ..data swapped to it), then the node's pod replaced."""
    pod.wait_started()
    first = resource("ConfigMap", "tailcalld-slots")["data"]
    wait_slots(pod, {"fchmodat": "enter_fchmodat"})
    pod.slots.write(first | {"fchmodat.bpf.c": first["fchmodat.bpf.c"].replace("enter_fchmodat", "enter_fchmodat_v2")})
    pod.rollout_restart()
    pod.wait_started()
    wait_slots(pod, {"fchmodat": "enter_fchmodat_v2"})
    pod.slots.write(first)
    pod.rollout_restart()
    pod.wait_started()
    wait_slots(pod, {"fchmodat": "enter_fchmodat"})


def mounts_at(folder: Path) -> list[str]:
    """The filesystem types mounted at ``folder``, oldest first (from this process's mountinfo)."""
    types = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, after = line.split(" - ", 1)
        if fields.split()[4] == str(folder):
            types.append(after.split()[0])
    return types


@pytest.fixture
def bare_host_folder(tmp_path: Path) -> Iterator[Path]:
    """A shared mount of its own with nothing on it: the host's /sys/fs/bpf on a host that has not
    mounted bpffs (a volume's mounts reach the host only from a shared mount).  Unmounted after."""
    folder = tmp_path / "sys-fs-bpf"
    folder.mkdir()
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(folder)], check=True)
        yield folder
    finally:
        for _ in range(10):  # bpffs on the bind, then the bind
            if not mounts_at(folder):
                break
            subprocess.run(["umount", str(folder)], check=False)
        assert not mounts_at(folder)


def test_the_init_container_mounts_bpffs_on_the_host_once(image: str, bare_host_folder: Path) -> None:  # noqa: F811
    """Bidirectional propagation at work: bpffs mounted in the init container is the host's, so the
    pins outlive the pod; run again (the next pod), it finds bpffs there and mounts nothing."""
    [init] = pod_spec()["initContainers"]
    run = ["run", "--rm", *engine_args_of(init, {"/sys/fs/bpf": bare_host_folder}),
           "--entrypoint", init["command"][0], image, *init["command"][1:]]
    assert "bpf" not in mounts_at(bare_host_folder)
    checked(podman(*run))
    assert mounts_at(bare_host_folder)[1:] == ["bpf"]
    checked(podman(*run))
    assert mounts_at(bare_host_folder)[1:] == ["bpf"]
