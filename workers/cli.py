"""The ``qpipe`` command line.

    qpipe run SPEC.yaml [--broker URL] [--store URI] [--output-json PATH]
    qpipe submit SPEC.yaml [--broker URL] [--store URI]
    qpipe status RUN_ID [--broker URL] [--store URI] [--json]
    qpipe watch RUN_ID [--broker URL] [--store URI]
    qpipe cancel RUN_ID [--broker URL]
    qpipe worker --queues cpu|gpu|cpu,gpu [--broker URL] [--store URI] [--concurrency N] [--gpus 0,1]
                 [--require-cuda] [--cpus 0-3]
    qpipe flower [--broker URL] [--port 5555] [--address 127.0.0.1] [-- FLOWER ARGS]
    qpipe config
    qpipe runs [--limit N] [--json] [--broker URL] [--store URI]
    qpipe pull RUN_ID [--variant NAME|selected] [--runtime auto|torchscript|onnxruntime|openvino] DIR
    qpipe predict DIR|RUN_ID IMAGE_OR_FOLDER... [--top-k 5] [--json]
    qpipe gc [--keep-last N] [--older-than DAYS] [--grace-minutes 60] [--dry-run] [--yes]

Exit status: 0 when the run succeeded, 1 when it failed or was cancelled, 2 when the spec or
the configuration was refused or the object store could not be reached (nothing was enqueued),
130 on Ctrl-C.

Credentials come from the environment: ``QPIPE_BROKER_URL`` (with the broker password) and
``QPIPE_S3_*``. A ``--broker`` URL that holds a password is accepted with a warning, since any
local user can read a command line (``ps``) and the shell keeps it in its history: the process
then starts itself again with the URL in ``QPIPE_BROKER_URL`` and without ``--broker``, so the
password stays on no command line of it or of anything it starts (Celery's pool processes,
Flower).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130
log = logging.getLogger("qpipe")


def _common(p: argparse.ArgumentParser, store: bool = True) -> None:
    p.add_argument("--broker", help="Redis/Valkey URL (default: $QPIPE_BROKER_URL)")
    if store:
        p.add_argument("--store", help="artifact store URI, file:///dir or s3://bucket/prefix "
                                       "(default: $QPIPE_STORE_URI)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qpipe", description="Fine-tune, quantize and benchmark torchvision "
                                 "classifiers as a distributed pipeline.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a pipeline and wait for it (embedded default without a broker)")
    p.add_argument("spec")
    _common(p)
    p.add_argument("--output-json", help="write the run summary to this file")
    p.add_argument("--no-progress", action="store_true", help="print stage changes only")
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    p = sub.add_parser("submit", help="enqueue a pipeline and print its run id")
    p.add_argument("spec")
    _common(p)
    p = sub.add_parser("status", help="show a run's status")
    p.add_argument("run_id")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = sub.add_parser("watch", help="follow a run until it ends")
    p.add_argument("run_id")
    _common(p)
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("cancel", help="cancel a run")
    p.add_argument("run_id")
    _common(p, store=False)
    p = sub.add_parser("worker", help="start a worker for the cpu and/or gpu queue")
    p.add_argument("--queues", default="cpu", help="cpu, gpu or cpu,gpu")
    _common(p)
    p.add_argument("--concurrency", type=int, default=None,
                   help="pool processes (default: 1; with the gpu queue, one per GPU of --gpus)")
    p.add_argument("--gpus", default=None,
                   help="gpu queue: the GPUs of the pool processes, one each (CUDA_VISIBLE_DEVICES entries: 0,1 or "
                        "GPU-<uuid>,...); default: every usable GPU a CUDA probe at start finds")
    p.add_argument("--require-cuda", action="store_true",
                   help="refuse to start (exit 2) when the CUDA probe finds no usable GPU, instead of training "
                        "on the CPU")
    p.add_argument("--cpus", default=None,
                   help="pin the worker and its pool processes to these CPU cores (taskset -c syntax: 0, 0-3, 0,2), "
                        "with one torch thread per pinned core; default: every core, torch's default threads")
    p.add_argument("--pool", choices=["prefork", "solo", "threads"], default="prefork",
                   help="prefork (default): stages run in pool processes that the worker recycles; the "
                        "parent never touches CUDA, so a child initialises it after the fork")
    p.add_argument("--max-tasks-per-child", type=int, default=None,
                   help="replace a pool process after N stages (default: 1 with the gpu queue, so each "
                        "training stage gets a fresh process and hands all its memory back; 0 = never)")
    p.add_argument("--hostname", default=None, help="Celery node name (default: qpipe-QUEUES-PID@HOST)")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port at /metrics (default: off; 9808 in compose/k8s)")
    p.add_argument("--metrics-addr", default="127.0.0.1",
                   help="address the metrics port listens on (default 127.0.0.1; 0.0.0.0 to be scraped by others)")
    p = sub.add_parser("flower", help="start Flower (the Celery dashboard) against the broker",
                       description="Start Flower against the configured broker; arguments after -- go to Flower "
                                   "(e.g. -- --basic-auth=user:pass). Needs the flower extra: "
                                   "pip install 'qpipe[flower]'.")
    _common(p, store=False)
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0 to serve other machines)")
    p.add_argument("flower_args", nargs=argparse.REMAINDER, help="passed to Flower")
    _after_a_run(sub)
    sub.add_parser("config", help="print every QPIPE_* setting: its value here, its default and what it does "
                   "(credentials masked)")
    return ap


# ------------------------------------------------------------------------------- printing

def follow(handle, *, progress: bool = True, timeout: float | None = None, out=sys.stdout) -> dict[str, Any]:
    """Show the run's stages while it runs (a live board on a terminal, plain lines otherwise:
    see ``workers.progress``); return the final summary."""
    from workers.progress import printer

    board = printer(out, progress)
    try:
        return handle.wait(timeout=timeout, poll=0.5, on_update=board.update)  # the last update is the end
    finally:
        board.close()


def print_summary(summary: dict[str, Any], out=sys.stdout) -> None:
    from pipeline.report import fp32_served, skipped_lines, text_table

    print("", file=out)
    print(f"run {summary.get('run_id')}: {summary.get('status')}", file=out)
    for w in summary.get("warnings") or []:  # first: they change what every figure below means
        print(f"warning: {w['message']}", file=out)
    if summary.get("cached_stages"):
        print(f"{summary['cached_stages']} stage(s) reused from the store's cache (same inputs, same config)",
              file=out)
    if summary.get("baseline") or summary.get("variants"):
        print(text_table(summary), file=out)
        served = fp32_served(summary)
        print("top-1 and p50: the runtime serving each model at that batch size; speedup: vs the fastest fp32 form"
              + (f" ({served})" if served else ""), file=out)
    for line in skipped_lines(summary):  # a runtime not measured is a form the selection could not pick
        print(f"runtime {line}", file=out)
    if summary.get("selected"):
        print(f"selected: {summary['selected']} ({summary.get('selection_reason', '')})", file=out)
    elif summary.get("selection_reason"):
        print(f"selected: none ({summary['selection_reason']})", file=out)
    for f in summary.get("failures") or []:
        print(f"failed: {f['stage']} {f.get('variant') or ''}: {f['error']}", file=out)
    if summary.get("error"):
        print(f"error: {summary['error']}", file=out)
    if summary.get("report"):
        print(f"report: {summary['report']}", file=out)
    if summary.get("report_html"):
        print(f"report (HTML, with plots): {summary['report_html']}", file=out)


def _exit_for(summary: dict[str, Any]) -> int:
    return EXIT_OK if summary.get("status") == "SUCCESS" else EXIT_FAILED


# ------------------------------------------------------------------------------- commands

def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.settings import settings
    from pipeline.spec import load_spec
    from workers.app import broker_url
    from workers.client import Client

    spec = load_spec(args.spec)  # refuse a bad spec before starting anything
    broker = broker_url(args.broker)
    cluster = None
    try:
        if broker is None:
            from workers.embedded import EmbeddedCluster

            print("no broker configured: starting the embedded default (Valkey + a cpu and a gpu worker)",
                  flush=True)
            cluster = EmbeddedCluster(store=args.store or settings().store_uri).start()
            broker, store = cluster.broker, cluster.store
            print(f"artifacts: {store}", flush=True)
        else:
            store = args.store
        handle = Client(broker, store).submit(spec)
        print(f"run {handle.run_id} submitted", flush=True)
        try:
            summary = follow(handle, progress=not args.no_progress, timeout=args.timeout)
        except KeyboardInterrupt:
            handle.cancel()
            raise
        summary.pop("stages", None)
        print_summary(summary)
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n")
        return _exit_for(summary)
    finally:
        if cluster is not None:
            cluster.stop()


def cmd_submit(args: argparse.Namespace) -> int:
    from workers.client import Client

    handle = Client(args.broker, args.store).submit(args.spec)
    print(handle.run_id)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from workers.client import Client

    st = Client(args.broker, args.store).run(args.run_id).status()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        from workers.progress import stage_line

        now = time.time()
        for s in st.get("stages", []):
            print(stage_line(s, now, with_bar=False))
        print_summary(st)
    return EXIT_OK if st["status"] in ("SUCCESS", "RUNNING", "PENDING") else EXIT_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    from workers.client import Client

    summary = follow(Client(args.broker, args.store).run(args.run_id), progress=not args.no_progress)
    summary.pop("stages", None)
    print_summary(summary)
    return _exit_for(summary)


def cmd_cancel(args: argparse.Namespace) -> int:
    from workers.client import Client

    handle = Client(args.broker).run(args.run_id)
    if not handle._state.exists():
        print(f"no run {args.run_id!r} in the broker", file=sys.stderr)
        return EXIT_FAILED
    handle.cancel()
    print(f"cancel requested for {args.run_id}")
    return EXIT_OK


def _broker_app(command: str, broker: str | None):
    """The shared Celery app configured for ``broker`` (or QPIPE_BROKER_URL), once the broker
    answers; exits with a clear message when none is configured or it is unreachable."""
    from workers.app import app, broker_url, configure
    from workers.client import check_broker

    url = broker_url(broker)
    if not url:
        raise SystemExit(f"qpipe {command}: no broker: pass --broker or set QPIPE_BROKER_URL")
    check_broker(url)
    configure(app, url)
    return app, url


def cmd_worker(args: argparse.Namespace) -> int:
    import socket

    # Several workers (and their pool processes) may share one machine's cores. OpenMP's default
    # of spinning while waiting turns that sharing into a many-fold slowdown; passive waiting
    # costs a single busy process little. Must be set before torch is imported. Override by
    # setting OMP_WAIT_POLICY yourself.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    bad = [q for q in queues if q not in ("cpu", "gpu")]
    if bad or not queues:
        raise SystemExit(f"qpipe worker: unknown queue(s) {bad}: use cpu, gpu or cpu,gpu")
    from pipeline.errors import ConfigError
    from workers import cpu_quota, cpus, gpu

    pinned = None
    if args.cpus is not None:  # before torch is imported here: OpenMP sizes itself at import
        try:
            pinned = cpus.parse_cpus(args.cpus)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        cpus.pin(pinned)
    else:  # in a container: as many torch/OpenMP threads as its CPU quota pays for, unless the user chose
        cpu_quota.apply()
    if args.gpus is not None:
        if "gpu" not in queues:
            raise ConfigError(f"--gpus {args.gpus} only applies to a worker of the gpu queue: add --queues gpu, "
                              "or drop --gpus")
        try:
            gpu.parse_gpus(args.gpus)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    # the probe runs in a child process while this one starts up: the parent never initialises CUDA
    probing = gpu.start_probe() if "gpu" in queues or args.require_cuda else None
    if args.require_cuda:  # refuse before connecting to anything
        found = probing.result()
        if not found.usable:
            raise ConfigError(f"--require-cuda: no usable CUDA device: {found.why_none()} ({found.lines()[-1]}): "
                              "start this worker where an NVIDIA GPU and its driver are, or drop --require-cuda "
                              "to train on the CPU")
    from pipeline.settings import settings
    from pipeline.store import open_store

    uri = args.store or settings().store_uri
    if not uri:
        raise ConfigError("a worker needs its artifact store: pass --store URI or set QPIPE_STORE_URI (a worker "
                          "serves one store and refuses stages that name another)")
    app, url = _broker_app("worker", args.broker)
    store = open_store(uri)
    if args.store:
        store.check()
    # the store's own spelling of its URI, as clients put it in messages: the tasks (in the pool
    # processes, which inherit it) refuse a message naming any other store
    os.environ["QPIPE_STORE_URI"] = store.uri
    from workers.app import LEASE_INTERVAL
    from workers.leases import install

    install(app, LEASE_INTERVAL)
    pool = args.pool
    node = args.hostname or f"qpipe-{'-'.join(queues)}-{os.getpid()}@{socket.gethostname()}"
    if args.metrics_port is not None:
        from workers import metrics

        if not 0 < args.metrics_port < 65536:
            raise SystemExit(f"qpipe worker: --metrics-port must be 1-65535, not {args.metrics_port}")
        # before anything imports prometheus_client: pool processes record into per-process files
        metrics.enable_multiprocess(node)
        try:
            metrics.serve(args.metrics_port, args.metrics_addr, broker_url=url, node=node, queues=queues, pool=pool,
                          unacked_key=(app.conf.broker_transport_options or {}).get("unacked_key", "unacked"))
        except OSError as err:
            raise SystemExit(f"qpipe worker: cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: "
                             f"{err.strerror or err}") from None
    argv = ["worker", "-Q", ",".join(queues), "-P", pool, "-n", node, "--loglevel", args.loglevel,
            "--without-gossip", "--without-mingle"]
    if pool == "prefork":
        per_child = args.max_tasks_per_child
        if per_child is None:
            per_child = 1 if "gpu" in queues else 0
        if per_child > 0:
            argv += ["--max-tasks-per-child", str(per_child)]
        # import torch and the stages once in the parent, so a recycled pool process starts in
        # milliseconds; this loads the CUDA libraries but does not initialise CUDA, which only a
        # pool process does
        import torch  # noqa: F401
        import torchvision  # noqa: F401

        from pipeline.stages import load_all

        load_all()
    concurrency = args.concurrency or 1
    if probing is not None:  # its answer, once this process's own imports are done
        try:
            setup = gpu.plan_worker(probing.result(), args.gpus, args.concurrency)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        gpu.apply(setup, pool)
        concurrency = setup.concurrency
    if pool != "solo":
        argv += ["--concurrency", str(concurrency)]
    if pinned is not None:
        cpus.configure_pool(pinned, pool, concurrency)
    app.worker_main(argv)
    return EXIT_OK


def cmd_flower(args: argparse.Namespace) -> int:
    try:
        import flower  # noqa: F401
    except ImportError:
        raise SystemExit("qpipe flower: Flower is not installed: pip install 'qpipe[flower]'") from None
    app, _ = _broker_app("flower", args.broker)
    extra = [a for a in args.flower_args if a != "--"]
    app.start(["flower", f"--port={args.port}", f"--address={args.address}", *extra])
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from pipeline.settings import knobs

    for knob in knobs():  # a value that breaks a rule is refused like any ConfigError (exit 2)
        print(f"{knob.name}={knob.value}  (default: {knob.default})\n    {knob.description}")
    return EXIT_OK


# ------------------------------------------------------------------------------- after a run
# runs, pull, predict, gc: thin over workers.client.Registry (pipeline.registry, pipeline.predict)

def _after_a_run(sub) -> None:
    p = sub.add_parser("runs", help="list recent runs: status, start, duration, selected variant and runtime")
    _common(p)
    p.add_argument("--limit", type=int, default=20, help="the newest N runs (default 20)")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p = sub.add_parser("pull", help="write a run's served model, its manifest, report and a README to a folder",
                       description="Write the model a finished run selected (or --variant), in the form the report "
                                   "chose at each batch size (or --runtime), with manifest.json (preprocessing, "
                                   "classes, sha256 of every file, the summary row, the run's warnings), report.html "
                                   "and its pictures, and a README.md on loading it with plain PyTorch, ONNX Runtime "
                                   "or OpenVINO. Every file is checked against its recorded sha256 first; a mismatch "
                                   "refuses the pull.")
    p.add_argument("run_id")
    p.add_argument("dir", help="a new or empty folder")
    p.add_argument("--variant", default="selected", help="a variant's name, fp32, or selected (default)")
    p.add_argument("--runtime", default="auto", choices=["auto", "torchscript", "onnxruntime", "openvino"],
                   help="the form to pull (default auto: the one the report chose at each batch size)")
    p.add_argument("--store", help="artifact store URI (default: $QPIPE_STORE_URI, else the embedded default's)")
    p = sub.add_parser("predict", help="run a pulled model (a folder, or a run id) on your images")
    p.add_argument("model", help="a folder written by `qpipe pull`, or a run id (its selected model)")
    p.add_argument("images", nargs="+", help="image files, folders of images, or ImageFolders (one sub-folder per "
                                             "class: their top-1 is printed too)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--store", help="artifact store URI, for a run id (default: $QPIPE_STORE_URI, else the "
                                   "embedded default's)")
    p = sub.add_parser("gc", help="remove runs outside a policy and what no kept or running run needs",
                       description="Remove the runs outside the policy, then every stage output, checkpoint and "
                                   "uploaded source or checkpoint that no kept run needs. Never removed: what a kept "
                                   "run or a run in flight needs, a stage computing now, and anything written in the "
                                   "last --grace-minutes (a stage being computed writes outputs that no manifest "
                                   "references yet). Safe while workers run; submissions wait while it removes. "
                                   "A dry run unless --yes: it says what it would free first, either way.")
    _common(p)
    p.add_argument("--keep-last", type=int, default=None, help="keep the newest N runs")
    p.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="remove runs started more than DAYS ago (with --keep-last: unless among the newest N); "
                        "with neither option every run is kept and only what no run needs goes")
    p.add_argument("--grace-minutes", type=float, default=60.0,
                   help="never remove objects written less than this many minutes ago (default 60)")
    p.add_argument("--dry-run", action="store_true", help="only say what would go (the default)")
    p.add_argument("--yes", action="store_true", help="remove it")


def _when(iso: str | None) -> str:
    return iso.replace("T", " ").removesuffix("+00:00") if iso else "-"


def _took(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def cmd_runs(args: argparse.Namespace) -> int:
    from workers.client import Registry

    reg = Registry(args.store, args.broker)
    rows = reg.runs(args.limit)
    for note in reg.notes:
        print(f"qpipe runs: warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print(f"no runs in {reg.store.uri}")
        return EXIT_OK
    table = [["run", "name", "status", "started (UTC)", "took", "selected", "runtime", "warnings"]]
    table += [[r["run_id"], r["name"] or "-", r["status"], _when(r["started"]), _took(r["duration_s"]),
               r["selected"] or "-", r["runtime"] or "-", str(len(r["warnings"])) if r["warnings"] else ""]
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if any(r["warnings"] for r in rows):
        print("warnings: results that cannot be trusted; `qpipe status RUN_ID` says why")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    from pipeline.errors import CorruptArtifact
    from pipeline.store import ArtifactMissing
    from workers.client import Registry

    try:
        got = Registry(args.store).pull(args.run_id, args.dir, variant=args.variant, runtime=args.runtime)
    except (CorruptArtifact, ArtifactMissing) as err:
        print(f"qpipe pull: refused, nothing written: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"pulled {got.variant} of run {got.run_id} into {got.folder}")
    for batch, s in got.serving.items():
        top1 = f", top-1 {s['accuracy_top1']:.4f}" if isinstance(s.get("accuracy_top1"), float) else ""
        p50 = f", p50 {s['latency_ms_p50']:.3f} ms" if isinstance(s.get("latency_ms_p50"), float) else ""
        print(f"  batch {batch}: {s['runtime']} ({s['file']}){top1}{p50}")
    print(f"  {len(got.files)} files verified against their sha256, plus manifest.json and README.md")
    for w in got.warnings:
        print(f"warning: {w['message']}")
    print(f"how to load and feed it: {got.folder / 'README.md'}")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from workers.client import Registry

    if Path(args.model).is_dir():
        from pipeline.predict import predict

        out = predict(args.model, args.images, top_k=args.top_k)
    else:
        out = Registry(args.store).predict(args.model, args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    for w in out["warnings"]:
        print(f"warning: {w['message']}")
    for p in out["predictions"]:
        label = f" [{p['label']}: {'right' if p['correct'] else 'wrong'}]" if "label" in p else ""
        print(f"{p['image']}{label}: " + ", ".join(f"{t['class']} {t['probability']:.4f}" for t in p["top"]))
    for s in out["skipped"]:
        print(f"skipped {s['file']}: {s['reason']}")
    if out["top1"]:
        t = out["top1"]
        print(f"top-1 {t['accuracy']:.4f}: {t['correct']} of {t['images']} labelled image(s) right")
    print(f"model: {out['variant']} of run {out['run_id']} on {out['runtime']} ({out['file']})")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from pipeline.registry import human_bytes
    from workers.client import Registry

    if args.yes and args.dry_run:
        raise SystemExit("qpipe gc: --dry-run and --yes contradict each other: give one")
    reg = Registry(args.store, args.broker)

    def tell(found) -> None:
        for run, why in found.kept:
            print(f"keep    {run.run_id}  {run.status}  ({why})")
        for run in found.removed:
            print(f"remove  {run.run_id}  {run.status}")
        folders = ", ".join(f"{top}: {n}" for top, n in sorted(found.counts().items()))
        print(f"{'removing' if args.yes else 'would remove'} {len(found.objects)} object(s), "
              f"{human_bytes(found.bytes)}" + (f" ({folders})" if folders else "")
              + (f"; {found.spared} unneeded object(s) younger than {args.grace_minutes:g} min left"
                 if found.spared else ""), flush=True)

    out = reg.gc(keep_last=args.keep_last, older_than_days=args.older_than, grace_minutes=args.grace_minutes,
                 dry_run=not args.yes, on_plan=tell)
    for note in out["notes"]:
        print(f"qpipe gc: note: {note}", file=sys.stderr)
    if args.yes:
        print(f"removed {out['removed']['objects']} object(s), {human_bytes(out['removed']['bytes'])}")
    elif out["objects"]:
        print("dry run: nothing removed; add --yes to remove it")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "status": cmd_status, "watch": cmd_watch,
            "cancel": cmd_cancel, "worker": cmd_worker, "flower": cmd_flower, "config": cmd_config,
            "runs": cmd_runs, "pull": cmd_pull, "predict": cmd_predict, "gc": cmd_gc}


def _without_url(argv: list[str], url: str) -> list[str]:
    """``argv`` without ``--broker URL`` / ``--broker=URL`` (or an abbreviation of --broker)."""
    out: list[str] = []
    for token in argv:
        if token == url and out and out[-1].startswith("--"):
            out.pop()
        elif not (token.startswith("--") and token.endswith("=" + url)):
            out.append(token)
    return out


def _broker_password_off_the_command_line(args: argparse.Namespace) -> None:
    """Warn about a password in ``--broker``, and take it off this process's command line.

    Python cannot rewrite its own argv (the setproctitle package could, as a new dependency,
    and only after the password had been visible), so the process executes itself again with
    the same arguments less ``--broker``, and the URL in ``QPIPE_BROKER_URL``; the environment
    of a process is readable by its user only. Celery's pool processes and Flower run inside
    the re-executed process, so they carry the clean command line too."""
    from urllib.parse import urlsplit

    url = getattr(args, "broker", None)
    try:
        has_password = bool(url) and urlsplit(url).password is not None
    except ValueError:  # not a URL: refused later with its own message
        has_password = False
    if not has_password:
        return
    print("qpipe: warning: the --broker URL holds a password, which other local users can read in `ps` and "
          "your shell keeps in its history: set QPIPE_BROKER_URL instead (e.g. from a file only you can read)",
          file=sys.stderr, flush=True)
    argv = list(sys.orig_argv)
    clean = _without_url(argv, url)
    if clean != argv:  # main() was not called with a list of its own: the URL is in this process's argv
        sys.stdout.flush()
        os.execve(sys.executable, clean, {**os.environ, "QPIPE_BROKER_URL": url})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _broker_password_off_the_command_line(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose and args.command not in ("worker", "flower"):
        # each retry of the object store is logged by the store and by urllib3; a client command
        # without -v shows the outcome only: one line below (or success). A worker logs them all.
        for name in ("urllib3", "pipeline.store"):
            logging.getLogger(name).setLevel(logging.ERROR)
    from pipeline.errors import ConfigError, SpecError, TransientError

    try:
        return COMMANDS[args.command](args)
    except SpecError as err:
        print(f"qpipe: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except ConfigError as err:
        print(f"qpipe: refused: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except TransientError as err:  # raised once the store's retries are spent
        print(f"qpipe: {err}, after retrying: check that the S3 server runs there and that QPIPE_S3_ENDPOINT "
              "and QPIPE_S3_SECURE point at it", file=sys.stderr)
        return EXIT_REFUSED
    except KeyError as err:
        print(f"qpipe: {err.args[0] if err.args else err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("qpipe: interrupted; everything started here was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
