"""`onnxdfq sweep`: models x methods x widths, each quantization and each evaluation shard a Ray task.

The pure parts need no Ray and are tested directly: `expand_grid` (the configs, and the invalid
combinations with the reason `make_config` gives), `shard_ranges` (evaluation shards aligned to the
batch size, so a shard runs exactly the batches a whole `evaluate` would) and `combine_shards` (sums
the correct counts: the combined top-1 is the whole run's, not an average of percentages). The
tables and the HTML page are `onnxdfq.sweep_report`'s.

`run_sweep` imports Ray (the optional ``[sweep]`` extra) and runs the tasks on a local Ray
(``ray.init()``) or a cluster (``address``). Each finished config is written to DIR/results.json at
once, so a cut-off sweep resumes where it stopped; a config whose quantization or evaluation raises
becomes a row with its error. MODEL, --data and DIR are read (and DIR written) by the tasks at the
same paths, so on a multi-machine cluster they must sit on a shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from onnxdfq.config import GRANULARITIES, METHODS, make_config
from onnxdfq.errors import OnnxDfqError, OptionError
from onnxdfq.graph.io import write_text_atomic
from onnxdfq.quant.scheme import parse_act_bits, parse_bits

__all__ = ["SweepConfig", "ShardCounts", "EvalSpec", "expand_grid", "shard_ranges", "combine_shards", "load_results",
           "write_results", "run_sweep", "check_preprocessing", "RAY_MISSING"]

logger = logging.getLogger(__name__)

RAY_MISSING = 'onnxdfq sweep needs Ray: pip install -e ".[sweep]" (or pip install "onnxdfq[sweep]")'
DEFAULT_SHARD = 1000  # samples per evaluation task (rounded up to a multiple of the batch size)
RESULTS_JSON = "results.json"


@dataclass(frozen=True)
class SweepConfig:
    """One row of the sweep: a model file and the keywords `quantize_model` gets."""

    model: str  # path of the FP32 .onnx
    method: str
    bits: str  # "8", or "LOW/HIGH" for dfmpc
    act_bits: str  # "8", "none", ...
    granularity: str  # "channel" or "tensor"
    options: tuple[tuple[str, Any], ...] = ()  # further quantize_model keywords, e.g. (("bias_correction", False),)

    @property
    def name(self) -> str:
        return Path(self.model).stem

    @property
    def _suffix(self) -> str:
        return "".join(f" {'+' if value else '-'}{key}" if isinstance(value, bool) else f" {key}={value}"
                       for key, value in self.options)

    @property
    def key(self) -> str:
        """The row's identity in results.json (what a resumed sweep matches on)."""
        return f"{self.name} {self.method}{self._suffix} W{self.bits}A{self.act_bits} {self.granularity}"

    @property
    def file_name(self) -> str:
        extra = "".join(c if c.isalnum() or c in "+-=_." else "_" for c in self._suffix.replace(" ", "."))
        return (f"{self.name}.{self.method}{extra}.w{self.bits.replace('/', '-')}a{self.act_bits}."
                f"{self.granularity}.onnx")


@dataclass(frozen=True)
class ShardCounts:
    """What one evaluation shard found: exact counts, never percentages."""

    correct1: int
    correct5: int
    count: int


