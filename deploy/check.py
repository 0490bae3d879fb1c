"""Cross-file checks of the deploy material, run by deploy/check.

Each check names the file and what is wrong; all failures are listed, then
the exit status is 1. Run from the repository root.
"""

import json
import pathlib
import re
import sys

import yaml

DEPLOY = pathlib.Path("deploy")
problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def seconds(value):
    """`25s`, `1m`, `90` (seconds) -> seconds."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(value).strip())
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


# --- the metrics Herald exports, from server/src/telemetry.rs -------------

def exported_metrics():
    """Every series name a node exposes: counters get `_total`, histograms
    `_bucket`/`_sum`/`_count` (prometheus-client's text encoding)."""
    source = pathlib.Path("server/src/telemetry.rs").read_text()
    # The store's group-commit metrics are a struct of its own, registered
    # field by field in telemetry.rs.
    typed = source + pathlib.Path("server/src/store/mod.rs").read_text()
    kinds = {}
    for field, ty in re.findall(r"^\s*pub (\w+): (.+),\s*$", typed, re.M):
        kind = re.search(r"(Counter|Gauge|Histogram)>?\s*$", ty)
        if kind:
            kinds[field] = kind.group(1)
    names = set()
    for field, name in re.findall(r"(\w+): registered\(\s*&mut r,\s*\"(herald_\w+)\"", source):
        kind = kinds.get(field)
        if kind == "Counter":
            names.add(name + "_total")
        elif kind == "Histogram":
            names.update(name + s for s in ("_bucket", "_sum", "_count"))
        elif kind == "Gauge":
            names.add(name)
        else:
            problem("server/src/telemetry.rs", f"cannot tell the type of {name} (field {field})")
    if len(names) < 10:
        problem("server/src/telemetry.rs", f"found only {len(names)} metrics: has the registration code changed shape?")
    return names


def check_metric_names(where, text, exported):
    used = set(re.findall(r"\bherald_[a-z0-9_]+", text))
    if not used:
        problem(where, "uses no herald_* metric")
    for name in sorted(used - exported):
        problem(where, f"uses {name}, which Herald does not export")


# --- compose.yaml ---------------------------------------------------------

def check_compose():
    where = "deploy/compose.yaml"
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose.get("services", {})
    nodes = [f"herald-{i}" for i in (1, 2, 3)]
    for name in nodes + ["nginx", "postgres", "redis", "prometheus", "grafana", "jaeger"]:
        if name not in services:
            problem(where, f"no service {name}")
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for dep in depends if isinstance(depends, (list, dict)) else []:
            if dep not in services:
                problem(where, f"{name} depends on {dep}, which is not a service")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if not (DEPLOY / source).exists():
                    problem(where, f"{name} mounts {source}, which does not exist")
            elif source not in compose.get("volumes", {}):
                problem(where, f"{name} mounts the volume {source}, which is not declared")
        for port in service.get("ports", []):
            if not re.fullmatch(r"(127\.0\.0\.1:)?\d+:\d+", str(port)):
                problem(where, f"{name} publishes {port!r}: write HOST_IP:HOST:CONTAINER")

    for name in nodes:
        service = services.get(name, {})
        env = service.get("environment", {})
        if env.get("HERALD_NODE_ID") != name:
            problem(where, f"{name}: HERALD_NODE_ID is {env.get('HERALD_NODE_ID')!r}")
        if not str(env.get("HERALD_DATABASE_URL", "")).startswith("postgres://"):
            problem(where, f"{name}: HERALD_DATABASE_URL is not PostgreSQL")
        if not str(env.get("HERALD_REDIS_URL", "")).startswith("redis://"):
            problem(where, f"{name}: HERALD_REDIS_URL is not Redis")
        if not env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").startswith("http://jaeger:"):
            problem(where, f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT does not point at jaeger")
        if not str(env.get("HERALD_LISTEN", "")).startswith("0.0.0.0:"):
            problem(where, f"{name}: HERALD_LISTEN must listen on the container network")
        deadline = seconds(env.get("HERALD_SHUTDOWN_DEADLINE", "25s"))
        if seconds(service.get("stop_grace_period", "10s")) <= deadline:
            problem(where, f"{name}: stop_grace_period must outlast HERALD_SHUTDOWN_DEADLINE ({deadline}s)")
        if service.get("build", {}).get("dockerfile") != "deploy/docker/Dockerfile":
            problem(where, f"{name}: not built from deploy/docker/Dockerfile")

    nginx = services.get("nginx", {})
    mounts = " ".join(nginx.get("volumes", []))
    if "./nginx/herald.conf:/etc/nginx/templates/" not in mounts:
        problem(where, "nginx does not run deploy/nginx/herald.conf as a template")
    upstreams = (DEPLOY / "nginx/upstreams.compose.conf").read_text()
    for name in nodes:
        if f"server {name}:8080;" not in upstreams:
            problem("deploy/nginx/upstreams.compose.conf", f"{name} is not an upstream")
    trusted = services.get("herald-1", {}).get("environment", {}).get("HERALD_TRUSTED_PROXIES")
    nginx_ip = nginx.get("networks", {}).get("herald", {}).get("ipv4_address")
    if trusted != nginx_ip:
        problem(where, f"HERALD_TRUSTED_PROXIES ({trusted}) is not nginx's address ({nginx_ip})")
    return services


# --- nginx ----------------------------------------------------------------

def check_nginx(heartbeat, node_idle):
    where = "deploy/nginx/herald.conf"
    text = (DEPLOY / "nginx/herald.conf").read_text()
    upstream = re.search(r"^upstream\s+herald\s*\{(.*?)^\}", text, re.M | re.S)
    idle = re.findall(r"^\s*keepalive_timeout\s+(\S+);", upstream.group(1) if upstream else "", re.M)
    if not idle or seconds(idle[0]) >= node_idle:
        problem(where, f"the upstream's keepalive_timeout ({idle[0] if idle else 'nginx default 60s'}) must be "
                       f"shorter than the nodes' idle timeout (HERALD_HEADER_TIMEOUT, {node_idle}s)")
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        values = re.findall(rf"^\s*{directive}\s+(\S+);", text, re.M)
        if not values:
            problem(where, f"no {directive}")
        for v in values:
            if seconds(v) < 2 * heartbeat:
                problem(where, f"{directive} {v} is too short for a {heartbeat}s heartbeat")
    for needed in ("proxy_http_version 1.1;", "proxy_set_header Upgrade", "proxy_set_header Connection",
                   "proxy_buffering off;", "X-Forwarded-For", "X-Request-Id", "least_conn;"):
        if needed not in text:
            problem(where, f"missing `{needed}`")
    if re.search(r"^\s*log_format[^;]*\$(request|args|query_string|request_uri)\b", text, re.M | re.S):
        problem(where, "the log format records the query string, where browsers may put their token")


# --- Kubernetes -------------------------------------------------------------

def check_k8s(heartbeat):
    k8s = DEPLOY / "k8s"
    kustomization = load_yaml(k8s / "kustomization.yaml")
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in k8s.glob("*.yaml")} - {"kustomization.yaml"}
    for name in sorted(listed - present):
        problem("deploy/k8s/kustomization.yaml", f"lists {name}, which does not exist")
    for name in sorted(present - listed):
        problem("deploy/k8s/kustomization.yaml", f"does not list {name}")

    config = load_yaml(k8s / "configmap.yaml")["data"]
    deployment = load_yaml(k8s / "deployment.yaml")
    where = "deploy/k8s/deployment.yaml"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problem(where, "the readiness probe is not GET /readyz")
    if container.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problem(where, "the liveness probe is not GET /healthz")
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    deadline = seconds(config.get("HERALD_SHUTDOWN_DEADLINE", "25s"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= pre_stop + deadline:
        problem(where, f"terminationGracePeriodSeconds {grace} must outlast preStop {pre_stop}s + "
                       f"HERALD_SHUTDOWN_DEADLINE {deadline}s")
    sc = container.get("securityContext", {})
    if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
            and sc.get("capabilities", {}).get("drop") == ["ALL"]):
        problem(where, "the container must be read-only, without privilege escalation, dropping ALL capabilities")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problem(where, "the pod must run as non-root")
    for kind in ("requests", "limits"):
        if not container.get("resources", {}).get(kind):
            problem(where, f"no resource {kind}")
    refs = {next(iter(e.values()))["name"] for e in container.get("envFrom", [])}
    for name in ("herald-config", "herald-secrets"):
        if name not in refs:
            problem(where, f"does not take its environment from {name}")

    annotations = load_yaml(k8s / "ingress.yaml")["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        value = annotations.get(f"nginx.ingress.kubernetes.io/{key}")
        if value is None or seconds(value) < 2 * heartbeat:
            problem("deploy/k8s/ingress.yaml", f"{key} {value} is too short for a {heartbeat}s heartbeat")
    if int(config.get("HERALD_HEARTBEAT_SECS", heartbeat)) != heartbeat:
        problem("deploy/k8s/configmap.yaml", "HERALD_HEARTBEAT_SECS differs from what the proxies were sized for")


# --- Grafana and Prometheus -------------------------------------------------

def check_grafana(exported):
    where = "deploy/grafana/herald.json"
    text = (DEPLOY / "grafana/herald.json").read_text()
    dashboard = json.loads(text)
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        problem(where, "panel ids are not unique")
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            problem(where, f"panel {panel['title']!r} has no query")
        for target in targets:
            expr = target.get("expr", "")
            exprs.append(expr)
            if "_total" in expr and "rate(" not in expr and "increase(" not in expr:
                problem(where, f"panel {panel['title']!r} graphs a raw counter: {expr}")
            if "_bucket" in expr and "histogram_quantile(" not in expr:
                problem(where, f"panel {panel['title']!r} uses buckets without histogram_quantile: {expr}")
            if expr.count("(") != expr.count(")"):
                problem(where, f"panel {panel['title']!r}: unbalanced parentheses in {expr}")
    check_metric_names(where, "\n".join(exprs), exported)
    provisioning = load_yaml(DEPLOY / "grafana/provisioning/dashboards/herald.yaml")
    if provisioning["providers"][0]["options"]["path"] != "/etc/grafana/dashboards":
        problem("deploy/grafana/provisioning/dashboards/herald.yaml", "does not load /etc/grafana/dashboards")


def check_prometheus(exported, services):
    where = "deploy/prometheus/prometheus.yml"
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    herald = jobs.get("herald")
    if not herald:
        problem(where, "no `herald` scrape job")
    else:
        if herald.get("metrics_path", "/metrics") != "/metrics":
            problem(where, "the herald job does not scrape /metrics")
        targets = [t for sc in herald["static_configs"] for t in sc["targets"]]
        nodes = sorted(n for n in services if n.startswith("herald-"))
        if sorted(t.split(":")[0] for t in targets) != nodes:
            problem(where, f"scrapes {targets}, not every node of compose.yaml ({nodes})")
    if "/etc/prometheus/alerts.yml" not in config.get("rule_files", []):
        problem(where, "does not load alerts.yml")

    where = "deploy/prometheus/alerts.yml"
    alerts = load_yaml(DEPLOY / "prometheus/alerts.yml")
    rules = [r for g in alerts["groups"] for r in g["rules"]]
    for rule in rules:
        for key in ("alert", "expr", "labels", "annotations"):
            if key not in rule:
                problem(where, f"rule {rule.get('alert')!r} has no {key}")
        expr = rule.get("expr", "")
        if expr.count("(") != expr.count(")"):
            problem(where, f"{rule.get('alert')}: unbalanced parentheses")
    check_metric_names(where, "\n".join(r.get("expr", "") for r in rules), exported)


def check_dockerfile():
    where = "deploy/docker/Dockerfile"
    text = (DEPLOY / "docker/Dockerfile").read_text()
    if len(re.findall(r"^FROM ", text, re.M)) < 2:
        problem(where, "not a multi-stage build")
    if "cargo build --release -p herald-server --locked" not in text:
        problem(where, "does not build herald-server --locked")
    user = re.findall(r"^USER (\S+)", text, re.M)
    if not user or user[-1].split(":")[0] in ("root", "0"):
        problem(where, "the image must run as a non-root USER")
    for needed in ("STOPSIGNAL SIGTERM", "EXPOSE 8080"):
        if needed not in text:
            problem(where, f"missing {needed}")


def main():
    heartbeat = 25  # HERALD_HEARTBEAT_SECS' default (docs/configuration.md)
    node_idle = 10  # HERALD_HEADER_TIMEOUT's default: a node closes idle connections after it
    exported = exported_metrics()
    services = check_compose()
    check_nginx(heartbeat, node_idle)
    check_k8s(heartbeat)
    check_grafana(exported)
    check_prometheus(exported, services)
    check_dockerfile()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s) in the deploy material", file=sys.stderr)
        sys.exit(1)
    print(f"checked: {len(exported)} exported metric series")


if __name__ == "__main__":
    main()
