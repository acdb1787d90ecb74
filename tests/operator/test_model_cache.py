"""spec.model.cache pvc / storageClass + size: validation, the rendered claim, Job and engine pods,
and the reconcile that holds the pods until the download Job succeeded (FakeApi)."""
from __future__ import annotations

import pytest

from kubeinfer.operator import model_cache
from kubeinfer.operator.reconcile import LwsDiscovery, reconcile, refresh
from kubeinfer.operator.render import render
from kubeinfer.operator.spec import InvalidSpec
from tests.operator.helpers import FakeApi, inference_service, make_settings, make_spec

NOW = "2025-01-01T00:00:00Z"
HF = "hf://Org/Model-7B"
CREATED = {"storageClass": "nfs", "size": "100Gi"}


def model(cache: dict, uri: str = HF, **extra) -> dict:
    return {"model": {"uri": uri, "cache": cache, **extra}, "accelerator": "none"}


def problems(spec: dict) -> list[str]:
    with pytest.raises(InvalidSpec) as e:
        make_spec(spec)
    return [f"{p.field}: {p.allowed}" for p in e.value.problems]


@pytest.mark.parametrize("cache,uri,field,says", [
    ({"pvc": "models", "size": "10Gi"}, HF, "spec.model.cache.size", "pvc names an existing claim"),
    ({"pvc": "models", "storageClass": "nfs"}, HF, "spec.model.cache.storageClass", "remove one or the other"),
    ({"pvc": "Models_1"}, HF, "spec.model.cache.pvc", "existing PersistentVolumeClaim"),
    ({"storageClass": "nfs"}, HF, "spec.model.cache.size", "is required with storageClass"),
    ({"storageClass": "nfs", "size": "lots"}, HF, "spec.model.cache.size", "positive quantity"),
    ({"storageClass": "nfs", "size": "0"}, HF, "spec.model.cache.size", "positive quantity"),
    ({"size": "10Gi", "reclaimPolicy": "Keep"}, HF, "spec.model.cache.reclaimPolicy", "Retain"),
    ({"pvc": "models"}, "pvc://weights/llama", "spec.model.cache", "read from its claim already"),
    ({"pvc": "models"}, "default", "spec.model.cache", "ships in the image"),
    ({"pvc": "models"}, "/opt/model", "spec.model.cache", "is there already"),
    ({"pvc": "models", "claimName": "hf-home"}, HF, "spec.model.cache", "two different caches"),
    ({"pvc": 3}, HF, "spec.model.cache.pvc", "must be a string"),
])
def test_bad_cache_specs_say_what_to_fix(cache, uri, field, says):
    found = problems(model(cache, uri))
    assert any(p.startswith(f"{field}: ") and says in p for p in found), found


def test_good_cache_specs():
    assert make_spec(model({"pvc": "models"})).model.cache.claim == "models"
    created = make_spec(model({**CREATED, "reclaimPolicy": "Retain"})).model.cache
    assert created.creates_claim and created.size == "100Gi" and created.retain
    assert make_spec(model({"size": "1Ti"})).model.cache.storage_class == ""   # the cluster's default
    old = make_spec(model({"claimName": "hf-home"})).model   # the per-pod HF_HOME cache is unchanged
    assert old.cache is None and old.cache_claim == "hf-home"


def kinds(objs: list[dict]) -> list[str]:
    return [o["kind"] for o in objs]


