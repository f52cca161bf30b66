"""The deploy: what `kubectl apply -k` would send, and the image it runs, checked offline.

Every kustomization in deploy/kubernetes (the base and each overlay) is rendered with
`kubectl kustomize` (`KUBECTL` names another kubectl) and each object is validated
against the Kubernetes OpenAPI schemas that the PyPI package kubernetes-validate ships,
in strict mode (an unknown field fails), for every release in SCHEMA_VERSIONS. Then:
images carry the workspace's version and never `latest`; every container has readiness
and liveness probes on the port its binary serves them on, and resource requests and
limits; every flag a container passes exists in that binary's `--help` (the real binaries:
SWITCHYARD_CONTROLLER and SWITCHYARD_AGENT, which scripts/test.sh sets; etcd's against
Debian's etcd-server) and every $(VAR) it uses is defined; the RBAC, the mTLS wiring, the
node pools and the controller replicas with their etcd are what their comments say.
deploy/container/Containerfile cannot be built here (no container engine), so it is
checked statically: it builds and copies real workspace binaries, and its runtime stage
installs every tool the agent runs.
"""

import functools
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
REPLICAS = "overlays/controller-replicas"
KUSTOMIZATIONS = ["base", "overlays/single-controller", "overlays/mtls", "overlays/node-pools", REPLICAS]
# Current Kubernetes releases whose schemas kubernetes-validate 1.37.0 ships.
SCHEMA_VERSIONS = ["1.34", "1.35", "1.36", "1.37"]
IMAGE = "ghcr.io/switchyard-io/switchyard"
BINARIES = {
    "switchyard-controller": os.environ.get("SWITCHYARD_CONTROLLER"),
    "switchyard-agent": os.environ.get("SWITCHYARD_AGENT"),
}
# The other images a kustomization may run, each with the program its containers run and
# the form of a release tag. etcd: registry.k8s.io/etcd's `3.5.21-0` or quay.io's `v3.5.21`.
OTHER_IMAGES = {
    "registry.k8s.io/etcd": ("etcd", r"3\.\d+\.\d+-\d+"),
    "quay.io/coreos/etcd": ("etcd", r"v3\.\d+\.\d+"),
}
# Where a program that is not a switchyard binary serves its probes: the flag naming
# the URLs it listens on.
OTHER_PROBE_FLAGS = {"etcd": ("--listen-metrics-urls", "--listen-client-urls")}
# The Debian (bookworm) package that installs each program the agent runs.
TOOL_PACKAGES = {"conntrack": "conntrack", "ipset": "ipset", "modprobe": "kmod"}
TOOL_PACKAGES.update(
    {
        f"{family}-{backend}{tool}": "iptables"
        for family in ["iptables", "ip6tables"]
        for backend in ["nft", "legacy"]
        for tool in ["", "-save", "-restore"]
    }
)


# What the build scripts of crates in the binaries' dependency tree need from Debian.
BUILD_PACKAGES = {
    # build.rs: clang -target bpf, with libbpf's bpf_helpers.h and the kernel UAPI headers.
    "switchyard-agent-ebpf": {"clang", "libbpf-dev", "linux-libc-dev"},
    # build.rs: protoc on etcd's protos, with the well-known types.
    "etcd-client": {"protobuf-compiler", "libprotobuf-dev"},
}


# ---------------------------------------------------------------- rendering and reading


@functools.cache
def render(kustomization):
    """The objects `kubectl kustomize` renders for one kustomization."""
    kubectl = os.environ.get("KUBECTL", "kubectl")
    if not shutil.which(kubectl):
        pytest.fail(f"{kubectl} not found: install kubectl (scripts/test.sh does)")
    done = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / kustomization)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"kubectl kustomize {kustomization}: {done.stderr}"
    docs = [d for d in yaml.safe_load_all(done.stdout) if d is not None]
    assert docs, f"{kustomization} renders nothing"
    for doc in docs:
        assert doc.get("kind") and doc.get("apiVersion"), f"{kustomization}: {doc!r} is no object"
    return docs


def objects(kustomization, kind):
    return [d for d in render(kustomization) if d["kind"] == kind]


