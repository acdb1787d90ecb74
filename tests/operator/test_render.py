"""render: table-driven over the spec shapes a user writes; one assertion function per case."""
from __future__ import annotations

import sys

import pytest

from kubeinfer.operator.render import (LABEL_HASH, LABEL_IS, render, selector_string,
                                       stable_hash)
from tests.operator.helpers import example_docs, make_settings, make_spec


def by_kind(objs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def pod_spec(obj: dict) -> dict:
    spec = obj["spec"]
    return (spec.get("template") or spec["leaderWorkerTemplate"]["workerTemplate"])["spec"]


def engine(obj: dict) -> dict:
    return pod_spec(obj)["containers"][0]


def env(obj: dict) -> dict[str, dict]:
    return {e["name"]: e for e in engine(obj)["env"]}


def flag(obj: dict, name: str) -> str | None:
    args = engine(obj)["args"]
    return args[args.index(name) + 1] if name in args else None


def check_gpu_default(objs):
    kinds = by_kind(objs)
    assert [o["kind"] for o in objs] == ["Deployment", "Service", "PodDisruptionBudget"]
    dep, svc, pdb = kinds["Deployment"][0], kinds["Service"][0], kinds["PodDisruptionBudget"][0]
    assert {o["metadata"]["name"] for o in objs} == {"llm"}
    c, pod = engine(dep), pod_spec(dep)
    assert c["command"] == ["kubeinfer"] and c["args"][:2] == ["serve", "--host"]  # default model: no MODEL
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["resources"]["requests"]["memory"] == "32Gi"
    assert flag(dep, "--device") == "cuda" and flag(dep, "--port") == "8000"
    assert flag(dep, "--served-model-name") == "llm" and flag(dep, "--tensor-parallel-size") == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert flag(dep, "--timeout-graceful-shutdown") == "105"   # 120 - 10 preStop - 5 spare
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # the engine writes its start-up error where the kubelet reads the termination message
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert {"name": "KUBEINFER_TERMINATION_LOG", "value": "/dev/termination-log"} in c["env"]
    assert pod["automountServiceAccountToken"] is False
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels[LABEL_IS] == "llm" and len(labels[LABEL_HASH]) == 16
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"] == \
        pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "kubeinfer", LABEL_IS: "llm"}
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert svc["spec"]["ports"][0]["port"] == 8000 and svc["spec"]["type"] == "ClusterIP"
    assert pdb["spec"]["maxUnavailable"] == 1
    assert all("ownerReferences" not in o["metadata"] for o in objs)


def check_cpu(objs):
    dep = by_kind(objs)["Deployment"][0]
    c, pod = engine(dep), pod_spec(dep)
    assert flag(dep, "--device") == "cpu"
    assert not any("gpu" in r for part in c["resources"].values() for r in part)
    assert "tolerations" not in pod
    assert c["args"][1] == "--host"       # the engine's default model
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "1Gi"


def check_multi_gpu(objs):
    dep = by_kind(objs)["Deployment"][0]
    c, e = engine(dep), env(dep)
    assert dep["spec"]["replicas"] == 2
    assert c["resources"] == {"requests": {"cpu": "16", "memory": "160Gi", "nvidia.com/gpu": 4},
                              "limits": {"memory": "160Gi", "nvidia.com/gpu": 4}}
    assert flag(dep, "--tensor-parallel-size") == "4" and c["args"][1] == "Qwen/Qwen2.5-32B-Instruct"
    assert e["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert e["KUBEINFER_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "qwen-32b-api-key", "key": "api-key"}
    assert [v["name"] for v in c["env"]][-1] == "PYTORCH_CUDA_ALLOC_CONF"   # user env after ours
    cache = next(v for v in pod_spec(dep)["volumes"] if v["name"] == "model-cache")
    assert cache == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache"}}
    assert c["startupProbe"]["failureThreshold"] == 360
    assert c["args"][-2:] == ["--max-model-len=16384", "--gpu-memory-utilization=0.92"]
    assert pod_spec(dep)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod_spec(dep)["terminationGracePeriodSeconds"] == 180


def check_pvc(objs):
    dep = objs[0]
    c, pod = engine(dep), pod_spec(dep)
    assert c["args"][1] == "/models/weights/llama/8b"
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models/weights", "readOnly": True} in c["volumeMounts"]
    assert flag(dep, "--revision") is None


def check_hf_secret(objs):
    dep = objs[0]
    assert engine(dep)["args"][1] == "meta-llama/Llama-3.1-8B-Instruct"
    assert flag(dep, "--revision") == "v1.0"
    assert env(dep)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "hf-token-key"}
    assert env(dep)["HF_HOME"]["value"] == "/var/cache/kubeinfer/huggingface"
    cache = next(v for v in pod_spec(dep)["volumes"] if v["name"] == "model-cache")
    assert cache["emptyDir"] == {"sizeLimit": "100Gi"}


