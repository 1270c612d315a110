"""What matters in the rendered workloads: GPUs, probes, resources, security, selectors,
discovery's Service and RBAC, network policies, autoscaling, Triton's command line."""

from __future__ import annotations

import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk (Helm v4's engine) is a test dependency")

from orchestrator.discovery import SERVICE_NAME_LABEL, DiscoverySettings
from orchestrator.server import SERVICE_NAME

GPU = "nvidia.com/gpu"
GPU_COMPONENTS = ("vision-worker", "llm-worker")
SQUINT_COMPONENTS = ("orchestrator", "vision-worker", "llm-worker")


def _pod(workload):
    return workload["spec"]["template"]["spec"]


def _all_containers(pod):
    return [*pod.get("initContainers", []), *pod["containers"]]


def _tolerates_gpu_taint(pod) -> bool:
    return any(
        t.get("key") == GPU and t.get("effect") in ("NoSchedule", None) and t.get("operator") == "Exists"
        for t in pod.get("tolerations", [])
    )


# --------------------------------------------------------------------------- GPUs


@pytest.mark.parametrize("profile_name", ["defaults", "vision-autoscaling", "external-redis", "locked-down"])
@pytest.mark.parametrize("component", GPU_COMPONENTS)
def test_gpu_components_request_a_gpu_and_tolerate_the_gpu_taint(render, profile_name, component):
    rendered = render(profile_name)
    pod = _pod(rendered.workload(component))
    resources = rendered.container(component)["resources"]
    assert resources["requests"][GPU] == 1
    assert resources["limits"][GPU] == 1
    assert _tolerates_gpu_taint(pod), pod.get("tolerations")


def test_the_orchestrator_and_redis_stay_off_gpus(render):
    rendered = render()
    for component in ("orchestrator", "redis"):
        pod = _pod(rendered.workload(component))
        assert not _tolerates_gpu_taint(pod)
        assert GPU not in str(rendered.container(component)["resources"])


def test_gpu_settings_follow_the_gpu(render):
    gpu, cpu = render(), render("dev-cpu")
    assert gpu.container_env(gpu.container("vision-worker"))["SQUINT_VISION_DEVICE"] == "cuda"
    assert cpu.container_env(cpu.container("vision-worker"))["SQUINT_VISION_DEVICE"] == "cpu"
    assert "--model-config-name=gpu" in gpu.container("llm-worker")["args"]
    assert not any(a.startswith("--model-config-name") for a in cpu.container("llm-worker")["args"])


def test_gpu_node_selector_is_added_to_the_component_selector(render):
    rendered = render("locked-down")
    assert _pod(rendered.workload("llm-worker"))["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert "nodeSelector" not in _pod(rendered.workload("vision-worker"))


def test_the_cpu_profile_asks_for_no_gpu_at_all(render):
    rendered = render("dev-cpu")
    assert GPU not in str(rendered.manifests)
    for workload in rendered.workloads():
        assert not _pod(workload).get("tolerations"), workload["metadata"]["name"]
    assert "KIND_GPU" not in str(rendered.manifests)
    init = _pod(rendered.workload("vision-worker"))["initContainers"][0]
    assert init["command"][-1] == 'squint pack tiny "$PACK_DIR"'


# --------------------------------------------------------------------------- every container


def test_every_container_has_probes_resources_and_a_non_root_security_context(profile, render):
    rendered = render(profile)
    for workload in rendered.workloads():
        pod = _pod(workload)
        name = workload["metadata"]["name"]
        assert pod["enableServiceLinks"] is False, f"{name}: Service links would inject SQUINT_*-like variables"
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            assert "livenessProbe" in container and "readinessProbe" in container, where
            assert "startupProbe" in container, f"{where}: every process here loads something before it serves"
        for container in _all_containers(pod):
            where = f"{name}/{container['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"].get(kind, {})), f"{where} {kind}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["runAsUser"] != 0, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["privileged"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"


