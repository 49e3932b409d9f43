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


def requests(models: str, count: int) -> list[Any]:
    if models == "tiny":
        make = [
            lambda i: ImageRequest(prompt=f"a cat {i}", steps=4, seed=i, speed="quality"),
            lambda i: MusicRequest(prompt=f"piano {i}", duration=1, seed=i),
        ]
    else:
        make = [
            lambda i: ImageRequest(prompt=f"a cat {i}", steps=4, width=256, height=256, seed=i, speed="quality"),
            lambda i: MusicRequest(prompt=f"piano {i}", duration=1, seed=i),
        ]
    return [make[i % 2](i) for i in range(count)]


def run_configuration(settings: Settings, models: str, jobs: int) -> dict[str, Any]:
    from muselab.jobs import JobService

    service = JobService(settings)
    try:
        for warm in requests(models, 2):  # loading and one-time work, untimed
            job = service.submit(warm, source="cli")
            status = service.wait(job.id)
            assert status and status["status"] == "succeeded", status
        started = time.perf_counter()
        submitted = [service.submit(request, source="cli") for request in requests(models, jobs)]
        ends = [service.wait(job.id) for job in submitted]
        wall = time.perf_counter() - started
        assert all(end and end["status"] == "succeeded" for end in ends), ends
        seconds = service.store.run_times("image", 200) + service.store.run_times("music", 200)
        return {
            "jobs": jobs,
            "wall_s": round(wall, 2),
            "jobs_per_minute": round(jobs / wall * 60, 2),
            "mean_job_s": round(wall / jobs, 3),
            "runs": len(seconds),
        }
    finally:
        if settings.workers == "ray":
            from ray import serve

            serve.shutdown()  # the next configuration deploys its own replicas
        service.shutdown(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=8, help="Jobs per configuration (half images, half music).")
    parser.add_argument("--full", action="store_true", help="Also full-size random musicgen-small and SD 1.x.")
    parser.add_argument("--json", type=Path, default=Path("bench/results/scaling.json"))
    options = parser.parse_args()
    from muselab.quiet import quiet_libraries

    quiet_libraries()
    cpus = os.cpu_count() or 2
    scratch = Path(tempfile.mkdtemp(prefix="muselab-scaling-"))
    sets = build_models(scratch, options.full)
    results: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": cpus,
        "jobs": options.jobs,
        "results": [],
    }
    with LocalRayCluster(cpus) as address:
        for models, folders in sets.items():
            configurations = [
                ("in-process", {"workers": "local"}),
                ("Ray, 1 replica", {"workers": "ray", "ray_replicas": "1", "ray_num_cpus": cpus}),
                ("Ray, 2 replicas", {"workers": "ray", "ray_replicas": "2", "ray_num_cpus": cpus / 2}),
            ]
            for name, workers in configurations:
                data = scratch / f"data-{models}-{len(results['results'])}"
                settings = Settings(
                    data_dir=data,
                    image_model=folders["image"],
                    music_model=folders["music"],
                    offline=True,
                    ray_address=address,
                    ray_max_queued=-1,
                    **workers,
                )
                say(f"{models}: {name}, {options.jobs} jobs")
                figures = run_configuration(settings, models, options.jobs)
                say(f"  {figures['jobs_per_minute']} jobs/min ({figures['wall_s']} s)")
                results["results"].append({"models": models, "configuration": name, **figures})
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2))
    say(f"wrote {options.json}")
    print(table(results))


def table(results: dict[str, Any]) -> str:
    lines = ["| models | where | jobs/min | s per job | against in-process |", "|---|---|---:|---:|---:|"]
    local: dict[str, float] = {}
    for row in results["results"]:
        if row["configuration"] == "in-process":
            local[row["models"]] = row["mean_job_s"]
        base = local.get(row["models"])
        in_process = base is None or row["configuration"] == "in-process"
        delta = "" if in_process else f"{row['mean_job_s'] - base:+.2f} s"
        figures = f"{row['jobs_per_minute']:g} | {row['mean_job_s']:.2f} | {delta}"
        lines.append(f"| {row['models']} | {row['configuration']} | {figures} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