def one(kustomization, kind, name):
    found = [d for d in objects(kustomization, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kustomization}: one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(kustomization):
    """(object name, pod spec) of every workload."""
    for doc in render(kustomization):
        if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(kustomization, init=True):
    """(where, container, pod spec, is an init container) of every container."""
    for name, pod in pod_specs(kustomization):
        for c in pod["containers"]:
            yield f"{kustomization}: {name}/{c['name']}", c, pod, False
        if init:
            for c in pod.get("initContainers", []):
                yield f"{kustomization}: {name}/{c['name']} (init)", c, pod, True


def flags(container):
    """{flag: value or None} of what the container's command and args pass."""
    found = {}
    for arg in container.get("command", [])[1:] + container.get("args", []):
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            found[name] = value if "=" in arg else None
    return found


def split_image(image):
    """(name, tag) of an image reference; the tag is "" when it has none."""
    name, _, tag = image.rpartition(":")
    if "/" in tag or not name:  # a registry port, not a tag
        return image, ""
    return name, tag


def is_switchyard(container):
    return split_image(container.get("image", ""))[0] == IMAGE


def port_of(url):
    """The port of a URL or HOST:PORT (one of a comma-separated list: the first)."""
    return int(url.split(",")[0].rstrip("/").rpartition(":")[2])


def workspace():
    return tomllib.loads((ROOT / "Cargo.toml").read_text())


def workspace_version():
    return workspace()["workspace"]["package"]["version"]


@functools.cache
def help_flags(binary):
    if binary == "etcd":
        # Debian's etcd-server (3.4 on bookworm; scripts/test.sh installs it for the
        # replica tests), where the image runs 3.5: the flags a member needs are the same.
        path = os.environ.get("ETCD") or shutil.which("etcd")
        if not path:
            pytest.fail("etcd not found: install etcd-server (scripts/test.sh does) or set ETCD")
    else:
        path = BINARIES[binary]
        if not path or not os.access(path, os.X_OK):
            pytest.fail(
                f"SWITCHYARD_{binary.removeprefix('switchyard-').upper()} must name the built "
                f"{binary} binary (scripts/test.sh sets it)"
            )
    text = subprocess.run([path, "--help"], capture_output=True, text=True, check=True).stdout
    found = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", text, re.M))
    # etcd's help lists no --help, clap's always does.
    sentinel = "--name" if binary == "etcd" else "--help"
    assert sentinel in found and len(found) > 3, f"no flags read from {binary} --help"
    return found


# ---------------------------------------------------------------- every kustomization


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_against_the_kubernetes_schemas(kustomization):
    errors = []
    for doc in render(kustomization):
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path)
                errors.append(f"{doc['kind']} {doc['metadata'].get('name')} @{version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(e.message)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_images_are_tagged_with_the_workspace_version_or_a_release(kustomization):
    version = workspace_version()
    seen = 0
    for where, c, _, _ in containers(kustomization):
        image = c.get("image", "")
        name, tag = split_image(image)
        assert tag and tag != "latest", f"{where}: image {image!r} needs a real version tag"
        if name == IMAGE:
            assert tag == version, f"{where}: {image} is not the workspace version {version}"
            seen += 1
            continue
        assert name in OTHER_IMAGES, f"{where}: image {image!r} is neither {IMAGE} nor one of {sorted(OTHER_IMAGES)}"
        program, release = OTHER_IMAGES[name]
        assert re.fullmatch(release, tag), f"{where}: {image} is not a release tag of {name}"
        assert c.get("command", [None])[0] == program, f"{where}: {name} runs {program}"
    assert seen, f"{kustomization} runs no switchyard container"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_has_probes_and_resources(kustomization):
    for where, c, _, init in containers(kustomization):
        if not init:  # kubelet refuses probes on init containers
            assert c.get("readinessProbe"), f"{where}: no readinessProbe"
            assert c.get("livenessProbe"), f"{where}: no livenessProbe"
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resources.get(kind, {}).get(resource), f"{where}: no {resource} {kind}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_flag_exists_in_the_binary_it_is_passed_to(kustomization):
    for where, c, _, init in containers(kustomization):
        command = c.get("command", [])
        assert command, f"{where}: the image has no entrypoint to rely on; name the binary in command"
        program = command[0]
        if program not in BINARIES and is_switchyard(c):
            # Only the ebpf pool's init container, which mounts bpffs with the base image's sh.
            assert init and program == "/bin/sh", f"{where}: runs {program!r}, not a switchyard binary"
            continue
        if not is_switchyard(c):
            # Another image's program (its image and program: the image tag test).
            known = {program for program, _ in OTHER_IMAGES.values()}
            assert program in known, f"{where}: runs {program!r}, which this test does not know"
        unknown = sorted(set(flags(c)) - help_flags(program))
        assert not unknown, f"{where}: {program} has no {unknown} (see {program} --help)"
        defined = {e["name"] for e in c.get("env", [])}
        for arg in command + c.get("args", []):
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in defined, f"{where}: {arg} uses $({var}), which env does not define"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_ask_the_port_the_binary_serves_them_on(kustomization):
    listen_flag = {"switchyard-controller": "--http-listen", "switchyard-agent": "--healthz-listen"}
    for where, c, _, _ in containers(kustomization, init=False):
        program = c["command"][0]
        if program in OTHER_PROBE_FLAGS:
            # etcd: /health, on its metrics or client URL.
            ports = {port_of(flags(c)[f]) for f in OTHER_PROBE_FLAGS[program] if flags(c).get(f)}
            assert ports, f"{where}: none of {OTHER_PROBE_FLAGS[program]}"
            for probe in ("readinessProbe", "livenessProbe"):
                get = c[probe]["httpGet"]
                assert get["port"] in ports, f"{where}: {probe} is not on a port of {OTHER_PROBE_FLAGS[program]}"
                assert get["path"].split("?")[0] == "/health", f"{where}: {probe} does not ask /health"
            continue
        address = flags(c).get(listen_flag[program])
        assert address, f"{where}: no {listen_flag[program]}"
        port = int(address.rpartition(":")[2])
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["port"] == port, f"{where}: {probe} is not on {address}"


# ---------------------------------------------------------------- what each part is for


def test_the_controller_may_read_three_kinds_and_write_only_node_events():
    rules = {
        (group, resource): sorted(rule["verbs"])
        for rule in one("base", "ClusterRole", "switchyard-controller")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("", "services"): ["list", "watch"],
        ("", "nodes"): ["list", "watch"],
        ("discovery.k8s.io", "endpointslices"): ["list", "watch"],
    }
    events = one("base", "Role", "switchyard-controller-events")
    # Events about cluster-scoped Nodes are recorded in `default`.
    assert events["metadata"]["namespace"] == "default"
    assert events["rules"] == [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}
    ]
    roles = objects("base", "ClusterRole") + objects("base", "Role")
    assert sorted(r["metadata"]["name"] for r in roles) == [
        "switchyard-controller",
        "switchyard-controller-events",
    ], "no other grant"
    for binding in objects("base", "ClusterRoleBinding") + objects("base", "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "switchyard-controller", "namespace": "switchyard-system"}
        ]
    # The agent never talks to the API server.
    for name, pod in pod_specs("base"):
        if name != "switchyard-controller":
            assert pod["automountServiceAccountToken"] is False, name


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_controller_runs_unprivileged_one_per_node_with_a_budget(kustomization):
    deployment = one(kustomization, "Deployment", "switchyard-controller")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (c,) = pod["containers"]
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    budget = one(kustomization, "PodDisruptionBudget", "switchyard-controller")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(kustomization, "Service", "switchyard-controller")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in service["spec"]["ports"]} >= {9740}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if kustomization == "overlays/single-controller":
        assert deployment["spec"]["replicas"] == 1