def test_slow_loaders_get_a_startup_probe_sized_for_model_loading(render):
    rendered = render()
    for component, at_least in (("vision-worker", 600), ("llm-worker", 1200)):
        probe = rendered.container(component)["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= at_least, component
        assert rendered.container(component)["livenessProbe"]["failureThreshold"] >= 3


def test_squint_servers_are_probed_on_the_grpc_health_service(render):
    rendered = render()
    for component in ("orchestrator", "vision-worker"):
        container = rendered.container(component)
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            # The orchestrator is ready while an LLM worker is: the GenerationService's own status.
            service = SERVICE_NAME if (component, probe) == ("orchestrator", "readinessProbe") else ""
            assert container[probe]["grpc"] == {"port": port, "service": service}, (component, probe)


def test_a_tls_server_is_probed_over_tcp(render):
    container = render("locked-down").container("orchestrator")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["tcpSocket"] == {"port": "grpc"}
        assert "grpc" not in container[probe]


def test_triton_runs_the_model_repository_with_http_health_probes(render):
    container = render().container("llm-worker")
    assert container["command"] == ["tritonserver"]
    args = container["args"]
    assert "--model-repository=/models" in args
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(args)
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    volumes = {v["name"]: v for v in _pod(render().workload("llm-worker"))["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory", "the python backend moves tensors through /dev/shm"


def test_squint_containers_run_the_squint_cli(render):
    rendered = render()
    assert rendered.container("orchestrator")["command"] == ["squint", "serve", "orchestrator"]
    assert rendered.container("vision-worker")["command"] == ["squint", "serve", "vision"]


def test_the_pack_is_mounted_read_only_from_the_claim(render):
    rendered = render("locked-down")
    for component in SQUINT_COMPONENTS:
        pod = _pod(rendered.workload(component))
        volume = next(v for v in pod["volumes"] if v["name"] == "pack")
        assert volume["persistentVolumeClaim"] == {"claimName": "model-packs", "readOnly": True}
        mount = next(m for m in rendered.container(component)["volumeMounts"] if m["name"] == "pack")
        assert mount == {"name": "pack", "mountPath": "/pack", "readOnly": True, "subPath": "llava-1.5-7b"}
        assert "initContainers" not in pod


def test_the_init_container_writes_the_pack_the_server_reads(render):
    rendered = render("dev-cpu")
    for component in SQUINT_COMPONENTS:
        pod = _pod(rendered.workload(component))
        (init,) = pod["initContainers"]
        assert {"name": "PACK_DIR", "value": "/pack"} in init["env"]
        writes = next(m for m in init["volumeMounts"] if m["name"] == "pack")
        assert writes["mountPath"] == "/pack" and not writes.get("readOnly")
        reads = next(m for m in rendered.container(component)["volumeMounts"] if m["name"] == "pack")
        assert reads["readOnly"] is True
        assert next(v for v in pod["volumes"] if v["name"] == "pack")["emptyDir"]["sizeLimit"] == "1Gi"
        assert init["image"] == "squint/orchestrator:0.1.0", "the orchestrator image carries the squint CLI"


# --------------------------------------------------------------------------- selectors


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_pod_labels(profile, render):
    rendered = render(profile)
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in rendered.workloads()}
    for workload in rendered.workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert _matches(selector, pods[workload["metadata"]["name"]])
        others = [n for n, labels in pods.items() if n != workload["metadata"]["name"] and _matches(selector, labels)]
        assert not others, f"{workload['metadata']['name']}'s selector also matches {others}"
    for service in rendered.of_kind("Service"):
        matched = [n for n, labels in pods.items() if _matches(service["spec"]["selector"], labels)]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {matched}"
        container_ports = {
            p["name"]
            for w in rendered.workloads()
            if w["metadata"]["name"] == matched[0]
            for c in w["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (service["metadata"]["name"], port)
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for policy in rendered.of_kind(kind):
            selector = (policy["spec"].get("selector") or policy["spec"]["podSelector"])["matchLabels"]
            matched = [n for n, labels in pods.items() if _matches(selector, labels)]
            assert len(matched) == 1, f"{kind} {policy['metadata']['name']} selects {matched}"
    deployments = {d["metadata"]["name"] for d in rendered.of_kind("Deployment")}
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments


# --------------------------------------------------------------------------- discovery and RBAC


def test_the_vision_headless_service_is_what_discovery_watches(profile, render):
    rendered = render(profile)
    env = rendered.container_env(rendered.container("orchestrator"))
    (service,) = [s for s in rendered.of_kind("Service") if s["metadata"]["name"].endswith("vision-worker-headless")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    vision_grpc = next(p for p in rendered.container("vision-worker")["ports"] if p["name"] == "grpc")
    grpc_ports = [p for p in service["spec"]["ports"] if p["name"] == DiscoverySettings().kubernetes_port_name]
    assert grpc_ports == [
        {"name": "grpc", "port": vision_grpc["containerPort"], "targetPort": "grpc", "protocol": "TCP"}
    ], "discovery picks the EndpointSlice port by this name; a headless Service's clients dial the pod port"
    if env["SQUINT_ORCHESTRATOR_DISCOVERY_MODE"] == "kubernetes":
        # EndpointSlices carry kubernetes.io/service-name=<Service>: the label discovery selects on.
        assert SERVICE_NAME_LABEL == "kubernetes.io/service-name"
        assert env["SQUINT_ORCHESTRATOR_DISCOVERY_KUBERNETES_SERVICE"] == service["metadata"]["name"]
        assert env["SQUINT_ORCHESTRATOR_DISCOVERY_KUBERNETES_NAMESPACE"] == rendered.namespace
        assert env["SQUINT_ORCHESTRATOR_DISCOVERY_KUBERNETES_PORT_NAME"] == "grpc"
    else:
        assert env["SQUINT_ORCHESTRATOR_DISCOVERY_DNS_NAME"] == (
            f"{service['metadata']['name']}.{rendered.namespace}.svc:{vision_grpc['containerPort']}"
        )


def test_the_llm_headless_service_is_what_llm_discovery_watches(profile, render):
    """Each Triton pod is dialled directly (one gRPC connection to a ClusterIP Service would pin
    every request to one pod): the orchestrator discovers them through this Service, in the
    vision workers' discovery mode."""
    rendered = render(profile)
    env = rendered.container_env(rendered.container("orchestrator"))
    (service,) = [s for s in rendered.of_kind("Service") if s["metadata"]["name"].endswith("llm-worker-headless")]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    triton_grpc = next(p for p in rendered.container("llm-worker")["ports"] if p["name"] == "grpc")
    grpc_ports = [p for p in service["spec"]["ports"] if p["name"] == DiscoverySettings().kubernetes_port_name]
    assert grpc_ports == [
        {"name": "grpc", "port": triton_grpc["containerPort"], "targetPort": "grpc", "protocol": "TCP"}
    ]
    mode = env["SQUINT_ORCHESTRATOR_DISCOVERY_MODE"]
    assert env["SQUINT_ORCHESTRATOR_LLM_DISCOVERY_MODE"] == mode
    if mode == "kubernetes":
        assert env["SQUINT_ORCHESTRATOR_LLM_DISCOVERY_KUBERNETES_SERVICE"] == service["metadata"]["name"]
        assert env["SQUINT_ORCHESTRATOR_LLM_DISCOVERY_KUBERNETES_NAMESPACE"] == rendered.namespace
        assert env["SQUINT_ORCHESTRATOR_LLM_DISCOVERY_KUBERNETES_PORT_NAME"] == "grpc"
    else:
        assert env["SQUINT_ORCHESTRATOR_LLM_DISCOVERY_DNS_NAME"] == (
            f"{service['metadata']['name']}.{rendered.namespace}.svc:{triton_grpc['containerPort']}"
        )


def test_the_role_grants_only_what_endpointslice_discovery_needs(profile, render):
    rendered = render(profile)
    assert not rendered.of_kind("ClusterRole") and not rendered.of_kind("ClusterRoleBinding")
    pod = _pod(rendered.workload("orchestrator"))
    if rendered.merged["orchestrator"]["discovery"]["mode"] != "kubernetes":
        assert not rendered.of_kind("Role") and not rendered.of_kind("RoleBinding")
        assert pod["automountServiceAccountToken"] is False
        return
    (role,) = rendered.of_kind("Role")
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}
    ]
    (binding,) = rendered.of_kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": rendered.namespace}
    ]
    assert rendered.get("ServiceAccount", pod["serviceAccountName"])
    assert pod["automountServiceAccountToken"] is True
    for component in ("vision-worker", "llm-worker", "redis"):
        if any(
            w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component
            for w in rendered.workloads()
        ):
            assert _pod(rendered.workload(component))["automountServiceAccountToken"] is False


# --------------------------------------------------------------------------- network policies


def _ingress_peers(rendered, component):
    (policy,) = [
        p
        for p in rendered.of_kind("NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
    ]
    return {port["port"]: rule.get("from") for rule in policy["spec"]["ingress"] for port in rule["ports"]}


def _component_peer(component):
    return [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "squint",
                    "app.kubernetes.io/instance": "squint",
                    "app.kubernetes.io/component": component,
                }
            }
        }
    ]


