"""Throughput of the job service with its generation in this process against Ray Serve replicas
(1 and 2), on a Ray cluster this script starts on 127.0.0.1: jobs per minute and the time Ray adds
to each job. `make bench-scaling` runs it; its table goes into docs/SCALING.md.

Models: the tiny ones (where Ray's own cost shows) and full-size random-weight musicgen-small and
SD 1.x at a small size (where the model's compute does). Each configuration first runs one job of
each model untimed (loading, one-time work), then `jobs` jobs submitted at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from muselab.config import Settings
from muselab.schemas import ImageRequest, MusicRequest
from muselab.testing.ray_cluster import LocalRayCluster


def say(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def build_models(scratch: Path, full: bool) -> dict[str, dict[str, str]]:
    """Model folders by set: 'tiny' always, 'full' (musicgen-small, SD 1.x; random weights) when asked."""
    from muselab.testing.tiny import build_tiny_models

    build_tiny_models(scratch / "tiny-models")
    sets = {
        "tiny": {
            "image": str(scratch / "tiny-models" / "tiny-stable-diffusion"),
            "music": str(scratch / "tiny-models" / "tiny-musicgen"),
        }
    }
    if full:
        import torch

        from muselab.bench import architectures

        say("building full-size random musicgen-small and SD 1.x (saved once, loaded by every configuration)")
        network, processor = architectures.build_musicgen_small_random(torch.float32, verbose=False)
        network.save_pretrained(scratch / "musicgen-small")
        processor.save_pretrained(scratch / "musicgen-small")
        del network
        architectures.build_sd1_random(torch.float32, verbose=False).save_pretrained(scratch / "sd1")
        sets["full"] = {"image": str(scratch / "sd1"), "music": str(scratch / "musicgen-small")}
    return sets


def requests(models: str, kind: str, count: int) -> list[Any]:
    size = {"width": 256, "height": 256} if models == "full" else {}
    if kind == "image":
        return [ImageRequest(prompt=f"a cat {i}", steps=4, seed=i, speed="quality", **size) for i in range(count)]
    return [MusicRequest(prompt=f"piano {i}", duration=1, seed=i) for i in range(count)]


def run_configuration(settings: Settings, models: str, kind: str, jobs: int) -> dict[str, Any]:
    """`jobs` jobs of one model submitted at once, after as many untimed ones as it has replicas
    (each loads its model and does its one-time work then)."""
    from muselab.jobs import JobService

    service = JobService(settings)
    try:
        replicas = int(settings.ray_replicas.rpartition("-")[2]) if settings.workers == "ray" else 1
        warming = [service.submit(request, source="cli") for request in requests(models, kind, replicas)]
        for job in warming:
            status = service.wait(job.id)
            assert status and status["status"] == "succeeded", status
        started = time.perf_counter()
        submitted = [service.submit(request, source="cli") for request in requests(models, kind, jobs)]
        ends = [service.wait(job.id) for job in submitted]
        wall = time.perf_counter() - started
        assert all(end and end["status"] == "succeeded" for end in ends), ends
        runs = service.store.run_times(kind, jobs)  # each job's own seconds, from its start to its end
        return {
            "jobs": jobs,
            "wall_s": round(wall, 2),
            "jobs_per_minute": round(jobs / wall * 60, 2),
            "job_s": round(sum(run["seconds"] for run in runs) / len(runs), 3),
        }
    finally:
        if settings.workers == "ray":
            from ray import serve

            serve.shutdown()  # the next configuration deploys its own replicas
        service.shutdown(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=8, help="Jobs per configuration and model.")
    parser.add_argument("--full", action="store_true", help="Also full-size random musicgen-small and SD 1.x.")
    parser.add_argument("--full-image-jobs", type=int, default=4, help="Jobs of SD 1.x (each takes half a minute).")
    parser.add_argument("--json", type=Path, default=Path("bench/results/scaling.json"))
    options = parser.parse_args()
    from muselab.quiet import quiet_libraries

    quiet_libraries()
    cpus = os.cpu_count() or 2
    scratch = Path(tempfile.mkdtemp(prefix="muselab-scaling-"))
    sets = build_models(scratch, options.full)
    results: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": cpus,
        "results": [],
    }
    # One model at a time, its replicas sharing the machine's cores: one replica gets them all,
    # two get half each (Ray sets each replica's thread count from its CPUs).
    configurations = [
        ("in-process", {"workers": "local"}),
        ("Ray, 1 replica", {"workers": "ray", "ray_replicas": "1", "ray_num_cpus": cpus}),
        ("Ray, 2 replicas", {"workers": "ray", "ray_replicas": "2", "ray_num_cpus": cpus / 2}),
    ]
    with LocalRayCluster(cpus) as address:
        for models, folders in sets.items():
            for kind in ("image", "music"):
                jobs = options.full_image_jobs if (models, kind) == ("full", "image") else options.jobs
                for name, workers in configurations:
                    # PyTorch for the full-size models: two replicas of SD 1.x on OpenVINO (each
                    # with its own copy of the weights) would not fit in 24 GiB.
                    runtime = {"backend": "torch"} if models == "full" else {}
                    settings = Settings(
                        **runtime,
                        data_dir=scratch / f"data-{len(results['results'])}",
                        image_model=folders["image"],
                        music_model=folders["music"],
                        offline=True,
                        prepare_models=False,
                        ray_address=address,
                        ray_max_queued=-1,
                        **workers,
                    )
                    say(f"{models} {kind}: {name}, {jobs} jobs")
                    figures = run_configuration(settings, models, kind, jobs)
                    say(f"  {figures['jobs_per_minute']} jobs/min, {figures['job_s']} s a job ({figures['wall_s']} s)")
                    results["results"].append({"models": models, "kind": kind, "configuration": name, **figures})
                    options.json.parent.mkdir(parents=True, exist_ok=True)
                    options.json.write_text(json.dumps(results, indent=2))
    say(f"wrote {options.json}")
    print(table(results))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table, with each configuration against in-process."""
    lines = [
        "| models | kind | where | jobs/min | s a job | jobs/min against in-process | s a job against in-process |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    base: dict[tuple[str, str], dict[str, Any]] = {}
    for row in results["results"]:
        key = (row["models"], row["kind"])
        base.setdefault(key, row)
        local = base[key]
        rate = "" if row is local else f"{row['jobs_per_minute'] / local['jobs_per_minute']:.2f}x"
        extra = "" if row is local else f"{row['job_s'] - local['job_s']:+.2f} s"
        lines.append(
            f"| {row['models']} | {row['kind']} | {row['configuration']} | {row['jobs_per_minute']:g} | "
            f"{row['job_s']:.2f} | {rate} | {extra} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