def mounted_from(pod, container, path):
    """The volume a file path of the container lies on, and where it is mounted."""
    best = None
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(root) and (best is None or len(root) > len(best[1])):
            best = (mount, root)
    assert best, f"{path} is on no volume"
    volume = next(v for v in pod["volumes"] if v["name"] == best[0]["name"])
    return volume, best[0]


def test_mtls_takes_the_controllers_files_from_secrets_and_agents_use_kubelets_certificate():
    deployment = one("overlays/mtls", "Deployment", "switchyard-controller")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    given = flags(c)
    for flag in ("--tls-cert", "--tls-key", "--client-ca"):
        assert given.get(flag), f"the controller has no {flag}"
        volume, mount = mounted_from(pod, c, given[flag])
        assert "secret" in volume and mount.get("readOnly"), f"{flag} is not from a Secret: {volume}"
    base = flags(one("base", "Deployment", "switchyard-controller")["spec"]["template"]["spec"]["containers"][0])
    assert base.items() <= given.items(), "the mTLS controller lost flags of the base"

    daemonset = one("overlays/mtls", "DaemonSet", "switchyard-agent")
    pod = daemonset["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    given = flags(agent)
    volume, mount = mounted_from(pod, agent, given["--ca"])
    assert "secret" in volume and mount.get("readOnly"), f"--ca is not from a Secret: {volume}"
    kubelet = "/var/lib/kubelet/pki/kubelet-client-current.pem"
    assert given["--tls-cert"] == given["--tls-key"] == kubelet
    volume, mount = mounted_from(pod, agent, kubelet)
    assert volume["hostPath"]["path"] == "/var/lib/kubelet/pki" and mount.get("readOnly")
    # The symlink kubelet swaps must resolve inside the container: the folder is mounted
    # where it is on the host.
    assert mount["mountPath"] == "/var/lib/kubelet/pki"
    base = flags(one("base", "DaemonSet", "switchyard-agent")["spec"]["template"]["spec"]["containers"][0])
    assert base.items() <= given.items(), "the mTLS agent lost flags of the base"
    config = one("overlays/mtls", "ConfigMap", "switchyard-agent")
    assert config["data"]["controller"].startswith("https://")
    assert one("base", "ConfigMap", "switchyard-agent")["data"]["controller"].startswith("http://")


def host_paths(pod):
    return {v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}


def test_node_pools_run_one_fixed_dataplane_each_with_only_what_it_needs():
    pools = {}
    for daemonset in objects("overlays/node-pools", "DaemonSet"):
        pod = daemonset["spec"]["template"]["spec"]
        (agent,) = pod["containers"]
        pools[flags(agent)["--dataplane"]] = (pod, agent)
    assert set(pools) == {"iptables", "ipvs", "ebpf"}, f"one pool per dataplane, not {sorted(pools)}"

    # Every node runs exactly one: ipvs and ebpf by their label value, iptables elsewhere.
    for dataplane in ("ipvs", "ebpf"):
        assert pools[dataplane][0]["nodeSelector"] == {"switchyard.io/dataplane": dataplane}
    iptables_pod = pools["iptables"][0]
    assert "nodeSelector" not in iptables_pod
    (term,) = iptables_pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "switchyard.io/dataplane", "operator": "NotIn", "values": ["ipvs", "ebpf"]}
    ]

    def security(dataplane):
        return pools[dataplane][1]["securityContext"]

    # iptables: netfilter only.
    assert not security("iptables").get("privileged")
    assert security("iptables")["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert host_paths(pools["iptables"][0]) == {"/run/switchyard", "/run/xtables.lock"}
    # IPVS: sysctls need a writable /proc/sys, so privileged; no bpffs, no cgroup.
    assert security("ipvs")["privileged"] is True
    assert host_paths(pools["ipvs"][0]) == {"/run/switchyard", "/run/xtables.lock", "/lib/modules"}
    # eBPF: capabilities, no netfilter; only the init container that mounts bpffs is privileged.
    assert not security("ebpf").get("privileged")
    caps = security("ebpf")["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN"]}
    assert host_paths(pools["ebpf"][0]) == {"/run/switchyard", "/sys/fs/bpf", "/sys/fs/cgroup"}
    for mount in pools["ebpf"][1]["volumeMounts"]:
        assert mount.get("mountPropagation") != "Bidirectional", "only privileged containers may"
    (init,) = pools["ebpf"][0]["initContainers"]
    assert init["securityContext"]["privileged"] is True
    assert [m["mountPath"] for m in init["volumeMounts"]] == ["/sys/fs/bpf"]

    states = {flags(agent)["--state-dir"] for _, agent in pools.values()}
    assert len(states) == 3 and all(s.startswith("/run/switchyard/") for s in states), states
    for dataplane in ("iptables", "ebpf"):
        assert security(dataplane)["allowPrivilegeEscalation"] is False


