"""Submitting loads no stage: a machine that only enqueues pipelines (a CI job, a notebook on a
laptop) checks, plans and digests the spec and describes and uploads the data without importing
any stage's module, the quantizer, the trainer or the image decoder; those load only on the
workers. (The spec's check reads torchvision's list of architectures, so torchvision itself is
imported to name a misspelt arch.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import make_folder

ROOT = Path(__file__).resolve().parents[1]


def test_planning_a_spec_with_a_local_folder_loads_no_stage(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    script = textwrap.dedent(f"""
        import sys
        from pipeline.plan import build_plan
        from pipeline.sources import prepare_sources
        from pipeline.spec import load_spec, spec_digest
        from pipeline.store import open_store
        import workers.client, workers.canvas

        spec = load_spec({{"name": "torchless", "data": {{"source": {str(folder)!r}, "image_size": 16}},
                          "model": {{"arch": "resnet18"}},
                          "quantize": {{"variants": [{{"name": "ptq", "method": "static"}}]}}}})
        store = open_store({(tmp_path / "store").as_uri()!r})
        plan = build_plan(spec, prepare_sources(spec, store))
        assert spec_digest(spec) and plan, plan
        heavy = sorted(m for m in sys.modules if m.startswith(("pipeline.stages.", "pipeline.quant", "pipeline.train",
                                                               "pipeline.data", "pipeline.runtimes", "pipeline.models",
                                                               "pipeline.engine", "pipeline.runner")))
        heavy = [m for m in heavy if m not in ("pipeline.stages.table", "pipeline.stages.configs")]
        print("planned", len(plan), "nodes; imported:", heavy)
        sys.exit(1 if heavy else 0)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "planned" in done.stdout and "imported: []" in done.stdout, done.stdout
