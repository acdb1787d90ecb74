"""The router: one OpenAI-compatible endpoint in front of every InferenceService it can see.

    app.py          the HTTP surface (routes, /v1/models, /health, /metrics, /queue)
    proxy.py        one request to a replica and its answer back; retry before the first byte
    queue.py        requests held while a model has no ready replica (scale from zero)
    balancer.py     least-load and prefix-hash (consistent hashing with bounded loads)
    prefix_key.py   what prefix-hash hashes
    outliers.py     replicas that fail repeatedly are skipped for a while
    endpoints.py    the routing table (model -> InferenceService -> ready replicas); StaticSource
    kube_source.py  the table from InferenceServices and EndpointSlices (list+watch)
    metrics.py      Prometheus metrics;  config.py  RouterConfig;  cli.py  `kubeinfer router`

The contract with the operator (its side: kubeinfer/operator/traffic.py, router_queue.py):

- What the router reads. InferenceServices (get/list/watch) whose spec.router is kubeinfer (the
  default; inference-pool and none are left to others): the served name is
  spec.model.servedName, else metadata.name; the strategy is spec.loadBalancing.strategy
  ("least-load" | "prefix-hash"), else the annotation `kubeinfer.io/load-balancing` (from before
  the CRD had the field), else the router's --load-balancing; spec.loadBalancing.prefixHash's
  prefixChars, prefixTokens and loadFactor win over the router's flags for that model.
  EndpointSlices (list/watch) labelled `kubeinfer.io/inferenceservice` (copied from the Service the
  operator renders) whose `kubernetes.io/service-name` is the InferenceService's name; the port
  named "http". The router never writes to the API.
- Scale from zero. The autoscaler remains the one writer of spec.replicas. The router exposes how
  many requests it holds per model, two ways:
    GET /queue -> {"models": [{"model", "namespace", "inferenceservice", "held", "in_flight",
                               "ready_replicas"}, ...]}
    kubeinfer_router_queued_requests{model, namespace, inferenceservice} on GET /metrics
  The operator's autoscaler (with --router-url) adds `held` to an InferenceService's load, so
  held > 0 scales minReplicas 0 from 0 to at least 1; `in_flight` is not added (the pods'
  vllm:num_requests_* count those). The chart names the router's Service like the operator's
  Deployment with `-router` for `-operator` (`kubeinfer-router` for a release named kubeinfer;
  `router.fullnameOverride` sets it), port 8080, in the release's namespace.
- A held request waits up to --max-queue-wait seconds (503 with Retry-After after that) and is
  forwarded as soon as an EndpointSlice lists a ready replica.
"""