def env_source(container, var):
    """Where an env var of the container comes from: its downward-API field
    (`fieldRef`), ConfigMap key (`configMapKeyRef`), or literal value."""
    for e in container.get("env", []):
        if e["name"] == var:
            source = e.get("valueFrom", {})
            if "fieldRef" in source:
                return ("field", source["fieldRef"]["fieldPath"])
            if "configMapKeyRef" in source:
                return ("configmap", source["configMapKeyRef"]["name"], source["configMapKeyRef"]["key"])
            return ("value", e.get("value"))
    return None


def expanded_var(value, where, flag):
    """The VAR of a flag value `$(VAR)` followed by anything, and what follows."""
    m = re.fullmatch(r"\$\((\w+)\)(.*)", value or "")
    assert m, f"{where}: {flag}={value!r} does not come from an env var"
    return m.group(1), m.group(2)


def replicas_controller():
    deployment = one(REPLICAS, "Deployment", "switchyard-controller")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    return deployment, pod, c


def etcd_members():
    """The etcd StatefulSet, its pod spec, its etcd container and its headless Service."""
    found = [
        s
        for s in objects(REPLICAS, "StatefulSet")
        if any(c["command"][0] == "etcd" for c in s["spec"]["template"]["spec"]["containers"])
    ]
    assert len(found) == 1, f"{REPLICAS}: one etcd StatefulSet, found {len(found)}"
    (statefulset,) = found
    pod = statefulset["spec"]["template"]["spec"]
    (etcd,) = pod["containers"]
    service = one(REPLICAS, "Service", statefulset["spec"]["serviceName"])
    return statefulset, pod, etcd, service