def test_network_policies_admit_each_tier_only_from_the_one_before(render):
    rendered = render()
    assert _ingress_peers(rendered, "orchestrator")[50051] is None, "clients reach the orchestrator from anywhere"
    assert _ingress_peers(rendered, "vision-worker")[50061] == _component_peer("orchestrator")
    triton = _ingress_peers(rendered, "llm-worker")
    assert triton[8001] == triton[8000] == _component_peer("orchestrator")
    assert _ingress_peers(rendered, "redis")[6379] == _component_peer("vision-worker")
    for policy in rendered.of_kind("NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_locked_down_network_policies_restrict_clients_and_egress(render):
    rendered = render("locked-down")
    clients = _ingress_peers(rendered, "orchestrator")[50051]
    assert {"podSelector": {"matchLabels": {"squint-client": "true"}}} in clients
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}} in clients
    for policy in rendered.of_kind("NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
        assert 53 in egress_ports
    (orchestrator,) = [p for p in rendered.of_kind("NetworkPolicy") if p["metadata"]["name"].endswith("orchestrator")]
    assert {"ipBlock": {"cidr": "10.96.0.1/32"}} in [
        to for rule in orchestrator["spec"]["egress"] for to in rule.get("to", [])
    ]


def test_no_network_policies_when_disabled(render):
    assert not render("dns-discovery").of_kind("NetworkPolicy")


# --------------------------------------------------------------------------- scaling


def test_three_vision_workers_scale_with_an_hpa(render):
    rendered = render("vision-autoscaling")
    deployment = rendered.workload("vision-worker")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (hpa,) = rendered.of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 6)
    assert hpa["spec"]["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 75}}}
    ]
    assert hpa["spec"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 600}}
    (pdb,) = [p for p in rendered.of_kind("PodDisruptionBudget") if p["metadata"]["name"].endswith("vision-worker")]
    assert pdb["spec"]["minAvailable"] == 2