def test_created_claim_job_and_pods_render():
    spec = make_spec(model(CREATED, revision="v1.0", credentialsSecretRef={"name": "hf"}))
    objs = render(spec, make_settings(), owner={"metadata": {"name": "llm", "uid": "u1"}})
    assert kinds(objs)[:2] == ["PersistentVolumeClaim", "Job"] and "Deployment" in kinds(objs)
    pvc, job, dep = objs[0], objs[1], objs[2]
    assert pvc["metadata"]["name"] == "llm-model-cache"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "volumeMode": "Filesystem",
                           "storageClassName": "nfs", "resources": {"requests": {"storage": "100Gi"}}}
    assert pvc["metadata"]["ownerReferences"][0]["uid"] == "u1"
    folder = "/model-store/models/Org--Model-7B/v1.0"
    pod = job["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["download", HF, "--revision", "v1.0", "--dir", folder]
    assert c["volumeMounts"][0] == {"name": "model-store", "mountPath": "/model-store"}   # read-write
    assert pod["volumes"][0] == {"name": "model-store", "persistentVolumeClaim": {"claimName": "llm-model-cache"}}
    assert {"name": "hf-home", "emptyDir": {}} in pod["volumes"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["activeDeadlineSeconds"] > 0 and c["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    # the download pod is not an engine pod: the Service/PDB/status selector must not match it
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert "kubeinfer.io/inferenceservice" not in labels and labels["kubeinfer.io/model-cache-of"] == "llm"
    assert job["metadata"]["labels"]["kubeinfer.io/inferenceservice"] == "llm"   # but the Job is a child

    engine = dep["spec"]["template"]["spec"]
    [ec] = engine["containers"]
    assert ec["args"][1] == folder and "--revision" not in ec["args"]
    assert {"name": "model-store", "mountPath": "/model-store", "readOnly": True} in ec["volumeMounts"]
    assert {"name": "model-store", "persistentVolumeClaim": {"claimName": "llm-model-cache", "readOnly": True}} \
        in engine["volumes"]
    env = {e["name"]: e for e in ec["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1" and "HF_TOKEN" not in env   # no network, no token


def test_existing_claim_is_not_created_and_retain_has_no_owner():
    spec = make_spec(model({"pvc": "shared"}))
    objs = render(spec, make_settings(), owner={"metadata": {"name": "llm", "uid": "u1"}})
    assert kinds(objs)[0] == "Job" and "PersistentVolumeClaim" not in kinds(objs)
    assert objs[0]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared"
    retained = render(make_spec(model({**CREATED, "reclaimPolicy": "Retain"})), make_settings(),
                      owner={"metadata": {"name": "llm", "uid": "u1"}})
    assert "ownerReferences" not in retained[0]["metadata"]
    assert retained[1]["metadata"]["ownerReferences"][0]["uid"] == "u1"   # the Job goes with it


def test_two_services_of_one_model_share_the_folder_and_a_new_revision_is_a_new_job():
    a = make_spec(model({"pvc": "shared"}), name="a")
    b = make_spec(model({"pvc": "shared"}), name="b")
    assert model_cache.model_dir(a) == model_cache.model_dir(b) == "/model-store/models/Org--Model-7B/main"
    odd = make_spec(model({"pvc": "shared"}, revision="refs/pr/1"))
    assert "/" not in model_cache.relative_dir(odd).split("Org--Model-7B/")[1]
    job = [o for o in render(a, make_settings()) if o["kind"] == "Job"][0]
    other = make_spec(model({"pvc": "shared"}, revision="abc123"), name="a")
    job2 = [o for o in render(other, make_settings()) if o["kind"] == "Job"][0]
    assert job["metadata"]["name"] != job2["metadata"]["name"] and len(job["metadata"]["name"]) <= 63


# ---- reconcile: pods held until the Job succeeded -------------------------------------------


def run(api: FakeApi, body: dict):
    settings = make_settings()
    out = reconcile(api, body, settings, LwsDiscovery("off"), now=NOW)
    body["status"] = out.status
    return out


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def the_job(api: FakeApi) -> dict:
    [job] = [o for (k, _, _), o in api.objects.items() if k == "Job"]
    return job


def job_pod(api: FakeApi, job: dict, phase: str, message: str = "") -> str:
    name = job["metadata"]["name"] + "-x1"
    state = {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1, "message": message}} \
        if phase in ("Succeeded", "Failed") else {"running": {}}
    api.put_object({"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "ns", "creationTimestamp": NOW,
        "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
        "ownerReferences": [{"uid": job["metadata"]["uid"], "controller": True}]},
        "status": {"phase": phase, "containerStatuses": [{"name": "download", "state": state}]}})
    return name


def finish(api: FakeApi, job: dict, kind: str, reason: str = "", message: str = "") -> None:
    job["status"] = {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message}]}
    api.objects[("Job", "ns", job["metadata"]["name"])] = job


def workloads(api: FakeApi) -> list[str]:
    return [n for (k, _, n) in api.objects if k in ("Deployment", "StatefulSet")]


def test_downloading_then_cached_then_pods():
    api = FakeApi()
    body = inference_service(model(CREATED))
    out = run(api, body)
    assert ("PersistentVolumeClaim", "llm-model-cache") in api.kinds() and workloads(api) == []
    assert out.status["phase"] == "Downloading"
    assert condition(out.status, "ModelCached")["status"] == "False"
    assert condition(out.status, "Ready")["reason"] == "Downloading"

    job = the_job(api)
    job["status"] = {"active": 1, "startTime": NOW}
    api.objects[("Job", "ns", job["metadata"]["name"])] = job
    pod = job_pod(api, job, "Running")
    api.logs[("ns", pod)] = "downloading Org/Model-7B@main\nprogress: Fetching 7 files:  43%|####| 3/7\n"
    out = run(api, body)
    cached = condition(out.status, "ModelCached")
    assert out.status["phase"] == "Downloading" and workloads(api) == []
    assert "attempt 1 of 4" in cached["message"] and "3/7" in cached["message"], cached
    # the status refresh (pod events) keeps the condition and the phase
    assert refresh(api, body, make_settings(), LwsDiscovery("off"), now=NOW).status["phase"] == "Downloading"

    api.objects.pop(("Pod", "ns", pod))
    job_pod(api, job, "Succeeded", "downloaded Org/Model-7B@main: 7 files, 13.5 GiB in 80 s")
    finish(api, job, "Complete")
    out = run(api, body)
    assert workloads(api) == ["llm"]
    cached = condition(out.status, "ModelCached")
    assert cached["status"] == "True" and cached["reason"] == "Cached" and "7 files" in cached["message"]
    assert out.status["phase"] in ("Pending", "Loading")   # now the engine pods' own story


def test_failed_download_says_why_and_creates_no_pods():
    api = FakeApi()
    body = inference_service(model({"pvc": "shared"}))
    api.put_object({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "shared", "namespace": "ns"}, "status": {"phase": "Bound"}})
    run(api, body)
    job = the_job(api)
    job_pod(api, job, "Failed", "download failed: RepositoryNotFoundError: 401 Client Error: Repository Not Found")
    finish(api, job, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    out = run(api, body)
    assert workloads(api) == [] and out.status["phase"] == "Failed"
    ready = condition(out.status, "Ready")
    assert ready["reason"] == "DownloadFailed"
    assert "BackoffLimitExceeded" in ready["message"] and "Repository Not Found" in ready["message"]
    assert ("Warning", "DownloadFailed") in [(t, r) for t, r, _ in out.events]
    assert condition(out.status, "Degraded")["status"] == "True"


def test_missing_claim_is_reported():
    api = FakeApi()
    out = run(api, inference_service(model({"pvc": "nope"})))
    cached = condition(out.status, "ModelCached")
    assert cached["reason"] == "ClaimNotFound" and "create it" in cached["message"] and workloads(api) == []


def test_a_workload_serving_the_old_model_is_kept_while_the_new_revision_downloads():
    api = FakeApi()
    body = inference_service(model({"pvc": "shared"}))
    api.put_object({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": "shared", "namespace": "ns"}, "status": {"phase": "Bound"}})
    run(api, body)
    finish(api, the_job(api), "Complete")
    run(api, body)
    before = api.objects[("Deployment", "ns", "llm")]["spec"]["template"]["spec"]["containers"][0]["args"][1]
    body["spec"]["model"]["revision"] = "v2"
    out = run(api, body)
    after = api.objects[("Deployment", "ns", "llm")]["spec"]["template"]["spec"]["containers"][0]["args"][1]
    assert before == after and before.endswith("/main")          # untouched until v2 is there
    assert condition(out.status, "ModelCached")["status"] == "False"
    assert len([k for k, _ in api.kinds() if k == "Job"]) == 1       # the old Job went as an orphan
    finish(api, the_job(api), "Complete")
    run(api, body)
    after = api.objects[("Deployment", "ns", "llm")]["spec"]["template"]["spec"]["containers"][0]["args"][1]
    assert after.endswith("/v2")


def test_a_claim_that_is_not_read_write_many_is_named_in_the_condition():
    api = FakeApi()
    body = inference_service(model({"pvc": "rwo"}))
    api.put_object({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "rwo", "namespace": "ns"},
                    "spec": {"accessModes": ["ReadWriteOnce"]}, "status": {"phase": "Bound"}})
    run(api, body)
    finish(api, the_job(api), "Complete")
    cached = condition(run(api, body).status, "ModelCached")
    assert cached["status"] == "True" and "ReadWriteOnce, not ReadWriteMany" in cached["message"]
    assert condition(run(api, inference_service(model({"pvc": "nope"}), name="x")).status, "Degraded")[
        "reason"] == "ClaimNotFound"