def test_replicas_three_controllers_each_named_and_advertised_by_the_downward_api():
    deployment, pod, c = replicas_controller()
    where = f"{REPLICAS}: switchyard-controller"
    assert deployment["spec"]["replicas"] == 3, f"{where}: {deployment['spec']['replicas']} replicas, not 3"
    given = flags(c)
    base = flags(one("base", "Deployment", "switchyard-controller")["spec"]["template"]["spec"]["containers"][0])
    assert base.items() <= given.items(), f"{where}: lost flags of the base"
    # The base's one-per-node anti-affinity is checked for every kustomization; here the
    # budget allows one replica down.
    budget = one(REPLICAS, "PodDisruptionBudget", "switchyard-controller")
    assert budget["spec"].get("maxUnavailable") == 1, f"{where}: the budget allows {budget['spec']}"

    # --replica-name, or without it POD_NAME (its env fallback), is the pod's name.
    var, rest = expanded_var(given.get("--replica-name", "$(POD_NAME)"), where, "--replica-name")
    assert not rest, f"{where}: --replica-name is more than $({var})"
    assert env_source(c, var) == ("field", "metadata.name"), (
        f"{where}: --replica-name's $({var}) is {env_source(c, var)}, not the downward API's metadata.name"
    )
    # --advertise-address is the pod's IP, which on the host network is its node's (the
    # address agents list), and the port agents dial.
    assert pod.get("hostNetwork") is True, f"{where}: not on the host network"
    var, rest = expanded_var(given.get("--advertise-address"), where, "--advertise-address")
    assert env_source(c, var) == ("field", "status.podIP"), (
        f"{where}: --advertise-address's $({var}) is {env_source(c, var)}, not the downward API's status.podIP"
    )
    assert rest == f":{port_of(given['--listen'])}", f"{where}: --advertise-address is not $({var}):<--listen's port>"


def test_replicas_agents_list_one_address_per_replica_on_the_nodes_the_replicas_are_pinned_to():
    deployment, pod, c = replicas_controller()
    where = f"{REPLICAS}: switchyard-controller"
    # The agents list node addresses, so the replicas must run on known nodes: the
    # control-plane nodes.
    required = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    assert required, f"{where}: not pinned to any nodes, so the agents cannot list their addresses"
    assert {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"} in [
        e for term in required["nodeSelectorTerms"] for e in term.get("matchExpressions", [])
    ], f"{where}: not pinned to the control-plane nodes: {required}"
    # Every pinned node runs a replica: a surge pod would never be scheduled.
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0 and rolling["maxUnavailable"] == 1, f"{where}: rollout {rolling} stalls"

    listen_port = port_of(flags(c)["--listen"])
    scheme = "https" if "--tls-cert" in flags(c) else "http"
    daemonsets = objects(REPLICAS, "DaemonSet")
    assert daemonsets, f"{REPLICAS}: no agent"
    for daemonset in daemonsets:
        (agent,) = daemonset["spec"]["template"]["spec"]["containers"]
        where = f"{REPLICAS}: {daemonset['metadata']['name']}"
        var, rest = expanded_var(flags(agent).get("--controller"), where, "--controller")
        assert not rest, f"{where}: --controller is more than $({var})"
        source = env_source(agent, var)
        assert source and source[0] == "configmap", f"{where}: $({var}) is {source}, not a ConfigMap key"
        _, name, key = source
        listed = one(REPLICAS, "ConfigMap", name)["data"][key].split(",")
        assert len(listed) == deployment["spec"]["replicas"], (
            f"{where}: lists {len(listed)} controllers for {deployment['spec']['replicas']} replicas: {listed}"
        )
        assert len(set(listed)) == len(listed), f"{where}: lists a controller twice: {listed}"
        for url in listed:
            m = re.fullmatch(r"(https?)://([^/:]+|\[[0-9a-fA-F:]+\]):(\d+)", url)
            assert m, f"{where}: {url!r} is not SCHEME://HOST:PORT"
            assert m.group(1) == scheme, f"{where}: {url} is not {scheme}://, as the controller serves"
            assert int(m.group(3)) == listen_port, f"{where}: {url} is not on the controller's port {listen_port}"
            # Not a Service's name: agents resolve with the node's resolver.
            assert not m.group(2).endswith((".svc", ".cluster.local")), f"{where}: {url} needs cluster DNS"


