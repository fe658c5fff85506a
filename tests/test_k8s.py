"""contrib/k8s/: every manifest valid against the Kubernetes schema (kubernetes-validate bundles the
schemas, so this needs no cluster and no network), the ConfigMaps read by tailcalld's own config
loader and apply-file reader, the shipped handler loaded by a real daemon, and the DaemonSet's
parts agreeing with each other and with what tests/test_container.py measured."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from harness import REPO, DaemonProcess
from tailcalld.config import Settings, load_settings
from test_container import LEAST_CAPS

K8S = REPO / "contrib" / "k8s"
# The oldest Kubernetes release still in wide use that has everything the manifests use, and the newest bundled.
VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]
# The apply file's keys (notes on the apply format: README, "Declarative state").
APPLY_KEYS = {"slot", "hook", "file", "function", "dialect", "journal", "set", "define"}
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
    """What a node's daemon reads.  Keys other branches bring (contracts: metrics_listen,
    desired_slots) are checked by value here and left out of the load while this checkout's
    loader does not know them yet; once it does, it loads them too."""
    pending = {"metrics_listen", "desired_slots"} - set(Settings.model_fields)
    text = "\n".join(line for line in config_text().splitlines() if line.split("=", 1)[0].strip() not in pending)
    path = tmp_path / "tailcalld.toml"
    path.write_text(text)
    settings = load_settings(path)
    assert str(settings.socket) == "/run/tailcalld/tailcalld.sock"
    assert str(settings.pin_dir).startswith("/sys/fs/bpf/")
    assert config()["metrics_listen"] == f"0.0.0.0:{METRICS_PORT}"


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
    # Only a folder mount follows ConfigMap edits: a subPath one would keep the first version.
    assert all("subPath" not in m for m in c["volumeMounts"])
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


def test_the_apply_file_reads(tmp_path: Path) -> None:
    """With tailcalld's own apply-file reader where this checkout has it (tailcalld/desired.py),
    else against the keys of the format; either way every file it names is in the ConfigMap."""
    apply_file = write_slots(tmp_path / "slots")
    if importlib.util.find_spec("tailcalld.desired") is not None:
        desired = importlib.import_module("tailcalld.desired")
        request, _read = desired.read_request(apply_file)
        assert [s["slot"] for s in request["slots"]] == ["fchmodat"]
        return
    entries = tomllib.loads(apply_file.read_text())["slot"]
    assert [e["slot"] for e in entries] == ["fchmodat"]
    for entry in entries:
        assert set(entry) <= APPLY_KEYS and {"slot", "file"} <= set(entry), entry
        assert (apply_file.parent / entry["file"]).is_file()


def test_the_shipped_handlers_load_on_this_kernel(tmp_path: Path, daemon: DaemonProcess) -> None:
    """Each slot's handler, compiled and loaded by a real daemon for the verifier (check): a node
    would load the same."""
    apply_file = write_slots(tmp_path / "slots")
    for entry in tomllib.loads(apply_file.read_text())["slot"]:
        r = daemon.ctl("check", str(apply_file.parent / entry["file"]))
        assert r.returncode == 0, r.stdout + r.stderr
