"""`muselab cluster status`: where a running server's jobs run (`GET /api/cluster`)."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from muselab.cli.common import EXIT_BAD_INPUT, CliError, app, out

cluster_app = typer.Typer(help="Where a running `muselab serve` runs its jobs: in-process, or on Ray.")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command()
def status(
    url: Annotated[str, typer.Option(help="The server (muselab serve).")] = "http://127.0.0.1:7860",
    token: Annotated[str | None, typer.Option(help="Its token (or MUSELAB_API_TOKEN).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON.")] = False,
) -> None:
    """Deployments, replicas (by state, with their nodes and devices), nodes, each model's jobs
    running and waiting, and the jobs finished in the last ten minutes."""
    import httpx

    token = token or os.environ.get("MUSELAB_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url.rstrip("/") + "/api/cluster", headers=headers, timeout=30, trust_env=False)
    except httpx.HTTPError as exc:
        raise CliError(f"No muselab server answered at {url} ({exc}); start one with `muselab serve`.") from None
    if response.status_code != 200:
        raise CliError(f"{url} answered {response.status_code}: {response.text[:300]}", EXIT_BAD_INPUT)
    data = response.json()
    if as_json:
        out.print_json(json.dumps(data))
        return
    print_status(data)


def print_status(data: dict[str, Any]) -> None:
    from rich.table import Table

    if data["workers"] == "local":
        out.print("Jobs run in the server's own process (workers: local).")
        for model in data.get("loaded", []):
            out.print(f"  loaded: {model['kind']} {model['model']} on {model['device']} ({model['dtype']})")
    else:
        config = data["replica_config"]
        out.print(
            f"Jobs run on Ray Serve: {config['replicas']} replica(s) per model, each {config['num_cpus']:g} CPU "
            f"and {config['num_gpus']:g} GPU, {config['max_ongoing_requests']} job(s) at once, "
            f"{config['max_queued_requests']} waiting at most.",
            highlight=False,
        )
        nodes = Table("node", "alive", "CPUs", "GPUs", title="Nodes")
        for node in data["nodes"]:
            nodes.add_row(node["node"], "yes" if node["alive"] else "no", f"{node['cpus']:g}", f"{node['gpus']:g}")
        out.print(nodes)
        deployments = Table("application", "kind", "model", "status", "replicas", "devices", title="Deployments")
        for deployment in data["deployments"]:
            replicas = ", ".join(f"{count} {state.lower()}" for state, count in deployment["replicas"].items())
            devices = ", ".join(f"{seen['device']} on {seen['node']}" for seen in deployment["replicas_seen"])
            deployments.add_row(
                deployment["application"],
                deployment["kind"],
                deployment["model"] or "(another service's)",
                deployment["status"].lower(),
                replicas or "none",
                devices or "-",
            )
        out.print(deployments)
    queues = Table("kind", "model", "running", "waiting", title="Jobs now")
    for queue in data["queues"]:
        queues.add_row(queue["kind"], queue["model"], str(queue["running"]), str(queue["waiting"]))
    out.print(queues if data["queues"] else "No jobs running or waiting.")
    recent = Table("kind", "model", "succeeded", "failed", "jobs/min", "mean s", title="Last ten minutes")
    for row in data["recent"]:
        recent.add_row(
            row["kind"],
            row["model"],
            str(row["succeeded"]),
            str(row["failed"]),
            f"{row['jobs_per_minute']:g}",
            "-" if row["mean_seconds"] is None else f"{row['mean_seconds']:g}",
        )
    out.print(recent if data["recent"] else "No jobs finished in the last ten minutes.")