def expand_grid(models: Sequence[str], methods: Sequence[str], bits: Sequence[str], act_bits: Sequence[str],
                granularities: Sequence[str] = ("channel",), budgets: Sequence[tuple[str, float]] = (),
                act_budgets: Sequence[float] = ()) -> tuple[list[SweepConfig], list[tuple[str, str]]]:
    """Every valid config of the grid, in grid order, and the skipped combinations with the reason.

    Validity is `onnxdfq.config.make_config`'s (dfmpc needs LOW/HIGH, the others a single width, ...);
    the same combination given twice is one config. Two models with the same file stem are refused
    (rows and files are named by it). ``budgets`` ((``avg_bits`` | ``size_budget``, value) pairs) expand the
    width ``auto``: one config per budget. ``act_budgets`` (``--avg-act-bits`` values) expand every config with
    quantized activations: one per value.
    """
    stems: dict[str, str] = {}
    for model in models:
        other = stems.setdefault(Path(model).stem, str(model))
        if other != str(model):
            raise OptionError(f"two models named {Path(model).stem!r} ({other}, {model}); rename one")
    _check_axes(methods, bits, act_bits, granularities)
    if any(str(b).strip().lower() == "auto" for b in bits) and not budgets:
        raise OptionError("--bits auto needs budgets: --avg-bits B[,B...] and/or --size-budget F[,F...]")
    configs: dict[str, SweepConfig] = {}
    skipped: list[tuple[str, str]] = []
    for model in models:
        for method in methods:
            for width in bits:
                auto = str(width).strip().lower() == "auto"
                for weight_options in ([((key, value),) for key, value in budgets] if auto else [()]):
                    for act, options in _act_axis(act_bits, act_budgets, weight_options):
                        for granularity in granularities:
                            config = SweepConfig(str(model), method, "auto" if auto else str(width), str(act).lower(),
                                                 granularity, options)
                            try:
                                make_config(method, config.bits, config.act_bits, granularity, **dict(options))
                            except OptionError as exc:
                                skipped.append((config.key, str(exc)))
                                continue
                            configs.setdefault(config.key, config)
    return list(configs.values()), skipped


def _act_axis(act_bits: Sequence[str], act_budgets: Sequence[float], options: tuple
              ) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """(activation width, options) pairs: each quantized width once per --avg-act-bits value, if any are given."""
    pairs = []
    for act in act_bits:
        quantized = str(act).strip().lower() != "none"
        extras = [(("avg_act_bits", value),) for value in act_budgets] if act_budgets and quantized else [()]
        pairs.extend((act, options + extra) for extra in extras)
    return pairs


def _check_axes(methods: Sequence[str], bits: Sequence[str], act_bits: Sequence[str],
                granularities: Sequence[str]) -> None:
    """Every value of every axis must mean something on its own: a typo (squnt, 9 bits) is an OptionError
    before any work, as in quantize; only combinations that do not fit together are skipped."""
    for method in methods:
        if method not in METHODS:
            raise OptionError(f"--method {method!r}: unknown method; choose from {', '.join(sorted(METHODS))}")
    bits = [b for b in bits if str(b).strip().lower() != "auto"]
    for values, check, flag in ((bits, parse_bits, "--bits"), (act_bits, parse_act_bits, "--act-bits")):
        for value in values:
            try:
                check(value)
            except ValueError as exc:
                raise OptionError(f"{flag} {value}: {exc}") from None
    for granularity in granularities:
        if str(granularity).removeprefix("per-") not in GRANULARITIES:
            raise OptionError(f"--granularity {granularity!r}: choose channel or tensor")


def check_preprocessing(specs: Mapping[str, EvalSpec], models: Mapping[str, str]) -> None:
    """Raw images need each model's preprocessing (the spec's mean/std or the model's metadata): refused before
    any work, never guessed (a sweep scored in the wrong input space is a table of plausible wrong numbers)."""
    from onnxdfq.eval.data import open_dataset
    from onnxdfq.graph.io import read_metadata
    from onnxdfq.preprocessing import PRESETS, from_metadata, resolve_preprocessing

    for name, spec in specs.items():
        if resolve_preprocessing(spec.mean, spec.std) is not None or not open_dataset(spec.data).raw:
            continue
        if from_metadata(read_metadata(models[name])) is None:
            raise OptionError(f"{Path(spec.data).name} holds raw images (uint8 pixels) and no preprocessing is known "
                              f"for {name}: give --mean/--std (0-1 scale) or --preprocess {'|'.join(PRESETS)}")