def test_without_autoscaling_the_deployments_carry_the_replica_count(render):
    rendered = render("defaults", {"vision": {"replicaCount": 3}})
    assert not rendered.of_kind("HorizontalPodAutoscaler")
    assert rendered.workload("vision-worker")["spec"]["replicas"] == 3
    assert rendered.workload("orchestrator")["spec"]["replicas"] == 1


def test_every_component_can_autoscale(render):
    rendered = render("dns-discovery")
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in rendered.of_kind("HorizontalPodAutoscaler")}
    assert targets == {"squint-orchestrator", "squint-vision-worker", "squint-llm-worker"}
    vision = rendered.get("HorizontalPodAutoscaler", "squint-vision-worker")
    assert [m["type"] for m in vision["spec"]["metrics"]] == ["Pods"], "targetCPU 0 leaves the custom metric alone"


def test_disruption_budgets_default_to_one_unavailable(render):
    rendered = render()
    budgets = {p["metadata"]["name"]: p["spec"] for p in rendered.of_kind("PodDisruptionBudget")}
    assert set(budgets) == {"squint-orchestrator", "squint-vision-worker", "squint-llm-worker"}
    assert all(spec["maxUnavailable"] == 1 for spec in budgets.values())


# --------------------------------------------------------------------------- config rollout, Redis, images


