"""Wall-time and peak-memory overhead of detlens's callbacks on the demo training run.

Fits the demo config twice — once with every callback in it, once with the detlens
callbacks removed (Lightning's own callbacks stay) — each in a fresh subprocess so that
peak RSS is measured per run, and prints the overhead as a percentage of wall time::

    python benchmarks/callback_overhead.py                      # the full demo config, 2 pairs
    python benchmarks/callback_overhead.py --repeats 3          # steadier on a noisy machine
    python benchmarks/callback_overhead.py --max-epochs 1       # quicker, same cadence rules
    python benchmarks/callback_overhead.py --cadence config     # the config's cadence, not the callbacks' defaults
    python benchmarks/callback_overhead.py --media-thread-niceness 0 10   # media worker priority, compared
    python benchmarks/callback_overhead.py --media-worker process thread  # media process vs media thread
    python benchmarks/callback_overhead.py --media-worker process thread --torch-threads 1  # cores to spare

Both runs use the same seed and data; W&B runs offline into a temporary folder. The
figure includes everything the callbacks cost: explaining, rendering and logging media.

On a shared 2-core machine one fit's wall time varies by ±10% from run to run (the same fit
took 83-120 s within an hour), more than the overhead being measured, so two figures are
printed. ``callback overhead counted inside the fits`` is what detlens' own work costs (see
:func:`_in_fit_overhead`): the training thread's time in detlens hooks, the difference in
the time outside the loop's iterations, and for the iterations in which detlens worked
outside its hooks (a media build beside them, or reading their forward) how much slower they
were than their neighbours, against the same iterations of the fit without callbacks; the
same count between two fits without callbacks shows what noise alone gives. It counts the
iterations in which detlens ran nothing as free; the median time of those, with / without
callbacks, and of the last training epoch's over the first's, are printed to show where that
fails, and so are the training thread's voluntary context switches per training iteration
in the first and last epochs (Linux): how often it went to sleep. They rose from ~15 to ~850
when torch ops on detlens' media thread opened an OpenMP team of their own and libgomp
stopped spin-waiting at the barriers of training's (``detlens.sinks.fanout._one_openmp_thread``).
``callback overhead by the fits' wall times`` compares the fits directly (they alternate:
without, with, with, without, ...; medians and back-to-back pairs). CPU time (the fit
process, its data workers and detlens' media process) is printed too. Peak RSS is the fit
process's; detlens' media process's is printed beside it.

Where the time goes, per variant: the fit's phases (startup, the training loop, what
follows it: the media drain at teardown and ``wandb.finish``), the training batches and
validation steps inside the loop, and the training thread's time inside each detlens
callback's hooks (Lightning's ``SimpleProfiler``, extended to keep when each hook, batch and
step ran: :class:`TimelineProfiler`), and Python's garbage collections in the training loop
(the one cost that could fall into the iterations detlens runs nothing in).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import statistics
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.profilers import SimpleProfiler

REPO = Path(__file__).resolve().parents[1]
DETLENS_CALLBACKS = (
    "PredictionOverlayCallback", "GradCAMCallback", "AttentionMapCallback", "AttentionEntropyCallback",
    "BoxEmbeddingCallback", "FocusRegressionCallback",
)


class PhaseTimer(pl.Callback):
    """Added to both variants (``callback_overhead.PhaseTimer``): when the training loop starts and ends."""

    marks: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        PhaseTimer.marks["train_start"] = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        PhaseTimer.marks["train_end"] = time.perf_counter()


def _detlens_hook(action: str) -> bool:
    return action.startswith("[Callback]") and action[len("[Callback]"):].startswith(DETLENS_CALLBACKS)


def _step_kind(action: str) -> str | None:
    if action == "run_training_batch":
        return "train"
    if action.startswith("[Strategy]") and action.endswith(".validation_step"):
        return "val"
    return None


class TimelineProfiler(SimpleProfiler):
    """Lightning's ``SimpleProfiler`` (``callback_overhead.TimelineProfiler``, both variants) that
    also keeps when each training batch, validation step and detlens hook started and ended."""

    timeline: list[tuple[str, float, float]] = []
    switches: dict[float, int] = {}  # a training batch's start -> the training thread's voluntary context switches

    def start(self, action_name: str) -> None:
        super().start(action_name)
        if action_name == "run_training_batch" and (n := _voluntary_switches()) is not None:
            TimelineProfiler.switches[self.current_actions[action_name]] = n

    def stop(self, action_name: str) -> None:
        start = self.current_actions.get(action_name)
        super().stop(action_name)
        if start is not None and (_step_kind(action_name) or _detlens_hook(action_name)):
            TimelineProfiler.timeline.append((action_name, start, start + self.recorded_durations[action_name][-1]))


def _voluntary_switches() -> int | None:
    """The calling thread's voluntary context switches so far (Linux): how often it went to
    sleep, e.g. at the barriers of its OpenMP regions once libgomp stops spin-waiting there."""
    try:
        with open("/proc/thread-self/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt_switches:")), None)
    except OSError:
        return None


def _iterations(
    timeline: list[tuple[str, float, float]], builds: list[tuple[float, float]], arms: list[float],
    switches: dict[float, int] | None = None,
) -> list[dict]:
    """The fit's loop iterations: from one training batch (or validation step) to the next of the
    same loop run, each with its time less the detlens hooks inside it (``net_s``) and whether
    detlens worked during it outside its hooks (``detlens``): a media build ran, or detlens read
    the iteration's forward (an observer or attention monitor armed before its step, ``arms``).
    The last iteration of each loop run is left out (what follows it is the loop's end, not an
    iteration). Training iterations also get the training thread's voluntary context switches
    during them (``switches``) where ``switches`` has both ends."""
    steps = sorted((start, kind) for action, start, _ in timeline if (kind := _step_kind(action)))
    hooks = [(start, end) for action, start, end in timeline if _detlens_hook(action)]
    read = {min((s for s, _ in steps if s > t), default=None) for t in arms}  # the step each arming read
    out, segment = [], 0
    for (start, kind), (following, next_kind) in zip(steps, steps[1:]):
        if next_kind != kind:
            segment += 1
            continue
        in_hooks = sum(max(0.0, min(end, following) - max(begin, start)) for begin, end in hooks)
        out.append({"kind": kind, "segment": segment, "net_s": following - start - in_hooks,
                    "detlens": start in read or any(begin < following and end > start for begin, end in builds)})
        if switches and start in switches and following in switches:
            out[-1]["switches"] = switches[following] - switches[start]
    return out


def _gc_in_loop(collections: list[tuple[int, float, float]], marks: dict[str, float]) -> dict[str, float]:
    """Python's garbage collections during the training loop (any thread): count and seconds,
    all generations and the full (generation 2) ones. The one cost of the callbacks that can
    fall into iterations in which detlens runs nothing: its imports and objects make every full
    collection longer, whichever thread triggers it."""
    inside = [(g, b, e) for g, b, e in collections if marks["train_start"] <= b <= marks["train_end"]]
    return {"n": len(inside), "s": sum(e - b for _, b, e in inside),
            "full_n": sum(g == 2 for g, _, _ in inside), "full_s": sum(e - b for g, b, e in inside if g == 2)}


CADENCE_ARGS = ("every_n_epochs", "every_n_steps", "every_n_train_steps")


def _default_cadence(config: dict) -> list[str]:
    """Puts every detlens callback of ``config`` back on its default cadence (issue 7 measures
    the callbacks "at their default cadence"; the demo config logs some more often, to draw
    curves in a 100-step run): each cadence argument that differs from the class's default
    is removed. Returns what was changed, e.g. ``AttentionEntropyCallback.every_n_train_steps 10 -> 50``."""
    changed = []
    for callback in config["trainer"].get("callbacks") or []:
        if not callback["class_path"].startswith("detlens."):
            continue
        module, name = callback["class_path"].rsplit(".", 1)
        defaults = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        init_args = callback.get("init_args") or {}
        for arg in CADENCE_ARGS:
            if arg in init_args and arg in defaults and init_args[arg] != defaults[arg].default:
                changed.append(f"{name}.{arg} {init_args.pop(arg)} -> {defaults[arg].default}")
    return changed


def _strip_detlens_callbacks(config: dict) -> dict:
    callbacks = config["trainer"].get("callbacks") or []
    config["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].startswith("detlens.")]
    return config


def _child(config_path: str, out_path: str, niceness: str, worker: str) -> None:
    """Runs one fit in this process and writes its wall time and peak RSS as JSON."""
    import wandb

    from detlens.cli import build_cli
    from detlens.sinks import fanout, media_process

    if niceness != "default":
        fanout.MEDIA_THREAD_NICENESS = int(niceness)
    fanout.MEDIA_PROCESS = {"process": "on", "thread": "off"}.get(worker, "auto")

    def cpu_s() -> float:  # this process and its reaped children (the DataLoader workers)
        return sum(
            getattr(resource.getrusage(who), field)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for field in ("ru_utime", "ru_stime")
        )

    from detlens.adapters.observe import ForwardObserver
    from detlens.explainers.attention import EntropyMonitor
    from detlens.sinks.fanout import media_thread_cpu_seconds, media_thread_seconds

    builds: list[tuple[float, float]] = []  # when the media (or drain) thread built a payload
    build_timed = fanout._build_timed

    def recorded(fn, arg):  # type: ignore[no-untyped-def]
        begin = time.perf_counter()
        try:
            return build_timed(fn, arg)
        finally:
            builds.append((begin, time.perf_counter()))

    fanout._build_timed = recorded
    # detlens' media process: a job's build ends about when its answer is read (the worker reports
    # how long it ran), and the worker's start-up (its imports) runs until its first answer.
    spawned: list[float] = []
    ensure_started = media_process.MediaProcess._ensure_started

    def started(self):  # type: ignore[no-untyped-def]
        before = self.starts
        proc = ensure_started(self)
        if self.starts != before:
            spawned.append(time.perf_counter())
        return proc

    settle, answered = media_process._settle, [0.0]

    def settled(future, value=None, error=None):  # type: ignore[no-untyped-def]
        process = fanout._process
        if process is not None and process.seconds > answered[0]:
            now = time.perf_counter()
            begin, answered[0] = now - (process.seconds - answered[0]), process.seconds
            builds.append((min([begin, *spawned]), now))
            spawned.clear()
        return settle(future, value, error)

    media_process.MediaProcess._ensure_started = started
    media_process._settle = settled
    arms: list[float] = []  # when detlens armed a reader of the next forward (inside the iterations)
    for owner, method in ((ForwardObserver, "__enter__"), (EntropyMonitor, "arm")):

        def timed(self, *a, _original=getattr(owner, method), **k):  # type: ignore[no-untyped-def]
            arms.append(time.perf_counter())
            return _original(self, *a, **k)

        setattr(owner, method, timed)
    collections: list[tuple[int, float, float]] = []  # Python's garbage collector: generation, start, end
    collecting: dict[int, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            collecting[threading.get_ident()] = time.perf_counter()
        elif threading.get_ident() in collecting:
            collections.append((info["generation"], collecting.pop(threading.get_ident()), time.perf_counter()))

    gc.callbacks.append(on_gc)
    start, cpu_start = time.perf_counter(), cpu_s()
    cli = build_cli(["fit", "--config", config_path])
    if wandb.run is not None:
        wandb.finish()
    media_process_peak_mib = 0.0
    if fanout._process is not None and fanout._process.pid is not None:  # its peak memory, then reap it (CPU time)
        status = Path(f"/proc/{fanout._process.pid}/status")
        if status.exists():
            line = next(l for l in status.read_text().splitlines() if l.startswith("VmHWM:"))
            media_process_peak_mib = int(line.split()[1]) / 1024
        fanout._process.close()
    end = time.perf_counter()
    wall, cpu = end - start, cpu_s() - cpu_start
    module = importlib.import_module("callback_overhead")  # the module jsonargparse imported, not __main__
    marks = module.PhaseTimer.marks
    phases = {
        "startup": marks["train_start"] - start,  # imports, data, W&B run, probe sets
        "training loop": marks["train_end"] - marks["train_start"],  # steps, validation, logging events
        "after training": end - marks["train_end"],  # media drain at teardown, wandb.finish
    }
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    # Lightning's SimpleProfiler times every callback hook as "[Callback]<state_key>.<hook>";
    # detlens' state keys start with the class name.
    durations = cli.trainer.profiler.recorded_durations
    per_callback: dict[str, float] = {}
    per_hook: dict[str, float] = {}  # e.g. "teardown": the media drain at the end of the fit
    for action, times in durations.items():
        name = action[len("[Callback]"):] if action.startswith("[Callback]") else ""
        owner = next((c for c in DETLENS_CALLBACKS if name.startswith(c)), None)
        if owner is not None:
            per_callback[owner] = per_callback.get(owner, 0.0) + sum(times)
            hook = name.rsplit(".", 1)[-1]
            per_hook[hook] = per_hook.get(hook, 0.0) + sum(times)
    hooks_s = sum(per_callback.values())
    batches_s = {  # the same work in both variants: slower with callbacks = cores (and GIL) shared with the media worker
        "training batches": sum(durations.get("run_training_batch", [])),
        "validation steps": sum(sum(t) for a, t in durations.items() if a.endswith(".validation_step")),
    }
    Path(out_path).write_text(
        json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak_kib / 1024,
                    "media_process_peak_rss_mib": media_process_peak_mib, "metrics": metrics,
                    "hooks_s": hooks_s, "hooks_by_callback_s": per_callback, "hooks_by_hook_s": per_hook,
                    "media_thread_s": media_thread_seconds(), "media_thread_cpu_s": media_thread_cpu_seconds(),
                    "phases_s": phases, "batches_s": batches_s,
                    "iterations": _iterations(module.TimelineProfiler.timeline, builds, arms,
                                              module.TimelineProfiler.switches),
                    "gc": _gc_in_loop(collections, marks)})
    )


NEIGHBOURS = 10  # the nearest iterations detlens did nothing in that make an iteration's local baseline


def _in_fit_overhead(with_run: dict, without_run: dict, flags: list[bool] | None = None) -> dict[str, float] | None:
    """The overhead of one pair of fits, counted from what happens inside them, not from their
    wall times alone (which vary by more than the overhead from fit to fit on a shared machine):

    * the training thread's time in detlens hooks (Lightning's profiler), plus
    * the difference in the time outside the loop's iterations (start-up, epoch ends,
      teardown; hooks taken out; a few seconds, so the machine's speed moves it little), plus
    * for each iteration in which detlens worked outside its hooks (a media build, or reading
      the forward): how much longer it took than the nearby iterations of the same loop run in
      which detlens did nothing, less the same difference at the same iterations of the fit
      without callbacks (difference in differences: slow spells of the machine longer than a
      few iterations cancel, and so does whatever makes those iterations slow in both fits).

    The iterations in which detlens did nothing count as costing nothing: ``speed_ratio``, their
    median time with / without, shows how far the machine's speed differed between the fits.
    ``flags`` (default: the with-fit's own): which iterations to count as detlens', for the same
    count between two fits without callbacks (noise alone). None when the fits ran different
    iterations."""
    w, b = with_run["iterations"], without_run["iterations"]
    if len(w) != len(b) or any(
        x["kind"] != y["kind"] or x["segment"] != y["segment"] for x, y in zip(w, b)
    ):
        return None
    flags = [it["detlens"] for it in w] if flags is None else flags
    if len(flags) != len(w):
        return None

    def excess(run: list[dict], i: int, nearest: list[int]) -> float:
        return run[i]["net_s"] - statistics.median(run[j]["net_s"] for j in nearest) if nearest else 0.0

    worked = [i for i in range(len(w)) if flags[i]]
    in_iterations = 0.0
    for i in worked:  # the same neighbours in both fits (their iterations match)
        quiet = [j for j, it in enumerate(w) if not flags[j] and it["segment"] == w[i]["segment"]]
        nearest = sorted(quiet, key=lambda j: abs(j - i))[:NEIGHBOURS]
        in_iterations += excess(w, i, nearest) - excess(b, i, nearest)
    rest_with = with_run["wall_s"] - with_run["hooks_s"] - sum(it["net_s"] for it in w)
    rest_without = without_run["wall_s"] - without_run["hooks_s"] - sum(it["net_s"] for it in b)
    quiet = [i for i in range(len(w)) if not flags[i]]
    estimate = with_run["hooks_s"] + (rest_with - rest_without) + in_iterations
    return {
        "estimate_s": estimate, "percent": 100.0 * estimate / without_run["wall_s"], "hooks_s": with_run["hooks_s"],
        "rest_s": rest_with - rest_without, "in_iterations_s": in_iterations, "worked": len(worked),
        "iterations": len(w),
        "speed_ratio": statistics.median(w[i]["net_s"] / b[i]["net_s"] for i in quiet) if quiet else float("nan"),
    }


def _first_and_last_epoch(run: dict, field: str) -> tuple[float, float] | None:
    """The median ``field`` of the training iterations detlens did not work in, in the first
    training epoch (before any logging event) and in the last; None with fewer than two
    epochs, or without ``field``."""
    train = [it for it in run["iterations"] if it["kind"] == "train" and not it["detlens"] and field in it]
    segments = sorted({it["segment"] for it in train})
    if len(segments) < 2:
        return None
    first, last = (statistics.median(it[field] for it in train if it["segment"] == s) for s in (segments[0], segments[-1]))
    return first, last


def _later_over_first(run: dict) -> float | None:
    """The median time of the last training epoch's iterations detlens did not work in over the
    first's (the first has had no logging event yet): above the fits without callbacks' ratio,
    something the callbacks leave behind slows the training steps that the count cannot see."""
    medians = _first_and_last_epoch(run, "net_s")
    return None if medians is None else medians[1] / medians[0]


def _run_variant(name: str, config: dict, niceness: str, worker: str, workdir: Path, torch_threads: int | None) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in name)
    config_path = workdir / f"{slug}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out_path = workdir / f"{slug}.json"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    if torch_threads:  # training's intra-op threads; the cores left over are what an accelerator node has spare
        env["OMP_NUM_THREADS"] = str(torch_threads)
    print(f"[{name}] fitting {config_path.name} ...", flush=True)
    subprocess.run(
        [sys.executable, __file__, "--child", str(config_path), str(out_path), niceness, worker], cwd=workdir, env=env,
        check=True,
    )
    return json.loads(out_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "fasterrcnn_synthetic.yaml"))
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--repeats", type=int, default=2, help="fits per variant (alternating order)")
    parser.add_argument(
        "--media-thread-niceness", type=int, nargs="+", default=None, metavar="N",
        help="run the with-callbacks fit once per value of detlens.sinks.fanout.MEDIA_THREAD_NICENESS "
             "(default: the library's own), alternating with the fit without callbacks",
    )
    parser.add_argument(
        "--media-worker", nargs="+", choices=("auto", "process", "thread"), default=["auto"],
        help="where detlens builds W&B media: its media process, a thread of the training process, or the "
             "library's default (auto: the thread for CPU training; detlens.sinks.fanout.MEDIA_PROCESS); "
             "several values: one with-callbacks variant each",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, metavar="N",
        help="intra-op threads of the training (OMP_NUM_THREADS; default: torch's own, every core): with fewer "
             "than the cores, the fits look like accelerator training, where detlens' media worker has cores spare",
    )
    parser.add_argument(
        "--cadence", choices=("default", "config"), default="default",
        help="default: every detlens callback at its default cadence (what issue 7 measures; the demo config "
             "logs the attention entropy every 10 steps instead of 50); config: the cadence the config sets",
    )
    parser.add_argument("--save-runs", metavar="JSON", help="also write every fit's measurements (iterations included) to JSON")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    config = yaml.safe_load(Path(args.config).read_text())
    trainer = config["trainer"]
    trainer.update(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    if args.max_epochs is not None:
        trainer["max_epochs"] = args.max_epochs
    detlens_callbacks = [c["class_path"] for c in trainer.get("callbacks") or [] if c["class_path"].startswith("detlens.")]
    cadence_changes = _default_cadence(config) if args.cadence == "default" else []
    with tempfile.TemporaryDirectory(prefix="detlens-overhead-") as tmp:
        workdir = Path(tmp)
        data_root = config["data"]["init_args"].get("root")
        if data_root and not Path(data_root).is_absolute():  # share one generated dataset
            config["data"]["init_args"]["root"] = str((REPO / data_root).resolve())
        trainer["logger"]["init_args"]["save_dir"] = str(workdir)
        # Both variants: per-hook timings (a few microseconds per hook), written to a file, not printed.
        trainer["profiler"] = {"class_path": "callback_overhead.TimelineProfiler",
                               "init_args": {"dirpath": str(workdir), "filename": "hooks"}}
        trainer["callbacks"] = [{"class_path": "callback_overhead.PhaseTimer"}] + (trainer.get("callbacks") or [])
        variants = {"without": (_strip_detlens_callbacks(json.loads(json.dumps(config))), "default", "auto")}
        nicenesses = [str(n) for n in args.media_thread_niceness] if args.media_thread_niceness else ["default"]
        for worker in args.media_worker:
            for nice in nicenesses:
                parts = ([] if len(args.media_worker) == 1 else [f"media {worker}"]) + (
                    [] if nice == "default" else [f"media nice {nice}"])
                variants["with" + (f" ({', '.join(parts)})" if parts else "")] = (config, nice, worker)
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for i in range(args.repeats):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in order:
                runs[name].append(_run_variant(name, *variants[name], workdir, args.torch_threads))

    if args.save_runs:
        Path(args.save_runs).write_text(json.dumps(runs))

    def median(name: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[name])

    base_wall, base_cpu = median("without", "wall_s"), median("without", "cpu_s")
    base_rss = max(r["peak_rss_mib"] for r in runs["without"])
    threads = f", training on {args.torch_threads} torch thread(s)" if args.torch_threads else ""
    print(f"config: {args.config} (max_epochs={trainer['max_epochs']}), {args.repeats} fits per variant, alternating{threads}")
    print(f"detlens callbacks: {', '.join(c.rsplit('.', 1)[1] for c in detlens_callbacks)}")
    print("cadence: " + ("the config's" if args.cadence == "config" else "each callback's default" + (
        f" ({', '.join(cadence_changes)})" if cadence_changes else ", as in the config")))
    for name in runs:
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs[name])
        print(f"wall time {name} callbacks: {walls} s (median {median(name, 'wall_s'):.1f} s); CPU median {median(name, 'cpu_s'):.1f} s")
        phases = {p: statistics.median(r["phases_s"][p] for r in runs[name]) for p in runs[name][0]["phases_s"]}
        print("  " + ", ".join(f"{p} {t:.1f} s" for p, t in phases.items()) + "; of the loop: " + ", ".join(
            f"{p} {statistics.median(r['batches_s'][p] for r in runs[name]):.1f} s" for p in runs[name][0]["batches_s"]
        ))
    for name in (n for n in runs if n != "without"):
        label = "" if name == "with" else f" [{name}]"
        full_wall, full_cpu = median(name, "wall_s"), median(name, "cpu_s")
        full_rss = max(r["peak_rss_mib"] for r in runs[name])
        in_fit = [_in_fit_overhead(w, b) for w, b in zip(runs[name], runs["without"])]
        if all(in_fit):
            print(f"callback overhead{label} counted inside the fits (what detlens' own work costs; see 'not counted'): "
                  f"{statistics.median(e['percent'] for e in in_fit):.1f}% of wall time (median of {len(in_fit)} pairs: "
                  + ", ".join(f"{e['percent']:.1f}%" for e in in_fit) + ")")
            for e in in_fit:
                print(f"  {e['estimate_s']:.2f} s = detlens hooks {e['hooks_s']:.2f} s + outside the loop's iterations "
                      f"{e['rest_s']:+.2f} s + the {e['worked']} of {e['iterations']} iterations detlens worked in "
                      f"{e['in_iterations_s']:+.2f} s")
            without = runs["without"]
            placebo = [  # the same count between two fits without callbacks: what noise alone gives
                _in_fit_overhead(without[j], without[i], [it["detlens"] for it in runs[name][j]["iterations"]])
                for i in range(len(without)) for j in range(i + 1, len(without))
            ]
            if placebo and all(placebo):
                print("  the same count between two fits without callbacks (noise alone): " + ", ".join(
                    f"{e['percent']:+.1f}%" for e in placebo))
            ratios = [e["speed_ratio"] for e in in_fit]
            print("  not counted: the iterations detlens did not work in, median time with / without callbacks "
                  + ", ".join(f"{r:.3f}" for r in ratios) + f" (median {statistics.median(ratios):.3f})"
                  + ("; between fits without callbacks " + ", ".join(f"{e['speed_ratio']:.3f}" for e in placebo)
                     if placebo and all(placebo) else ""))
            later = {v: [_later_over_first(r) for r in runs[v]] for v in (name, "without")}
            if all(x is not None for x in later[name] + later["without"]):
                print("  the same iterations, the last training epoch's median over the first's (before any logging event): "
                      f"with callbacks {', '.join(f'{x:.3f}' for x in later[name])} (median {statistics.median(later[name]):.3f}), "
                      f"without {', '.join(f'{x:.3f}' for x in later['without'])} (median {statistics.median(later['without']):.3f})")
            # the training thread's voluntary context switches per iteration (Linux)
            slept = {v: [_first_and_last_epoch(r, "switches") for r in runs[v]] for v in (name, "without")}
            if all(x is not None for x in slept[name] + slept["without"]):
                print("  the training thread's voluntary context switches per training iteration (median), first training "
                      "epoch -> last: " + "; ".join(
                          f"{'with callbacks' if v == name else 'without'} " + ", ".join(f"{a:.0f} -> {b:.0f}" for a, b in slept[v])
                          for v in (name, "without")))
        else:
            print(f"callback overhead{label}: {100.0 * (full_wall - base_wall) / base_wall:.1f}% of wall time "
                  "(medians of the fits' wall times; not counted inside the fits: they ran different iterations)")
        print(f"callback overhead{label} by the fits' wall times: {100.0 * (full_wall - base_wall) / base_wall:+.1f}% "
              f"(medians; CPU time {100.0 * (full_cpu - base_cpu) / base_cpu:+.1f}%)")
        # The machine's speed drifts over minutes: each repeat's two fits ran back to back.
        paired = [100.0 * (w["wall_s"] - b["wall_s"]) / b["wall_s"] for w, b in zip(runs[name], runs["without"])]
        print("  paired, each fit with callbacks against the fit without next to it: "
              + ", ".join(f"{p:+.1f}%" for p in paired) + f" (median {statistics.median(paired):+.1f}%)")
        gc_with, gc_without = ({k: statistics.median(r["gc"][k] for r in runs[v]) for k in ("n", "s", "full_n", "full_s")}
                               for v in (name, "without"))
        print(f"Python's garbage collector in the training loop: with callbacks {gc_with['s']:.2f} s "
              f"({gc_with['n']:.0f} collections, {gc_with['full_n']:.0f} full: {gc_with['full_s']:.2f} s), "
              f"without {gc_without['s']:.2f} s ({gc_without['n']:.0f}, {gc_without['full_n']:.0f} full: "
              f"{gc_without['full_s']:.2f} s) (medians)")
        print(f"training thread inside detlens hooks: median {median(name, 'hooks_s'):.1f} s per fit "
              f"({100.0 * median(name, 'hooks_s') / base_wall:.1f}% of the fit without callbacks); "
              f"media worker building W&B media: {median(name, 'media_thread_s'):.1f} s per fit"
              + (f" ({median(name, 'media_thread_cpu_s'):.1f} s of CPU on the media thread)"
                 if median(name, 'media_thread_cpu_s') > 0 else ""))
        by_callback = {
            c: statistics.median(r["hooks_by_callback_s"].get(c, 0.0) for r in runs[name]) for c in DETLENS_CALLBACKS
        }
        print("  of which: " + ", ".join(
            f"{c.removesuffix('Callback')} {t:.1f} s" for c, t in sorted(by_callback.items(), key=lambda kv: -kv[1]) if t
        ))
        hooks = {h for r in runs[name] for h in r["hooks_by_hook_s"]}
        by_hook = {h: statistics.median(r["hooks_by_hook_s"].get(h, 0.0) for r in runs[name]) for h in hooks}
        print("  by hook: " + ", ".join(
            f"{h} {t:.1f} s" for h, t in sorted(by_hook.items(), key=lambda kv: -kv[1]) if t >= 0.05
        ))
        media_rss = max(r.get("media_process_peak_rss_mib", 0.0) for r in runs[name])
        print(f"peak RSS without: {base_rss:.0f} MiB   with: {full_rss:.0f} MiB   overhead: {full_rss - base_rss:+.0f} MiB"
              + (f"   (+ detlens' media process: peak {media_rss:.0f} MiB)" if media_rss else ""))
        print(f"val/mAP_50 without: {runs['without'][0]['metrics'].get('val/mAP_50', float('nan')):.3f}   "
              f"with: {runs[name][0]['metrics'].get('val/mAP_50', float('nan')):.3f}")


if __name__ == "__main__":
    main()
