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


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "status": cmd_status, "watch": cmd_watch,
            "cancel": cmd_cancel, "worker": cmd_worker, "flower": cmd_flower, "config": cmd_config}


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