def test_replicas_every_controller_names_exactly_the_etcd_members_deployed():
    statefulset, pod, etcd, service = etcd_members()
    name, namespace = statefulset["metadata"]["name"], statefulset["metadata"]["namespace"]
    where = f"{REPLICAS}: {name}"
    members = statefulset["spec"]["replicas"]
    assert members == 3, f"{where}: {members} members, not 3"
    given = flags(etcd)
    scheme = "https" if given.get("--cert-file") else "http"

    # The headless Service gives each member its name, before it is ready.
    assert service["spec"].get("clusterIP") == "None", f"{where}: {service['metadata']['name']} is not headless"
    assert service["metadata"]["namespace"] == namespace
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"].get("publishNotReadyAddresses") is True, (
        f"{where}: members cannot resolve each other before they are ready"
    )
    # A member is ready only with a quorum: they must start together.
    assert statefulset["spec"].get("podManagementPolicy") == "Parallel", (
        f"{where}: OrderedReady waits for member 0 to be ready alone, which it never is"
    )
    client_port = port_of(given["--listen-client-urls"])
    peer_port = port_of(given["--listen-peer-urls"])
    assert {client_port, peer_port} <= {p["port"] for p in service["spec"]["ports"]}
    hosts = [f"{name}-{i}.{service['metadata']['name']}.{namespace}.svc" for i in range(members)]

    # Each member names itself by its pod name and advertises its name under the Service.
    var, rest = expanded_var(given.get("--name"), where, "--name")
    assert not rest and env_source(etcd, var) == ("field", "metadata.name"), f"{where}: --name is not the pod's name"
    own = f"$({var}).{service['metadata']['name']}.{namespace}.svc"
    assert given["--initial-advertise-peer-urls"] == f"{scheme}://{own}:{peer_port}"
    assert given["--advertise-client-urls"] == f"{scheme}://{own}:{client_port}"
    initial = dict(member.split("=", 1) for member in given["--initial-cluster"].split(","))
    assert initial == {f"{name}-{i}": f"{scheme}://{hosts[i]}:{peer_port}" for i in range(members)}, (
        f"{where}: --initial-cluster is not the StatefulSet's {members} members: {initial}"
    )

    # Every controller lists exactly those members' client URLs, and resolves them.
    deployment, controller_pod, c = replicas_controller()
    endpoints = flags(c).get("--etcd-endpoints", "").split(",")
    wanted = [f"{scheme}://{host}:{client_port}" for host in hosts]
    assert sorted(endpoints) == sorted(wanted), (
        f"{REPLICAS}: switchyard-controller's --etcd-endpoints {endpoints} are not the members {wanted}"
    )
    assert ("--etcd-ca" in flags(c)) == (scheme == "https"), f"{REPLICAS}: etcd serves {scheme}, the controller differs"
    # On the host network the node's resolver answers (dnsPolicy Default, or unset:
    # ClusterFirst falls back to it there); the members' names need cluster DNS.
    assert controller_pod.get("dnsPolicy") == "ClusterFirstWithHostNet", (
        f"{REPLICAS}: switchyard-controller cannot resolve {hosts[0]} with dnsPolicy {controller_pod.get('dnsPolicy')}"
    )