def shard_ranges(count: int, shard_size: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..count, each start a multiple of batch_size.

    `shard_size` is rounded up to a multiple of `batch_size`, so every shard's batches are exactly
    the batches an unsharded `evaluate(..., batch_size=batch_size)` runs (same inputs, same logits).
    """
    if count <= 0:
        return []
    if shard_size < 1 or batch_size < 1:
        raise OptionError(f"shard size and batch size must be >= 1, got {shard_size} and {batch_size}")
    step = -(-shard_size // batch_size) * batch_size
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def combine_shards(shards: Sequence[ShardCounts]) -> dict[str, float | int]:
    """top1/top5 (percent) of the union of the shards: summed counts, divided once."""
    correct1 = sum(s.correct1 for s in shards)
    correct5 = sum(s.correct5 for s in shards)
    count = sum(s.count for s in shards)
    if count == 0:
        raise OnnxDfqError("no samples were evaluated")
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "correct1": correct1,
            "correct5": correct5, "samples": count}


# --- results on disk ------------------------------------------------------------------------------------------

def load_results(out_dir: str | os.PathLike) -> dict[str, Any]:
    """DIR/results.json as written by a sweep, or an empty one."""
    path = Path(out_dir) / RESULTS_JSON
    if not path.exists():
        return {"meta": {}, "fp32": {}, "rows": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OnnxDfqError(f"{path}: not a sweep's results.json ({exc}); use another -o") from None


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    """results.json, results.md and results.html, each replaced atomically."""
    from onnxdfq.sweep_report import render_html, render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(results, indent=1), out_dir / RESULTS_JSON)
    write_text_atomic(render_markdown(results), out_dir / "results.md")
    write_text_atomic(render_html(results), out_dir / "results.html")


# --- the tasks (plain functions; run_sweep wraps them with ray.remote) -----------------------------------------

def _error(exc: BaseException) -> str:
    """One line for a row: onnxdfq's own errors as they are, anything else with the line that raised."""
    if isinstance(exc, OnnxDfqError):
        return f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"


def quantize_task(config: SweepConfig, path: str, mean: list[float] | None, std: list[float] | None) -> dict:
    """Quantize, write the file (checked), measure its packed size; an exception becomes {"error": ...}."""
    from onnxdfq.graph import packing
    from onnxdfq.pipeline import quantize_model, save_quantized

    try:
        start = time.perf_counter()
        # check=False: save_quantized checks the written file (ONNX checker, an onnxruntime session), and the
        # evaluation tasks run it on real data, which refuses NaN/inf outputs: the in-memory probe would be a third
        result = quantize_model(config.model, method=config.method, bits=config.bits, act_bits=config.act_bits,
                                granularity=config.granularity, mean=mean, std=std, check=False,
                                **dict(config.options))
        seconds = time.perf_counter() - start
        size = save_quantized(result, path)
        widths = {f"{name}.weight_quantized": packing.packed_type(layer["bits"])
                  for name, layer in result.report["layers"].items() if "bits" in layer}
        widths = {name: width for name, width in widths.items() if width is not None}
        packed = None
        if result.config is not None and result.config.fmt == "qdq-packed":
            packed = size  # already packed (--size-budget writes packed files, INT2 included)
        elif widths:  # what --format qdq-packed writes for the same quantization (the file stays plain qdq)
            try:
                packed_model, done = packing.pack_weights(result.model, widths)
                packed = len(packed_model.SerializeToString()) if done else None
            except ValueError as exc:  # a grid outside the packed range: no packed size, the row stands
                logger.warning("%s: not packed (%s)", config.key, exc)
        return {"path": path, "quantize_s": round(seconds, 3), "bytes": size, "packed_bytes": packed,
                "avg_weight_bits": result.report.get("average_weight_bits"),
                "warnings": len(result.report.get("warnings", []))}
    except Exception as exc:  # the sweep goes on: this config's row carries the error
        return {"error": _error(exc)}


def eval_task(quantized: dict | str, data: str, mean, std, start: int, stop: int, batch_size: int) -> dict:
    """Counts on samples [start, stop) of a model file (or of the quantize task's result)."""
    from onnxdfq.eval.runner import evaluate

    if isinstance(quantized, dict) and "error" in quantized:
        return {"error": quantized["error"]}
    path = quantized["path"] if isinstance(quantized, dict) else quantized
    try:
        result = evaluate(path, data, mean=mean, std=std, batch_size=batch_size, limit=stop - start, offset=start,
                          threads=1)
        return asdict(ShardCounts(result.correct1, result.correct5, result.count))
    except Exception as exc:
        return {"error": _error(exc)}


def latency_task(quantized: dict | None, fp32_path: str, runs: int, threads: int | None = 1,
                 tolerance: float | None = None) -> dict:
    """Median ms of FP32 and quantized, taking turns in one process (their ratio survives load); with a
    `tolerance`, measured again until two ratios in a row agree within it (`stable_latency`)."""
    from onnxdfq.eval.latency import measure_latency, stable_latency

    if quantized is not None and "error" in quantized:
        return {"error": quantized["error"]}
    models = {"fp32": fp32_path} if quantized is None else {"fp32": fp32_path, "q": quantized["path"]}
    try:
        if tolerance:
            return stable_latency(models, runs=runs, threads=threads, tolerance=tolerance)
        return measure_latency(models, runs=runs, threads=threads)
    except Exception as exc:
        return {"error": _error(exc)}


# --- the driver ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSpec:
    """The labelled data every config is scored on, and how it is cut into tasks."""

    data: str
    mean: list[float] | None = None
    std: list[float] | None = None
    limit: int | None = None
    batch_size: int = 100
    shard_size: int = DEFAULT_SHARD

    def signature(self) -> dict[str, Any]:
        """What makes two sweeps' top-1 comparable (a resumed sweep must match it)."""
        return {"data": str(Path(self.data).resolve()), "mean": self.mean, "std": self.std, "limit": self.limit}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise OptionError(RAY_MISSING) from None
    return ray


def _init_ray(ray, address: str | None, workers: int | None, scratch: str) -> bool:
    """Connect (cluster) or start (local) Ray; False when the caller had already initialised it.

    Ray puts the driver's current directory first on its workers' sys.path unless the job has a
    working_dir: run from a checkout (or any folder with an ``onnxdfq/``), the workers would import
    that copy instead of the driver's. An empty working_dir (`scratch`) keeps them on the installed one.
    """
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "runtime_env": {"working_dir": scratch}}
    if address:
        if workers:
            raise OptionError("--workers sizes a local Ray; a cluster (--address) has the CPUs it was started with")
        ray.init(address=address, **quiet)
    else:
        # "local": always a fresh Ray on this machine, never a cluster some `ray start` left running here
        ray.init(address="local", num_cpus=workers, include_dashboard=False, **quiet)
    return True


