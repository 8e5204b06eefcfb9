"""Run the archive flow with its array work on a SLURM cluster (dask-jobqueue example).

Not run in this project's CI (no SLURM there).  Needs ``pip install dask-jobqueue``.
Each SLURM job is one dask worker process; the flow joins the cluster's scheduler through
``--scheduler`` exactly as it joins any other dask cluster::

    python deploy/slurm_cluster.py --manifest data_manifest.yaml --jobs 8 --queue normal

GPU partitions: add ``--gpus`` to request one GPU per job and declare the ``GPU=1``
resource on each worker (the same convention as ``deploy/gpu_workers.sh``).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default="data_manifest.yaml")
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs (dask workers) to start")
    parser.add_argument("--queue", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None)
    parser.add_argument("--cores", type=int, default=8, help="cores (threads) per worker job")
    parser.add_argument("--memory", default="32GB", help="memory per worker job")
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--gpus", action="store_true", help="one GPU per job, declared as resource GPU=1")
    args = parser.parse_args(argv)

    from dask_jobqueue import SLURMCluster  # type: ignore[import-not-found]

    from flows.normalize_archive import normalize_archive

    extra = ["--resources GPU=1"] if args.gpus else []
    directives = ["--gres=gpu:1"] if args.gpus else []
    cluster = SLURMCluster(
        queue=args.queue,
        account=args.account,
        cores=args.cores,
        processes=1,  # one worker process per job: threads share the per-slide lookup table
        memory=args.memory,
        walltime=args.walltime,
        worker_extra_args=extra,
        job_extra_directives=directives,
        local_directory="$TMPDIR",
    )
    cluster.scale(jobs=args.jobs)
    logging.getLogger(__name__).info("SLURM job script:\n%s", cluster.job_script())
    try:
        state = normalize_archive(manifest=args.manifest, scheduler=cluster.scheduler_address, return_state=True)
    finally:
        cluster.close()
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