def check_api_key(objs):
    assert env(objs[0])["KUBEINFER_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "key", "key": "api-key"}
    assert "--api-key" not in engine(objs[0])["args"]    # never in args: they show in `ps` and logs


def check_scheduling(objs):
    pod = pod_spec(objs[0])
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"][0] == {"key": "team", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    assert pod["tolerations"][1]["key"] == "nvidia.com/gpu"
    assert pod["affinity"]["nodeAffinity"]
    assert pod["priorityClassName"] == "inference" and pod["runtimeClassName"] == "nvidia"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert engine(objs[0])["imagePullPolicy"] == "Always"


def check_probe_overrides(objs):
    dep = objs[0]
    c = engine(dep)
    assert c["startupProbe"] == {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 30,
                                 "failureThreshold": 240, "timeoutSeconds": 5}
    assert c["livenessProbe"]["timeoutSeconds"] == 30
    assert dep["spec"]["progressDeadlineSeconds"] == 30 * 240 + 300


def check_statefulsets(objs):
    kinds = by_kind(objs)
    assert [o["kind"] for o in objs] == ["StatefulSet", "StatefulSet", "Service", "Service", "PodDisruptionBudget"]
    assert [s["metadata"]["name"] for s in kinds["StatefulSet"]] == ["llm-0", "llm-1"]
    for group, sts in enumerate(kinds["StatefulSet"]):
        assert sts["spec"]["replicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
        assert sts["spec"]["serviceName"] == "llm-workers"
        assert sts["spec"]["selector"]["matchLabels"]["kubeinfer.io/group"] == str(group)
        e, c = env(sts), engine(sts)
        assert e["KUBEINFER_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['apps.kubernetes.io/pod-index']"
        assert e["KUBEINFER_NODE_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "llm-node-secret"
        # one template for every rank: the wrapper adds --headless past rank 0, then runs kubeinfer
        assert c["command"][:2] == ["/bin/sh", "-c"] and c["command"][3] == "kubeinfer"
        assert "--headless" in c["command"][2] and 'exec kubeinfer "$@"' in c["command"][2]
        assert flag(sts, "--nnodes") == "2" and flag(sts, "--node-rank") == "$(KUBEINFER_NODE_RANK)"
        assert flag(sts, "--master-addr") == f"llm-{group}-0.llm-workers.ns.svc"
        assert flag(sts, "--master-port") == "29500"
        assert flag(sts, "--pipeline-parallel-size") == "2"
        assert "exec" in c["readinessProbe"] and "/health" in c["readinessProbe"]["exec"]["command"][2]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert {"name": "dist", "containerPort": 29500, "protocol": "TCP"} in c["ports"]
    headless, svc = kinds["Service"]
    assert headless["metadata"]["name"] == "llm-workers" and headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert svc["metadata"]["name"] == "llm" and svc["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"


def lws_container(lws, role):
    return lws["spec"]["leaderWorkerTemplate"][f"{role}Template"]["spec"]["containers"][0]


def lws_flag(lws, role, name):
    args = lws_container(lws, role)["args"]
    return args[args.index(name) + 1] if name in args else None


def check_lws(objs):
    kinds = by_kind(objs)
    assert [o["kind"] for o in objs] == ["LeaderWorkerSet", "Service", "PodDisruptionBudget"]
    lws = kinds["LeaderWorkerSet"][0]
    assert lws["metadata"]["name"] == "llm-workers" and lws["spec"]["replicas"] == 2
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2 and lwt["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"]["rolloutStrategy"] == {
        "type": "RollingUpdate", "rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": 1}}
    leader, worker = lws_container(lws, "leader"), lws_container(lws, "worker")
    # node 0: the API server, its own pod IP as the master address
    assert "--headless" not in leader["args"] and lws_flag(lws, "leader", "--node-rank") == "0"
    assert lws_flag(lws, "leader", "--master-addr") == "$(KUBEINFER_POD_IP)"
    assert {e["name"]: e for e in leader["env"]}["KUBEINFER_POD_IP"]["valueFrom"]["fieldRef"] == \
        {"fieldPath": "status.podIP"}
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health" and "startupProbe" in leader
    # the others: headless, rank and leader address from LWS's env, no HTTP to probe
    assert "--headless" in worker["args"]
    assert lws_flag(lws, "worker", "--node-rank") == "$(LWS_WORKER_INDEX)"
    assert lws_flag(lws, "worker", "--master-addr") == "$(LWS_LEADER_ADDRESS)"
    assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(worker)
    assert "http" not in [p["name"] for p in worker["ports"]]
    for c in (leader, worker):
        assert {e["name"]: e for e in c["env"]}["KUBEINFER_NODE_SECRET"]["valueFrom"]["secretKeyRef"] == \
            {"name": "llm-node-secret", "key": "node-secret"}
        assert c["args"][c["args"].index("--nnodes") + 1] == "2"
        assert c["args"][c["args"].index("--master-port") + 1] == "29500"
    hashes = {lwt[f"{r}Template"]["metadata"]["labels"][LABEL_HASH] for r in ("leader", "worker")}
    assert len(hashes) == 1   # one hash for the pair: either changing rolls the groups
    assert kinds["Service"][0]["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert "leaderworkerset.sigs.k8s.io/exclusive-topology" not in lws["metadata"]["annotations"]


PIPELINE = {"model": {"uri": "hf://meta-llama/Llama-3.1-405B-Instruct"},
            "parallelism": {"tensor": 4, "pipeline": 2}, "replicas": 2}
CASES = [
    ("gpu-default", {}, {}, check_gpu_default),
    ("cpu-example", example_docs("cpu.yaml")[0]["spec"], {}, check_cpu),
    ("multi-gpu-example", example_docs("multi-gpu.yaml")[0]["spec"], {}, check_multi_gpu),
    ("pvc-uri", {"model": {"uri": "pvc://weights/llama/8b"}}, {}, check_pvc),
    ("hf-uri-secret", {"model": {"uri": "hf://meta-llama/Llama-3.1-8B-Instruct", "revision": "v1.0",
                                 "credentialsSecretRef": {"name": "hf", "key": "hf-token-key"},
                                 "cache": {"sizeLimit": "100Gi"}}}, {}, check_hf_secret),
    ("api-key", {"apiKeySecretRef": {"name": "key"}}, {}, check_api_key),
    ("scheduling", {"scheduling": {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "team", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
        "priorityClassName": "inference", "runtimeClassName": "nvidia"},
        "engine": {"imagePullSecrets": [{"name": "regcred"}], "imagePullPolicy": "Always"}}, {}, check_scheduling),
    ("probe-overrides", {"probes": {"startup": {"failureThreshold": 240, "periodSeconds": 30},
                                    "liveness": {"timeoutSeconds": 30}}}, {}, check_probe_overrides),
    ("pipeline-statefulset", PIPELINE, {"use_lws": False}, check_statefulsets),
    ("pipeline-leaderworkerset", PIPELINE, {"use_lws": True}, check_lws),
]


@pytest.mark.parametrize("spec,kwargs,check", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_render(spec, kwargs, check, settings):
    check(render(make_spec(spec), settings, **kwargs))


def test_render_is_deterministic_and_hash_follows_the_template(settings):
    a = render(make_spec({"replicas": 1}), settings)
    assert a == render(make_spec({"replicas": 1}), settings)
    scaled = render(make_spec({"replicas": 3}), settings)
    image = render(make_spec({"engine": {"image": "other:1"}}), settings)
    label = lambda objs: objs[0]["spec"]["template"]["metadata"]["labels"][LABEL_HASH]  # noqa: E731
    spec_hash = lambda objs: objs[0]["metadata"]["annotations"]["kubeinfer.io/spec-hash"]  # noqa: E731
    assert label(scaled) == label(a) and spec_hash(scaled) != spec_hash(a)   # scaling is no rollout
    assert label(image) != label(a)


def test_owner_references(settings):
    owner = {"metadata": {"name": "llm", "uid": "1234"}}
    for obj in render(make_spec({}), settings, owner=owner):
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "kubeinfer.io/v1alpha1", "kind": "InferenceService", "name": "llm",
            "uid": "1234", "controller": True, "blockOwnerDeletion": True}]


def test_engine_args_follow_the_operators(settings):
    dep = render(make_spec({"engine": {"args": ["--max-model-len=8192", "--enforce-eager"]}}), settings)[0]
    args = engine(dep)["args"]
    assert args[-2:] == ["--max-model-len=8192", "--enforce-eager"]
    assert args.index("--device") < args.index("--max-model-len=8192")


def test_cluster_domain_and_selector_string():
    settings = make_settings(cluster_domain="cluster.local")
    spec = make_spec({"parallelism": {"pipeline": 2}, "replicas": 1})
    sts = render(spec, settings)[0]
    assert flag(sts, "--master-addr") == "llm-0-0.llm-workers.ns.svc.cluster.local"
    assert selector_string(make_spec({})) == "app.kubernetes.io/name=kubeinfer,kubeinfer.io/inferenceservice=llm"
    assert selector_string(spec).endswith(",apps.kubernetes.io/pod-index=0")
    assert selector_string(spec, use_lws=True).endswith(",leaderworkerset.sigs.k8s.io/worker-index=0")


def test_user_resources_keep_their_values_and_get_the_gpu_count(settings):
    spec = make_spec({"parallelism": {"tensor": 2}, "resources": {"limits": {"cpu": "8", "memory": "64Gi"}}})
    assert engine(render(spec, settings)[0])["resources"] == {
        "limits": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 2}, "requests": {"nvidia.com/gpu": 2}}


def test_zero_replicas_pipeline_keeps_services(settings):
    objs = render(make_spec({"parallelism": {"pipeline": 2}, "replicas": 0}), settings)
    assert [o["kind"] for o in objs] == ["Service", "Service", "PodDisruptionBudget"]


def test_stable_hash():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert len(stable_hash({})) == 16


def test_exclusive_topology_on_the_leaderworkerset_and_as_affinity_on_statefulsets(settings):
    spec = make_spec({"parallelism": {"pipeline": 2, "exclusiveTopology": "topology.kubernetes.io/zone"},
                      "replicas": 2, "scheduling": {"affinity": {"nodeAffinity": {"x": 1}}}})
    lws = render(spec, settings, use_lws=True)[0]
    assert lws["metadata"]["annotations"]["leaderworkerset.sigs.k8s.io/exclusive-topology"] == \
        "topology.kubernetes.io/zone"
    plain = render(make_spec({"parallelism": {"pipeline": 2}, "replicas": 2}), settings, use_lws=True)[0]
    assert lws["metadata"]["annotations"]["kubeinfer.io/spec-hash"] != \
        plain["metadata"]["annotations"]["kubeinfer.io/spec-hash"]   # adding it is an update
    sts = render(spec, settings)[1]
    affinity = pod_spec(sts)["affinity"]
    assert affinity["nodeAffinity"] == {"x": 1}   # the user's own affinity stays
    together = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert together == {"labelSelector": {"matchLabels": {"kubeinfer.io/group": "1"}},
                        "topologyKey": "topology.kubernetes.io/zone"}
    apart = affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert apart["labelSelector"]["matchExpressions"] == [
        {"key": "kubeinfer.io/group", "operator": "NotIn", "values": ["1"]}]
    assert apart["labelSelector"]["matchLabels"]["kubeinfer.io/inferenceservice"] == "llm"


def test_the_node_secret_manifest_carries_the_value_given():
    from kubeinfer.operator.multinode import node_secret
    secret = node_secret(make_spec({"parallelism": {"pipeline": 2}}), {"a": "b"}, "v" * 40)
    assert secret["metadata"]["name"] == "llm-node-secret" and secret["stringData"] == {"node-secret": "v" * 40}


def test_the_rendered_leaderworkerset_is_valid_under_lws_crd_schema(settings):
    """Against the vendored CRD (tests/k8s_emulator/crds): nothing pruned, nothing invalid."""
    import yaml

    from tests.k8s_emulator import schema
    from tests.k8s_emulator.leaderworkersets import CRD_FILE
    crd_schema = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = make_spec({"parallelism": {"pipeline": 4, "exclusiveTopology": "rack"}, "replicas": 2})
    lws = render(spec, settings, use_lws=True)[0]
    admitted, errors = schema.admit(lws, crd_schema)
    assert errors == [] and schema.prune(lws, crd_schema, root=True) == lws
    assert admitted["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]["partition"] == 0   # a default


def test_the_statefulset_wrapper_and_probe_run_per_rank(settings, tmp_path):
    """The one StatefulSet template under a real /bin/sh: rank > 0 gets --headless and passes its
    probe (nothing to ask), rank 0 runs the server and is probed on /health (none here: fails)."""
    import os
    import subprocess
    fake = tmp_path / "kubeinfer"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    (tmp_path / "python").symlink_to(sys.executable)
    c = engine(render(make_spec({"parallelism": {"pipeline": 2}, "replicas": 1}), settings)[0])
    for rank, headless, probe_ok in (("1", True, True), ("0", False, False)):
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "KUBEINFER_NODE_RANK": rank}
        argv = [a.replace("$(KUBEINFER_NODE_RANK)", rank) for a in c["command"] + c["args"]]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.split()
        assert out[0] == "serve" and ("--headless" in out) == headless and out[out.index("--node-rank") + 1] == rank
        probe = subprocess.run(c["readinessProbe"]["exec"]["command"], env=env, capture_output=True, text=True)
        if probe_ok:
            assert probe.returncode == 0, probe.stderr
        else:   # it asked 127.0.0.1:8000/health (whatever listens there on this machine)
            assert probe.returncode == 0 or "urlopen" in probe.stderr, probe.stderr