def _sample_count(spec: EvalSpec) -> int:
    from onnxdfq.eval.data import open_dataset

    count = open_dataset(spec.data, mean=spec.mean, std=spec.std).count
    return count if spec.limit is None else min(count, spec.limit)


@dataclass
class _Job:
    """One config (or a model's FP32 reference, config None) while its tasks run."""

    key: str
    config: SweepConfig | None
    fp32_path: str
    shards: list[dict | None]
    quantized: dict | None = None
    latency: dict | None = None
    latency_wanted: bool = True

    def finished(self) -> bool:
        return (all(s is not None for s in self.shards) and (self.config is None or self.quantized is not None)
                and (not self.latency_wanted or self.latency is not None))

    def error(self) -> str | None:
        for part in [self.quantized, *self.shards, self.latency]:
            if part is not None and "error" in part:
                return part["error"]
        return None


def _fp32_entry(job: _Job, path: str) -> dict[str, Any]:
    error = job.error()
    entry: dict[str, Any] = {"model_path": path, "bytes": Path(path).stat().st_size if Path(path).exists() else None,
                             "error": error}
    if error is None:
        entry.update(combine_shards([ShardCounts(**s) for s in job.shards]))
    return entry


def _row(job: _Job, fp32: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    config = job.config
    row: dict[str, Any] = {"key": config.key, "model": config.name, "model_path": config.model,
                           "method": config.method, "bits": config.bits, "act_bits": config.act_bits,
                           "granularity": config.granularity, "options": dict(config.options), "error": job.error()}
    if row["error"] is None:
        quantized, latency = job.quantized, job.latency or {}
        row.update(combine_shards([ShardCounts(**s) for s in job.shards]))
        row.update({"fp32_top1": fp32.get("top1"), "file": os.path.relpath(quantized["path"], out_dir),
                    "quantize_s": quantized["quantize_s"], "bytes": quantized["bytes"],
                    "packed_bytes": quantized["packed_bytes"], "fp32_bytes": fp32.get("bytes"),
                    "avg_weight_bits": quantized["avg_weight_bits"],
                    "latency_ms": latency.get("q"), "fp32_latency_ms": latency.get("fp32"),
                    # quantized / FP32 median latency at batch 1: below 1 is faster than FP32
                    "latency_ratio": latency["q"] / latency["fp32"] if "q" in latency else None})
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return row


def run_sweep(configs: Sequence[SweepConfig], spec: EvalSpec | Mapping[str, EvalSpec], out_dir: str | os.PathLike, *,
              address: str | None = None, workers: int | None = None, latency_runs: int = 20,
              latency_alone: bool = False, latency_tolerance: float | None = None, retry_failed: bool = False,
              on_start: Callable[[int, int], None] | None = None,
              on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every config not already in DIR/results.json on Ray; returns the results (also written).

    Tasks: one quantization per config, then its evaluation shards and one latency measurement
    (FP32 and quantized taking turns; `latency_runs` 0 skips it), plus the shards of each model's FP32
    reference. `spec` is the data every model is scored on, or one EvalSpec per model name (file stem).
    Latency runs on one onnxruntime thread beside the other tasks, or with `latency_alone` on every CPU
    of its node with nothing else scheduled there (onnxruntime's own thread count: the figure a user
    gets on an idle machine); `latency_tolerance` repeats it until two ratios agree within it.
    Rows already in DIR are kept (failed ones too, unless `retry_failed`).
    `on_start(todo, reused)` is called once the work is known, `on_row(row)` as each config finishes.
    """
    out_dir = Path(out_dir).resolve()  # the tasks run elsewhere (another cwd, another node): absolute paths only
    configs = [replace(config, model=str(Path(config.model).resolve())) for config in configs]
    specs = _specs_by_model(configs, spec)
    signature = (next(iter(specs.values())).signature() if isinstance(spec, EvalSpec)
                 else {name: specs[name].signature() for name in sorted(specs)})
    results = load_results(out_dir)
    if results["rows"] and results["meta"].get("eval") != signature:
        raise OptionError(f"{out_dir} holds a sweep scored on other data or --limit ({results['meta'].get('eval')}); "
                          "use another -o to keep both")
    kept = [row for row in results["rows"] if not (retry_failed and row.get("error"))]
    done = {row["key"] for row in kept}
    todo = [config for config in configs if config.key not in done]
    models = {config.name: config.model for config in configs}
    missing_fp32 = [name for name in dict.fromkeys(c.name for c in todo)
                    if name not in results["fp32"] or results["fp32"][name].get("error")]
    for name in missing_fp32:
        results["fp32"].pop(name, None)  # a failed reference is measured again
    if on_start:
        on_start(len(todo), len(configs) - len(todo))
    results.update(meta={"eval": signature, "batch_size": spec.batch_size if isinstance(spec, EvalSpec)
                         else {name: s.batch_size for name, s in specs.items()},
                         "latency_runs": latency_runs, "latency_alone": latency_alone}, rows=kept)
    if not todo:
        write_results(out_dir, results)
        return results
    ray = _import_ray()
    check_preprocessing(specs, models)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    ranges = {name: shard_ranges(_sample_count(specs[name]), specs[name].shard_size, specs[name].batch_size)
              for name in dict.fromkeys(c.name for c in todo)}
    latency = {"runs": latency_runs, "alone": latency_alone, "tolerance": latency_tolerance}
    with tempfile.TemporaryDirectory(prefix="onnxdfq-sweep-") as scratch:
        started = _init_ray(ray, address, workers, scratch)
        try:
            _run_jobs(ray, todo, {name: models[name] for name in missing_fp32}, ranges, specs, out_dir, results,
                      latency, on_row)
        finally:
            if started:
                ray.shutdown()
    order = {config.key: index for index, config in enumerate(configs)}
    results["rows"].sort(key=lambda row: order.get(row["key"], len(order)))
    results["meta"]["ray"] = {"address": address or "local", "workers": workers}
    write_results(out_dir, results)
    return results


def _specs_by_model(configs: Sequence[SweepConfig], spec: EvalSpec | Mapping[str, EvalSpec]) -> dict[str, EvalSpec]:
    names = list(dict.fromkeys(config.name for config in configs))
    if isinstance(spec, EvalSpec):
        return {name: replace(spec, data=str(Path(spec.data).resolve())) for name in names}
    missing = [name for name in names if name not in spec]
    if missing:
        raise OptionError(f"no evaluation data for {', '.join(missing)} (one EvalSpec per model name)")
    return {name: replace(spec[name], data=str(Path(spec[name].data).resolve())) for name in names}


def _node_cpus(ray) -> int:
    """The CPUs of the smallest live node: what a task must ask for to have a node to itself."""
    cpus = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1, int(min(cpus))) if cpus else 1


def _run_jobs(ray, todo: list[SweepConfig], fp32_models: dict[str, str], ranges: dict[str, list[tuple[int, int]]],
              specs: dict[str, EvalSpec], out_dir: Path, results: dict, latency: dict,
              on_row: Callable[[dict], None] | None) -> None:
    remote = {name: ray.remote(num_cpus=1, max_retries=0)(func) for name, func in
              (("quantize", quantize_task), ("eval", eval_task), ("latency", latency_task))}
    latency_remote, latency_threads = remote["latency"], 1
    if latency["alone"]:
        latency_remote, latency_threads = remote["latency"].options(num_cpus=_node_cpus(ray)), None
    pending: dict[Any, tuple[_Job, str, int]] = {}
    jobs: list[_Job] = []
    for name, path in fp32_models.items():
        spec = specs[name]
        job = _Job(f"fp32 {name}", None, path, [None] * len(ranges[name]), latency_wanted=False)
        for index, (start, stop) in enumerate(ranges[name]):
            pending[remote["eval"].remote(path, spec.data, spec.mean, spec.std, start, stop, spec.batch_size)] = (
                job, "shard", index)
        jobs.append(job)
    for config in todo:
        spec = specs[config.name]
        job = _Job(config.key, config, config.model, [None] * len(ranges[config.name]),
                   latency_wanted=latency["runs"] > 0)
        quantized = remote["quantize"].remote(config, str(out_dir / "models" / config.file_name), spec.mean, spec.std)
        pending[quantized] = (job, "quantize", 0)
        for index, (start, stop) in enumerate(ranges[config.name]):  # Ray starts them once the file is written
            pending[remote["eval"].remote(quantized, spec.data, spec.mean, spec.std, start, stop,
                                          spec.batch_size)] = (job, "shard", index)
        if latency["runs"] > 0:
            pending[latency_remote.remote(quantized, config.model, latency["runs"], latency_threads,
                                          latency["tolerance"])] = (job, "latency", 0)
        jobs.append(job)
    waiting = {id(job): job for job in jobs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job, part, index = pending.pop(ready[0])
        try:
            value = ray.get(ready[0])
        except Exception as exc:  # the task's worker died (killed, out of memory): this config fails, not the sweep
            value = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"}
        if part == "shard":
            job.shards[index] = value
        else:
            setattr(job, "quantized" if part == "quantize" else "latency", value)
        if id(job) in waiting and job.finished() and _fp32_ready(job, results, fp32_models):
            _finish(job, results, out_dir, on_row)
            del waiting[id(job)]
            for other in [j for j in waiting.values() if j.finished() and _fp32_ready(j, results, fp32_models)]:
                _finish(other, results, out_dir, on_row)  # rows that waited for their FP32 reference
                del waiting[id(other)]


def _fp32_ready(job: _Job, results: dict, fp32_models: dict[str, str]) -> bool:
    return job.config is None or job.config.name not in fp32_models or job.config.name in results["fp32"]


def _finish(job: _Job, results: dict, out_dir: Path, on_row: Callable[[dict], None] | None) -> None:
    if job.config is None:
        name = job.key.removeprefix("fp32 ")
        results["fp32"][name] = _fp32_entry(job, job.fp32_path)
        write_results(out_dir, results)
        return
    row = _row(job, results["fp32"].get(job.config.name, {}), out_dir)
    results["rows"].append(row)
    write_results(out_dir, results)
    if on_row:
        on_row(row)
