"""The Job controller and the claim binder with the stand-in kubelet: a Job whose pod succeeds is
Complete, one whose pods keep failing is Failed after backoffLimit retries, a claim binds and its
directory is shared by the pods that mount it."""
from __future__ import annotations

from typing import Any

from tests.k8s_emulator.conftest import Client
from tests.k8s_emulator.test_workloads import NS, wait_for

JOBS = "/apis/batch/v1/namespaces/default/jobs"


def job(name: str, script: str, backoff: int = 0, claim: str | None = None) -> dict[str, Any]:
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [{
        "name": "run", "image": "python:3.11", "command": ["python", "-c", script]}]}
    if claim:
        pod["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
        pod["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        pod["containers"][0]["args"] = ["/data/out.txt"]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff, "template": {"metadata": {"labels": {"app": name}}, "spec": pod}}}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == kind and c["status"] == "True"), None)


def test_job_complete_and_claim_shared(emu_with_kubelet):
    kube = Client(emu_with_kubelet)
    kube.ok("POST", f"{NS}/persistentvolumeclaims", {"metadata": {"name": "data"}, "spec": {
        "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for("the claim to bind", lambda: kube.ok("GET", f"{NS}/persistentvolumeclaims/data")
             .get("status", {}).get("phase") == "Bound")
    kube.ok("POST", JOBS, job("write", "import sys; open(sys.argv[1], 'w').write('hello')", claim="data"))
    done = wait_for("the Job to complete", lambda: condition(j := kube.ok("GET", f"{JOBS}/write"), "Complete") and j)
    assert done["status"]["succeeded"] == 1 and "completionTime" in done["status"]
    [pod] = kube.ok("GET", f"{NS}/pods", labelSelector="job-name=write")["items"]
    assert pod["status"]["phase"] == "Succeeded" and pod["metadata"]["ownerReferences"][0]["kind"] == "Job"
    # a second pod mounting the claim reads what the Job wrote
    kube.ok("POST", JOBS, job("read", "import sys; assert open(sys.argv[1]).read() == 'hello'", claim="data"))
    wait_for("the reader to complete", lambda: condition(kube.ok("GET", f"{JOBS}/read"), "Complete"))


def test_job_failing_past_its_backoff_limit(emu_with_kubelet):
    kube = Client(emu_with_kubelet)
    kube.ok("POST", JOBS, job("bad", "import sys; print('no luck'); sys.exit(3)", backoff=1))
    failed = wait_for("the Job to fail", lambda: condition(j := kube.ok("GET", f"{JOBS}/bad"), "Failed") and j, 30)
    assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    assert failed["status"]["failed"] == 2 and not failed["status"].get("active")
    pods = kube.ok("GET", f"{NS}/pods", labelSelector="job-name=bad")["items"]
    assert len(pods) == 2 and all(p["status"]["phase"] == "Failed" for p in pods)