def test_a_config_change_rolls_the_pods(render):
    before = render()
    after = render("defaults", {"vision": {"config": {"cache": {"ttlSeconds": 60}}}})
    annotation = "checksum/config"

    def checksum(rendered, component):
        return rendered.workload(component)["spec"]["template"]["metadata"]["annotations"][annotation]

    assert checksum(before, "vision-worker") != checksum(after, "vision-worker")
    assert checksum(before, "orchestrator") == checksum(after, "orchestrator")


def test_metrics_stay_off_the_public_service(render):
    rendered = render("dns-discovery")
    public = rendered.get("Service", "squint-orchestrator")
    assert public["spec"]["type"] == "LoadBalancer"
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc", "http"]  # the public APIs, no metrics
    metrics = rendered.get("Service", "squint-orchestrator-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}]
    off = render("defaults", {"orchestrator": {"config": {"metrics": {"enabled": False}}}})
    assert not [s for s in off.of_kind("Service") if s["metadata"]["name"] == "squint-orchestrator-metrics"]
    assert "metrics" not in {p["name"] for p in off.container("orchestrator")["ports"]}


def test_bundled_redis_is_a_statefulset_behind_a_service(render):
    rendered = render()
    statefulset = rendered.workload("redis")
    assert statefulset["kind"] == "StatefulSet" and statefulset["spec"]["replicas"] == 1
    args = rendered.container("redis")["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    env = rendered.container_env(rendered.container("vision-worker"))
    assert env["SQUINT_VISION_CACHE_REDIS_URL"] == "redis://squint-redis:6379/0"
    assert rendered.get("Service", "squint-redis")["spec"]["ports"][0]["port"] == 6379


def test_external_redis_replaces_the_bundled_one(render):
    rendered = render("external-redis")
    assert not rendered.of_kind("StatefulSet")
    env = rendered.container_env(rendered.container("vision-worker"))
    assert env["SQUINT_VISION_CACHE_REDIS_URL"] == "redis://cache.example.internal:6379/2"


def test_an_external_redis_url_can_come_from_a_secret(render):
    rendered = render("locked-down")
    container = rendered.container("vision-worker")
    (item,) = [e for e in container["env"] if e["name"] == "SQUINT_VISION_CACHE_REDIS_URL"]
    assert item["valueFrom"]["secretKeyRef"] == {"name": "squint-redis", "key": "url"}
    configmap = rendered.get("ConfigMap", "squint-vision-worker")
    assert "SQUINT_VISION_CACHE_REDIS_URL" not in configmap["data"], "a URL with a password stays out of ConfigMaps"


def test_images_are_pinned_to_the_app_version_or_a_mirror(render):
    rendered = render()
    images = {c["name"]: c["image"] for w in rendered.workloads() for c in _pod(w)["containers"]}
    assert images == {
        "orchestrator": "squint/orchestrator:0.1.0",
        "vision-worker": "squint/vision-worker:0.1.0",
        "triton": "squint/llm-worker:0.1.0",
        "redis": "docker.io/library/redis:7.4.2",
    }
    mirrored = render("dns-discovery")
    for workload in mirrored.workloads():
        pod = _pod(workload)
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert all(c["image"].startswith("registry.example.internal/") for c in pod["containers"])


def test_the_openai_http_api_is_served_exposed_and_reachable_by_clients(render):
    rendered = render("locked-down")
    container = rendered.container("orchestrator")
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    (service,) = [s for s in rendered.of_kind("Service") if s["metadata"]["name"].endswith("-orchestrator")]
    assert {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"} in service["spec"]["ports"]
    peers = _ingress_peers(rendered, "orchestrator")
    assert peers[8080] == peers[50051]  # the same clients as the gRPC API
    env = rendered.container_env(container)
    assert env["SQUINT_ORCHESTRATOR_HTTP_ENABLED"] == "true" and env["SQUINT_ORCHESTRATOR_HTTP_HOST"] == "0.0.0.0"
