"""Cost of the box-embedding table in W&B: wandb's own ``wandb.Table`` against detlens's.

The table has one row per detection with the raw embedding (a list of floats, for the
W&B projector). wandb turns every value of it into types and JSON in Python, twice:
typing each row when it is added (on detlens' media worker) and converting each cell
when ``wandb.log`` logs it (on the training thread). ``detlens.sinks.wandb_payload.wandb_table``
types a run of alike rows once and lets cells that already are JSON skip the conversion;
both tables are logged into one offline run, and the run's table files are checked equal::

    python benchmarks/wandb_table.py                       # 2,000 rows x 256 floats
    python benchmarks/wandb_table.py --rows 10000 --dim 1024
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=256, help="embedding length (the demo's box head: 256)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    from detlens.sinks.wandb_payload import wandb_table

    rng = np.random.default_rng(0)
    features = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    columns = ["class", "label", "score", "status", "fp_kind", "image_id", "probe_index", "box", "x", "y", "embedding"]
    rows = [
        ["square", 1, round(float(s), 4), "TP", "", i // 10, i // 10, [10.0, 12.5, 40.0, 44.25], float(x), float(y),
         features[i].tolist()]
        for i, (s, x, y) in enumerate(rng.random((args.rows, 3)))
    ]
    with tempfile.TemporaryDirectory(prefix="detlens-table-") as tmp:
        run = wandb.init(project="detlens-bench", dir=tmp)
        times = {}
        for key, make in (("wandb", lambda: wandb.Table(columns=columns, data=rows)),
                          ("detlens", lambda: wandb_table(columns, rows))):
            start = time.perf_counter()
            table = make()
            built = time.perf_counter() - start
            table = pickle.loads(pickle.dumps(table))  # as it comes back from detlens' media process
            start = time.perf_counter()
            run.log({key: table})
            times[key] = (built, time.perf_counter() - start)
        run_dir = Path(run.dir).parent
        run.finish()
        # What W&B keeps: the run's copy of each table, and the table artifact's JSON.
        copies = {p.name.split("_")[0]: json.loads(p.read_text()) for p in run_dir.glob("files/media/table/*.table.json")}
        artifact_json = {  # of tables not bound to the run (a bound table's JSON names its run file)
            key: json.dumps(make().to_json(wandb.Artifact(key, "run_table")), sort_keys=True)
            for key, make in (("wandb", lambda: wandb.Table(columns=columns, data=rows)),
                              ("detlens", lambda: wandb_table(columns, rows)))
        }
    same = copies.get("wandb") == copies.get("detlens") is not None and artifact_json["wandb"] == artifact_json["detlens"]
    print(f"{args.rows:,} rows, embedding of {args.dim} floats")
    for key, (built, logged) in times.items():
        name = {"wandb": "wandb.Table", "detlens": "detlens wandb_table"}[key]
        print(f"{name:20s} build (media worker) {built:6.2f} s   wandb.log (training thread) {logged:6.2f} s")
    (wb_build, wb_log), (dl_build, dl_log) = times["wandb"], times["detlens"]
    print(f"build {wb_build / max(dl_build, 1e-9):.1f}x faster, log {wb_log / dl_log:.1f}x faster; "
          f"the tables W&B keeps (run copy, artifact JSON) are {'identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
