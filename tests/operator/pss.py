"""The `restricted` Pod Security Standard, rule by rule, as pod-security admission applies it.

From https://kubernetes.io/docs/concepts/security/pod-security-standards/ (latest version): every
baseline control, then the restricted ones. `violations()` returns one line per broken rule, so a
failing test says which control refused the pod.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
    "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
VOLUME_KEYS_NOT_SOURCES = {"name"}


def containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod.get(key) or []:
            yield f"{key}[{container.get('name')}]", container


def violations(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Every restricted-standard rule `pod` (a PodSpec) breaks."""
    return [*_baseline(pod, annotations or {}), *_restricted(pod)]


def _baseline(pod: dict[str, Any], annotations: dict[str, str]) -> Iterator[str]:
    pod_sc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            yield f"host namespaces: {field}"
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        yield "HostProcess: pod"
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            yield f"HostPath volumes: {volume['name']}"
    if (pod_sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        yield "seccomp: pod Unconfined"
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield f"sysctls: {sysctl.get('name')}"
    yield from _selinux("pod", pod_sc)
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            yield f"AppArmor: {key}={value}"
    for where, container in containers(pod):
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            yield f"privileged: {where}"
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            yield f"HostProcess: {where}"
        added = set((sc.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if added:
            yield f"capabilities: {where} adds {sorted(added)}"
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                yield f"host ports: {where} {port['hostPort']}"
        if sc.get("procMount") not in (None, "Default"):
            yield f"/proc mount type: {where}"
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            yield f"seccomp: {where} Unconfined"
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            yield f"AppArmor: {where}"
        yield from _selinux(where, sc)


def _selinux(where: str, sc: dict[str, Any]) -> Iterator[str]:
    options = sc.get("seLinuxOptions") or {}
    if options.get("type", "") not in SELINUX_TYPES or options.get("user") or options.get("role"):
        yield f"SELinux: {where}"


def _restricted(pod: dict[str, Any]) -> Iterator[str]:
    pod_sc = pod.get("securityContext") or {}
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - VOLUME_KEYS_NOT_SOURCES
        if not kinds <= RESTRICTED_VOLUMES:
            yield f"volume types: {volume['name']} is {sorted(kinds)}"
    if pod_sc.get("runAsUser") == 0:
        yield "running as non-root user: pod runAsUser 0"
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    for where, container in containers(pod):
        sc = container.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            yield f"privilege escalation: {where} must set allowPrivilegeEscalation: false"
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            yield f"running as non-root: {where} (runAsNonRoot must be true on the pod or container)"
        if sc.get("runAsUser") == 0:
            yield f"running as non-root user: {where} runAsUser 0"
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            yield f"seccomp: {where} needs RuntimeDefault or Localhost"
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            yield f"capabilities: {where} must drop ALL"
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            yield f"capabilities: {where} may add only NET_BIND_SERVICE"