def test_replicas_etcd_is_a_release_with_probes_resources_storage_and_a_budget():
    statefulset, pod, etcd, _ = etcd_members()
    where = f"{REPLICAS}: {statefulset['metadata']['name']}"
    name, tag = split_image(etcd["image"])
    assert name in OTHER_IMAGES and OTHER_IMAGES[name][0] == "etcd", f"{where}: {etcd['image']} is no etcd image"
    m = re.fullmatch(r"v?3\.(\d+)\.(\d+)(?:-\d+)?", tag)
    # 3.5: the health checks' `serializable` and `exclude`, the v3 API etcd-client speaks.
    assert m and int(m.group(1)) >= 5, f"{where}: {etcd['image']} is not a release of etcd 3.5 or later"

    given = flags(etcd)
    probe_ports = {port_of(given[f]) for f in OTHER_PROBE_FLAGS["etcd"] if given.get(f)}
    assert probe_ports, f"{where}: etcd listens on no URL its probes could ask"
    for probe in ("livenessProbe", "readinessProbe"):
        get = etcd.get(probe, {}).get("httpGet", {})
        assert get.get("path", "").split("?")[0] == "/health", f"{where}: {probe} does not ask /health"
        assert get.get("port") in probe_ports, f"{where}: {probe} is on {get.get('port')}, not etcd's {probe_ports}"
    # A member cut off from the others has no leader: alive all the same (restarting it
    # would not help), only not ready.
    assert "serializable=true" in etcd["livenessProbe"]["httpGet"]["path"], f"{where}: liveness needs a leader"
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert etcd.get("resources", {}).get(kind, {}).get(resource), f"{where}: no {resource} {kind}"

    # The data folder is on a volume (the root file system is read-only): one claimed per
    # member, or an emptyDir.
    data = given["--data-dir"].rstrip("/") + "/"
    mounts = [m for m in etcd.get("volumeMounts", []) if data.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mounts, f"{where}: --data-dir {given['--data-dir']} is on no volume"
    volume = max(mounts, key=lambda m: len(m["mountPath"]))["name"]
    claims = {t["metadata"]["name"] for t in statefulset["spec"].get("volumeClaimTemplates", [])}
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    assert volume in claims | empty_dirs, f"{where}: --data-dir is on {volume}, neither a claim nor an emptyDir"
    assert etcd["securityContext"]["readOnlyRootFilesystem"] is True

    # One member per node, and a drain takes one at a time: a quorum of three survives one.
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname", f"{where}: members may share a node"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()
    budgets = [
        b for b in objects(REPLICAS, "PodDisruptionBudget") if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(budgets) == 1, f"{where}: {len(budgets)} disruption budgets"
    assert budgets[0]["spec"].get("maxUnavailable") == 1, f"{where}: budget {budgets[0]['spec']}"
    assert pod.get("automountServiceAccountToken") is False, f"{where}: etcd needs no API token"


# ---------------------------------------------------------------- the container build


def containerfile_stages():
    """[(stage name, base image, [instructions])], continuation lines joined, ARG
    defaults declared before the first FROM substituted."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    args, stages = {}, []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest)
            parts = image.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append((name, parts[0], []))
        elif stages:
            stages[-1][2].append((keyword, rest))
    return stages


def workspace_members():
    """{package name: folder} of every workspace member."""
    members = {}
    for folder in workspace()["workspace"]["members"]:
        manifest = tomllib.loads((ROOT / folder / "Cargo.toml").read_text())
        members[manifest["package"]["name"]] = folder
    return members


def workspace_binaries():
    binaries = set()
    for package, folder in workspace_members().items():
        manifest = tomllib.loads((ROOT / folder / "Cargo.toml").read_text())
        binaries |= {b["name"] for b in manifest.get("bin", [])}
        if (ROOT / folder / "src" / "main.rs").exists():
            binaries.add(package)
    return binaries


def test_the_containerfile_builds_and_copies_real_workspace_binaries():
    stages = containerfile_stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    build_name, build_image, build = stages[0]
    runtime_name, runtime_image, runtime = stages[-1]
    rust_version = workspace()["workspace"]["package"]["rust-version"]
    assert re.fullmatch(rf"(docker\.io/library/)?rust:{re.escape(rust_version)}-bookworm", build_image), build_image
    assert re.fullmatch(r"(docker\.io/library/)?debian:bookworm-slim", runtime_image), runtime_image

    members = workspace_members()
    binaries = workspace_binaries()
    copied = {
        source.rstrip("/")
        for keyword, rest in build
        if keyword == "COPY"
        for source in [w for w in rest.split() if not w.startswith("--")][:-1]
    }
    missing = sorted(set(members.values()) - copied)
    assert not missing, f"cargo cannot load the workspace without the members {missing}: COPY them"
    builds = [rest for keyword, rest in build if keyword == "RUN" and "cargo build" in rest]
    assert builds, "the builder runs cargo build"
    for command in builds:
        # The image ships the production profile (whole-program optimisation, Cargo.toml).
        assert "--profile production" in command and "--locked" in command, command
        for package in re.findall(r"(?:-p|--package)[ =]([\w-]+)", command):
            assert package in members, f"cargo build -p {package}: no such workspace package"
        for binary in re.findall(r"--bin[ =]([\w-]+)", command):
            assert binary in binaries, f"cargo build --bin {binary}: no such workspace binary"

    installed = set()
    for keyword, rest in runtime:
        if keyword != "COPY" or "--from=" not in rest:
            continue
        assert f"--from={build_name}" in rest, rest
        source, destination = rest.split()[-2:]
        binary = Path(source).name
        assert "/target/production/" in source, f"COPY {source}: not what the production profile built"
        assert binary in binaries, f"COPY {source}: {binary} is no binary of the workspace"
        assert binary in build_targets(builds), f"COPY {source}: the builder does not build {binary}"
        installed.add(binary)
    assert set(BINARIES) <= installed, f"the image lacks {sorted(set(BINARIES) - installed)}"
    for kustomization in KUSTOMIZATIONS:
        for where, c, _, _ in containers(kustomization):
            program = c["command"][0]
            if is_switchyard(c):
                assert program in installed or program == "/bin/sh", f"{where}: {program} is not in the image"

    user = [rest for keyword, rest in runtime if keyword == "USER"]
    assert user and not user[-1].startswith(("0", "root")), "the image's default user is not root"
    labels = " ".join(rest for keyword, rest in runtime if keyword == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert f"VERSION={workspace_version()}" in [rest for keyword, rest in runtime if keyword == "ARG"]


def stage_packages(stage):
    """The Debian packages a stage's `apt-get install` lines install."""
    packages = set()
    for keyword, rest in stage[2]:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = command.split()
            if "apt-get" in words and "install" in words:
                after = words[words.index("install") + 1 :]
                packages |= {w for w in after if not w.startswith("-")}
    return packages


def test_the_builder_installs_what_the_build_scripts_need():
    stages = containerfile_stages()
    command = next(rest for keyword, rest in stages[0][2] if keyword == "RUN" and "cargo build" in rest)
    packages = re.findall(r"(?:-p|--package)[ =]([\w-]+)", command)
    tree = subprocess.run(
        ["cargo", "tree", "--locked", "-e", "normal,build", "--prefix", "none", "-f", "{p}"]
        + [arg for p in packages for arg in ("-p", p)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert tree.returncode == 0, tree.stderr
    crates = {line.split()[0] for line in tree.stdout.splitlines() if line.strip()}
    assert "switchyard-agent-ebpf" in crates, "the image's binaries link the eBPF dataplane"
    installed = stage_packages(stages[0])
    for crate, needed in BUILD_PACKAGES.items():
        if crate in crates:
            assert needed <= installed, f"{crate}'s build needs {sorted(needed - installed)} in the builder"


def build_targets(builds):
    return {b for command in builds for b in re.findall(r"--bin[ =]([\w-]+)", command)}


def rust_sources(folder):
    """The non-test Rust source of one crate: src/ without test files and test modules."""
    for path in sorted((ROOT / folder / "src").rglob("*.rs")):
        if path.name in ("tests.rs",) or "tests" in path.relative_to(ROOT / folder / "src").parts[:-1]:
            continue
        text = path.read_text()
        yield path, strip_test_modules(text)


def strip_test_modules(text):
    """`text` without `#[cfg(test)] mod … { … }` blocks (braces counted)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def agent_crates():
    """The folders of the workspace crates switchyard-agent links (normal dependencies)."""
    members = workspace_members()
    folders, todo = set(), ["switchyard-agent"]
    while todo:
        package = todo.pop()
        folder = members[package]
        if folder in folders:
            continue
        folders.add(folder)
        manifest = tomllib.loads((ROOT / folder / "Cargo.toml").read_text())
        todo += [d for d in manifest.get("dependencies", {}) if d in members]
    return sorted(folders)


def programs_the_agent_runs():
    """Every program the agent's code starts: literal names given to agent-core's
    netfilter Runner (`run`, `run_streaming`, `succeeds`) or to Command::new, plus the
    iptables tools the netfilter Backend names. A call whose program the test cannot
    tell fails the test, so a new tool cannot slip past it."""
    netfilter = (ROOT / "agent-core" / "src" / "netfilter.rs").read_text()
    families = re.findall(r'Family::V[46] => "([\w-]+)"', netfilter)
    backends = re.findall(r'Backend::\w+ => "([\w-]+)"', netfilter)
    assert sorted(families) == ["ip6tables", "iptables"] and sorted(backends) == ["legacy", "nft"], (
        "agent-core's netfilter Backend names its tools differently now: update this test"
    )
    netfilter_tools = {f"{f}-{b}{t}" for f in families for b in backends for t in ("", "-save", "-restore")}

    call = re.compile(
        r"(?:\brunner|\bself\.runner|\bself)\s*\.\s*(?:run|run_streaming|succeeds)\s*\(\s*([^,]+),"
        r"|Command::new\(\s*([^)]+)\)"
    )
    programs, unknown = set(), []
    for folder in agent_crates():
        for path, text in rust_sources(folder):
            for m in call.finditer(text):
                argument = (m.group(1) or m.group(2)).strip()
                literal = re.fullmatch(r'"([^"]+)"', argument)
                if literal:
                    programs.add(literal.group(1))
                elif re.fullmatch(r"&?(?:self\.)?(?:backend|Backend::\w+)\.(?:save|restore|iptables)\(.*\)", argument):
                    programs |= netfilter_tools
                elif argument in ("&tool", "tool") and re.search(
                    r"let tool = (?:self\.)?backend\.(?:save|restore|iptables)\(", text
                ):
                    programs |= netfilter_tools
                elif path.name == "netfilter.rs" and argument in ("program", "argv[0]"):
                    pass  # the Runner itself, passing on what its callers name
                else:
                    unknown.append(f"{path.relative_to(ROOT)}: {m.group(0)!r}")
    assert not unknown, "programs this test cannot tell (teach it, and install them):\n" + "\n".join(unknown)
    assert {"conntrack", "ipset"} <= programs and netfilter_tools <= programs, sorted(programs)
    return programs


def runtime_packages():
    return stage_packages(containerfile_stages()[-1])


def test_the_runtime_stage_installs_every_program_the_agent_runs():
    packages = runtime_packages()
    assert packages, "the runtime stage installs no Debian package"
    for program in sorted(programs_the_agent_runs()):
        package = TOOL_PACKAGES.get(program)
        assert package, f"the agent runs {program}: add its Debian package to TOOL_PACKAGES and the Containerfile"
        assert package in packages, f"the agent runs {program}, but the runtime stage does not install {package}"


def test_the_tool_packages_are_the_ones_debian_installs_them_with():
    """Where this machine has dpkg and the program, its owner is the package the test
    names (bookworm lists some under /sbin, some under /usr/sbin)."""
    if not shutil.which("dpkg-query"):
        pytest.skip("no dpkg here")
    checked = 0
    for program, package in TOOL_PACKAGES.items():
        path = shutil.which(program, path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")
        if not path:
            continue
        candidates = {path, os.path.realpath(path)}
        candidates |= {p.removeprefix("/usr") for p in list(candidates)} | {"/usr" + p for p in list(candidates)}
        owners = set()
        for candidate in candidates:
            done = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True)
            if done.returncode == 0:
                owners |= {line.split(":")[0] for line in done.stdout.splitlines()}
        if owners:
            assert package in owners, f"{program} comes from {owners}, not {package}"
            checked += 1
    if not checked:
        pytest.skip("none of the tools is installed here")
