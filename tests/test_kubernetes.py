"""The Kubernetes manifests, checked offline: built as `kubectl apply -k deploy/kubernetes` would build them
(namespace, image tags, replicas, generated ConfigMaps: the kustomization features they use), then validated
against the Kubernetes schemas and KEDA's, admitted by Pod Security "restricted", with every reference
(ConfigMap, Secret, volume claim, Service port) resolving and the KEDA trigger's address in the namespace."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from florence2_serve.client.cli import cli
from florence2_serve.common import redis_layout as layout

K8S = REPO / "deploy" / "kubernetes"
CLUSTER_SCOPED = {"Namespace"}
# Secrets the operator creates (README "Deploying on Kubernetes"); nothing ships a secret value.
OPERATOR_SECRETS = {"florence2-valkey", "florence2-hf"}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def build(components: list[str] | None = None) -> list[dict]:
    """What `kustomize build deploy/kubernetes` gives, for the features kustomization.yaml and its components
    use; `components` overrides the kustomization's own list (["sentinel"]: the replicated valkey)."""
    spec = kustomization()
    unknown = set(spec) - {"apiVersion", "kind", "namespace", "labels", "resources", "images", "configMapGenerator",
                           "replicas", "components"}
    assert not unknown, f"this test's builder does not apply {unknown}"
    docs = [doc for name in spec["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    generators = {generated["name"]: dict(literal.split("=", 1) for literal in generated["literals"])
                  for generated in spec.get("configMapGenerator", [])}
    for component in spec.get("components", []) if components is None else components:
        root = K8S / component
        part = yaml.safe_load((root / "kustomization.yaml").read_text())
        assert part["kind"] == "Component"
        assert not set(part) - {"apiVersion", "kind", "resources", "patches", "configMapGenerator"}, component
        docs += [doc for name in part.get("resources", []) for doc in yaml.safe_load_all((root / name).read_text())
                 if doc]
        for item in part.get("patches", []):
            patch = yaml.safe_load(item["patch"])
            matches = [doc for doc in docs if (doc["kind"], doc["metadata"]["name"]) ==
                       (patch["kind"], patch["metadata"]["name"])]
            assert len(matches) == 1, f"{component}: the patch of {patch['kind']}/{patch['metadata']['name']}"
            assert patch.get("$patch") == "delete", f"{component}: this test's builder applies delete patches only"
            docs.remove(matches[0])
        for generated in part.get("configMapGenerator", []):
            assert generated.get("behavior") == "merge" and generated["name"] in generators
            generators[generated["name"]].update(literal.split("=", 1) for literal in generated["literals"])
    for name, data in generators.items():
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
    images = {image["name"]: f"{image['newName']}:{image['newTag']}" for image in spec.get("images", [])}
    replicas = {item["name"]: item["count"] for item in spec.get("replicas", [])}
    extra_labels = {k: v for item in spec.get("labels", []) for k, v in item["pairs"].items()}
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = spec["namespace"]
        meta.setdefault("labels", {}).update(extra_labels)
        if doc["kind"] in ("Deployment", "StatefulSet") and meta["name"] in replicas:
            doc["spec"]["replicas"] = replicas[meta["name"]]
        for container in containers(doc):
            name = container["image"].split(":")[0]
            if name in images:
                container["image"] = images[name]
    return docs


VARIANTS = {"single valkey": [], "valkey with sentinel": ["sentinel"]}


def env_values(container: dict, docs: list[dict]) -> dict[str, str]:
    """A container's environment as the kubelet sets it: envFrom ConfigMaps first, then env with its $(VAR)s
    expanded (a Secret's value stays a `SECRET.name.key` marker)."""
    config_maps = by_kind(docs, "ConfigMap")
    values = {}
    for source in container.get("envFrom", []):
        values.update(config_maps[source["configMapRef"]["name"]]["data"])
    for env in container.get("env", []):
        if "value" in env:
            values[env["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), env["value"])
        elif "secretKeyRef" in env["valueFrom"]:
            ref = env["valueFrom"]["secretKeyRef"]
            values[env["name"]] = f"SECRET.{ref['name']}.{ref['key']}"
        elif "configMapKeyRef" in env["valueFrom"]:
            ref = env["valueFrom"]["configMapKeyRef"]
            values[env["name"]] = config_maps[ref["name"]]["data"][ref["key"]]
        else:
            values[env["name"]] = f"<{env['name']}>"
    return values


def pod_spec(doc: dict) -> dict | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "StatefulSet") else None


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return [] if spec is None else [*spec.get("initContainers", []), *spec["containers"]]


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def test_the_kustomization_lists_every_manifest_and_sets_what_a_deployment_changes():
    spec = kustomization()
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(spec["resources"]) == files
    docs = build()
    used_images = {c["image"] for doc in docs for c in containers(doc) if c["image"].startswith("florence2-serve")}
    assert used_images == {f"{i['newName']}:{i['newTag']}" for i in spec["images"]}  # every image tag set here
    assert by_kind(docs, "Deployment")["florence2-frontend"]["spec"]["replicas"] == 2
    namespace = by_kind(docs, "Namespace")[spec["namespace"]]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("variant", VARIANTS)
def test_kubernetes_manifests_validate_against_the_kubernetes_schemas(variant):
    import kubernetes_validate

    builtin = [doc for doc in build(VARIANTS[variant]) if not doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in builtin} >= {"Namespace", "Service", "StatefulSet", "Deployment", "NetworkPolicy",
                                                 "PersistentVolumeClaim", "ConfigMap"}
    for doc in builtin:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_admitted_by_pod_security_restricted(variant):
    """The "restricted" profile's checks (kubernetes.io/docs/concepts/security/pod-security-standards), and a
    read-only root filesystem with writable volumes where a process writes."""
    pods = {doc["metadata"]["name"]: doc for doc in build(VARIANTS[variant]) if pod_spec(doc) is not None}
    valkey = "valkey-ha" if VARIANTS[variant] else "valkey"
    assert set(pods) == {valkey, "florence2-frontend", "florence2-worker-base"}
    for name, doc in pods.items():
        spec = pod_spec(doc)
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and isinstance(pod.get("runAsUser"), int) and pod["runAsUser"] > 0, name
        assert pod.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        assert spec.get("automountServiceAccountToken") is False, name
        assert all("hostPath" not in volume for volume in spec.get("volumes", [])), name
        for container in containers(doc):
            context = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            assert not context.get("privileged") and context.get("runAsUser", 1) != 0, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert all("hostPort" not in port for port in container.get("ports", [])), where
    for name in ("florence2-frontend", "florence2-worker-base"):  # the images' numeric USER
        assert pod_spec(pods[name])["securityContext"]["runAsUser"] == 10001
        mounts = {m["mountPath"] for c in containers(pods[name]) for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_reference_resolves(variant):
    docs = build(VARIANTS[variant])
    config_maps, claims = by_kind(docs, "ConfigMap"), by_kind(docs, "PersistentVolumeClaim")
    readme = (REPO / "README.md").read_text()
    for doc in docs:
        if pod_spec(doc) is None:
            continue
        for volume in pod_spec(doc).get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for volume in pod_spec(doc).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, volume
        for container in containers(doc):
            declared = []
            for source in container.get("envFrom", []):
                declared += config_maps[source["configMapRef"]["name"]]["data"]
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in config_maps[ref["name"]]["data"], ref
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["name"] in OPERATOR_SECRETS, ref
                    assert f"create secret generic {ref['name']}" in readme, f"README says how to create {ref['name']}"
                # $(VAR) expands only from variables declared before it in the list.
                for used in re.findall(r"\$\((\w+)\)", env.get("value", "")):
                    assert used in declared, (container["name"], env["name"], used)
                declared.append(env["name"])
            for text in [*container.get("args", []), *container.get("command", [])]:
                for used in re.findall(r"\$\((\w+)\)", text):
                    assert used in declared, (container["name"], text)
            ports = {port["name"] for port in container.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if "httpGet" in container.get(probe, {}):
                    assert container[probe]["httpGet"]["port"] in ports, (container["name"], probe)


def test_valkey_needs_its_password_and_only_the_service_reaches_it():
    docs = build()
    valkey = by_kind(docs, "StatefulSet")["valkey"]["spec"]["template"]["spec"]["containers"][0]
    assert valkey["args"][valkey["args"].index("--requirepass") + 1] == "$(VALKEY_PASSWORD)"
    for name in ("florence2-frontend", "florence2-worker-base"):
        env = env_values(by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0], docs)
        assert env["REDIS_URL"] == "redis://:SECRET.florence2-valkey.password@valkey:6379/0"
    (policy,) = by_kind(docs, "NetworkPolicy").values()
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "valkey"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    (in_namespace,) = [peer for peer in rule["from"] if "namespaceSelector" not in peer]
    (expression,) = in_namespace["podSelector"]["matchExpressions"]
    allowed = set(expression["values"])
    for doc in docs:  # exactly the front end's and the workers' pods match; valkey itself does not
        if pod_spec(doc) is not None:
            label = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            assert (label in allowed) == (doc["metadata"]["name"] != "valkey"), doc["metadata"]["name"]
    (keda,) = [peer for peer in rule["from"] if "namespaceSelector" in peer]
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_keda_scaled_object_validates_and_points_at_the_workers_queue_in_the_namespace(variant):
    import jsonschema

    schema = json.loads((K8S / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
    docs = build(VARIANTS[variant])
    scaled = list(by_kind(docs, "ScaledObject").values())
    deployments, config_maps = by_kind(docs, "Deployment"), by_kind(docs, "ConfigMap")
    auths = by_kind(docs, "TriggerAuthentication")
    namespace = kustomization()["namespace"]
    assert scaled
    for doc in scaled:
        jsonschema.validate(doc, schema)
        target = deployments[doc["spec"]["scaleTargetRef"]["name"]]
        model = target["metadata"]["labels"]["florence2-serve/model"]
        container = target["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        model_arg = container["args"][container["args"].index("--model") + 1]
        ref = env["MODEL_ID"]["valueFrom"]["configMapKeyRef"]
        assert model_arg == f"{model}=$(MODEL_ID)" and config_maps[ref["name"]]["data"][ref["key"]]
        triggers = {t["type"]: t for t in doc["spec"]["triggers"]}
        redis_trigger = triggers["redis"]
        assert redis_trigger["metadata"]["listName"] == layout.rq_queue_key(model)
        # KEDA's operator resolves the address from its own namespace: it must name ours.
        host = redis_trigger["metadata"]["address"].rsplit(":", 1)[0]
        assert host == f"valkey.{namespace}.svc.cluster.local", host
        auth = auths[redis_trigger["authenticationRef"]["name"]]
        assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "florence2-valkey",
                                                    "key": "password"}]
        query = triggers["prometheus"]["metadata"]["query"]
        assert f'max by (priority) (florence2_queue_depth{{model="{model}"}})' in query
        assert "florence2_running_jobs" in query
    broken = copy.deepcopy(scaled[0])
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 8  # a number, not a string: KEDA refuses it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_probes_use_the_plaintext_probe_port_and_workers_share_a_warmed_cache():
    docs = build()
    front = by_kind(docs, "Deployment")["florence2-frontend"]["spec"]["template"]["spec"]["containers"][0]
    # liveness is the process (a Redis outage must not restart front ends), readiness is Redis; both on the
    # probe port, which answers in plaintext whatever TLS, mTLS and tokens the API ports require.
    assert front["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert front["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in front["ports"]}
    env = {e["name"]: e.get("value") for e in front["env"]}
    assert ports["health"] == int(env["FLORENCE2_HEALTH_PORT"]) and ports["http"] == int(env["FLORENCE2_HTTP_PORT"])
    assert ports["metrics"] == int(env["FLORENCE2_METRICS_PORT"]) != 9100
    serve_help = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "FLORENCE2_HEALTH_PORT" in serve_help
    services = by_kind(docs, "Service")
    assert services["florence2-frontend-grpc"]["spec"]["clusterIP"] == "None"  # headless: client-side balancing
    worker_doc = by_kind(docs, "Deployment")["florence2-worker-base"]["spec"]["template"]["spec"]
    worker = worker_doc["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    worker_help = CliRunner().invoke(cli, ["worker", "--help"]).output
    assert all(flag in worker_help for flag in worker["args"] if flag.startswith("--"))
    (volume,) = [v for v in worker_doc["volumes"] if v["name"] == "hf-cache"]
    assert "persistentVolumeClaim" in volume  # not an emptyDir: pods KEDA starts do not download again
    (warm,) = worker_doc["initContainers"]
    assert warm["command"][:2] == ["hf", "download"]
    assert {m["name"] for m in warm["volumeMounts"]} >= {"hf-cache"}
    worker_env = {e["name"]: e for e in worker["env"]}
    assert worker_env["HF_HUB_OFFLINE"]["value"] == "1"
    warm_env = {e["name"]: e for e in warm["env"]}
    assert warm_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "florence2-hf", "key": "token",
                                                                  "optional": True}


def test_the_sentinel_component_points_every_client_at_the_sentinels_of_its_pods():
    from florence2_serve.common.redis_url import parse_sentinel_url

    docs = build(["sentinel"])
    stateful = by_kind(docs, "StatefulSet")
    assert set(stateful) == {"valkey-ha"}  # the single valkey pod is gone
    ha = stateful["valkey-ha"]
    pod = ha["spec"]["template"]
    service = by_kind(docs, "Service")[ha["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None" and ha["spec"]["replicas"] == 3
    hosts = [f"valkey-ha-{i}.{ha['spec']['serviceName']}" for i in range(ha["spec"]["replicas"])]
    script = by_kind(docs, "ConfigMap")["valkey-ha-scripts"]["data"]["valkey-ha.sh"]
    common = {"SELF", "PEERS", "VALKEY_PORT", "SENTINEL_PORT", "MASTER_SET", "BIND_ADDRESS", "VALKEY_PASSWORD"}
    needs = {"server": common | {"DATA_DIR", "MAXMEMORY"},
             "sentinel": common | {"SENTINEL_DIR", "QUORUM", "DOWN_AFTER_MS", "FAILOVER_TIMEOUT_MS"}}
    assert set(re.findall(r"\$\{?([A-Z_]+)", script)) == needs["server"] | needs["sentinel"]
    for container in pod["spec"]["containers"]:
        env = env_values(container, docs)
        role = container["command"][-1]
        assert needs[role] <= set(env), (role, needs[role] - set(env))
        assert env["SELF"] == f"<POD_NAME>.{ha['spec']['serviceName']}" and env["PEERS"].split() == hosts
    sentinel_env = env_values(pod["spec"]["containers"][1], docs)
    for name in ("florence2-frontend", "florence2-worker-base"):
        env = env_values(by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0], docs)
        target = parse_sentinel_url(env["REDIS_URL"])
        assert target.sentinels == tuple((host, int(sentinel_env["SENTINEL_PORT"])) for host in hosts), name
        assert target.master == sentinel_env["MASTER_SET"] and target.password == "SECRET.florence2-valkey.password"
    # KEDA reads the queue length through the `valkey` Service, which now reaches the three pods.
    selector = by_kind(docs, "Service")["valkey"]["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    allowed = {}  # port -> app names allowed in (policies add up)
    for policy in by_kind(docs, "NetworkPolicy").values():
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "valkey"}
        for rule in policy["spec"]["ingress"]:
            names = set()
            for peer in rule["from"]:
                labels = peer.get("podSelector", {})
                names |= {labels["matchLabels"]["app.kubernetes.io/name"]} if "matchLabels" in labels and \
                    "namespaceSelector" not in peer else set()
                for expression in labels.get("matchExpressions", []):
                    names |= set(expression["values"])
            for port in rule["ports"]:
                allowed.setdefault(port["port"], set()).update(names)
    assert {"florence2-frontend", "florence2-worker", "valkey"} <= allowed[26379]
    assert {"florence2-frontend", "florence2-worker", "valkey"} <= allowed[6379]
    assert by_kind(docs, "PodDisruptionBudget")["valkey-ha"]["spec"]["maxUnavailable"] == 1
