"""A TensorRT plan for another GPU, added to an existing artifact: the export's TensorRT recipe, race and gate.

``imgembed export NAME --trt`` races its TensorRT plan with the CPU engines (:mod:`.engines`). A plan runs only
on the GPU model and TensorRT version it was built with, so an artifact meant for several GPUs needs one plan
per GPU: :func:`add_engine`, run on each. It rebuilds the original from the manifest's source, exports the
plain graph again, plans the artifact's precision with ``backend="tensorrt"`` (the recipe of
:mod:`.recipes.tensorrt`) and runs it through :func:`.engines.run`: the same builder, the same parity gate on
the GPU, the same engine record (:func:`.pipeline._engine_record`). A passing plan is written as
``engine-<key>.plan`` with the engine ``tensorrt-<key>`` (one of the same key, from an export or an earlier
call, is replaced), the artifact rewritten atomically; a failing one changes nothing.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from imgembed.artifact import (
    Engine,
    Manifest,
    export_lock,
    file_checksums,
    read_manifest,
    staged_directory,
    verify,
    write_manifest,
)
from imgembed.errors import ArtifactError, ExportError, ParityError
from imgembed.export import engines, pipeline, recipes
from imgembed.export.onnx_export import DEFAULT_OPSET, export_onnx
from imgembed.export.tensorrt import MIN_OPSET, TrtOptions
from imgembed.gate.reference import reference_set
from imgembed.models.families import family_of, original_from_source

Step = Callable[[str], None]


def add_engine(artifact: str | Path, options: TrtOptions | None = None, step: Step = lambda s: None) -> Engine:
    """Build, parity-gate and add a TensorRT plan for this GPU to ``artifact`` at the artifact's precision;
    returns its engine record. A failing gate raises ParityError (a build that fails, ExportError) and changes
    nothing; no TensorRT or GPU: BackendUnavailableError before any work."""
    from imgembed.gate.parity import format_report

    options, artifact = options or TrtOptions(), Path(artifact)
    with export_lock(artifact):
        manifest = verify(artifact, read_manifest(artifact))
        spec, precision = manifest.model_spec(), manifest.precision
        family = family_of(spec)
        candidates = recipes.plan(precision, transformer=family.transformer(spec), backend="tensorrt")
        engines.check_available(candidates, precision)
        step(f"rebuilding the original ({manifest.source.kind})")
        weights = Path(options.weights) if options.weights else None
        head = original_from_source(spec, manifest.source_record(), weights_override=weights, module=options.module)
        step("computing PyTorch reference embeddings")
        parity_set = reference_set(head, spec, options.threads)
        with tempfile.TemporaryDirectory(dir=artifact.parent, prefix=f".{artifact.name}.trt-") as tmp:
            work = Path(tmp)
            step("exporting to ONNX")
            family.prepare_export(head, spec, False)
            opset = max(manifest.opset or DEFAULT_OPSET, MIN_OPSET)
            plain = export_onnx(head, spec, work / "exported.onnx", opset)
            calibration: dict = {}

            def calibrate():
                if not calibration:
                    step("preprocessing calibration images")
                    calibration["set"] = pipeline.calibration_set(spec, options.calibration)
                return calibration["set"]

            input_format = manifest.input.dtype if manifest.input.dtype in ("float32", "uint8") else "float32"
            inputs = engines.Inputs(spec, work, plain, plain, input_format, parity_set, calibrate, options.threads,
                                    family.transformer(spec), head=head, opset=opset,
                                    backend_options={"tensorrt": options})
            (outcome,) = engines.run(candidates, inputs, spec.thresholds(precision), step, speed_check=False)
            if outcome.report is None:
                raise ExportError(f"{artifact}: no TensorRT {precision} plan built ({outcome.error}); "
                                  "nothing written")
            if not outcome.passed:
                raise ParityError(f"TensorRT {precision} plan of {artifact} failed the parity gate "
                                  f"({'; '.join(outcome.report.failures)}); no engine written\n"
                                  f"{format_report(outcome.report)}", outcome.report)
            plan = outcome.files["plan"]
            key = outcome.target["key"]
            engine = pipeline._engine_record(outcome, {"plan": plan.name}).model_copy(
                update={"id": f"tensorrt-{key}"})
            step(f"writing {plan.name} into {artifact}")
            _write_with_engine(artifact, manifest, plan, engine)
    return engine


def _write_with_engine(artifact: Path, manifest: Manifest, plan: Path, new: Engine) -> None:
    """Rewrite ``artifact`` atomically with ``new`` added to its engines (hard links for the unchanged files); an
    engine of the same id or plan key, and its files, are replaced."""
    replaced = [e for e in manifest.engines
                if e.id == new.id or (e.target is not None and e.target.key == new.target.key)]
    if manifest.default_engine in {e.id for e in replaced}:
        raise ArtifactError(f"{artifact}: its default engine {manifest.default_engine!r} is the plan of key "
                            f"{new.target.key!r}; re-export instead of replacing it")
    dropped = {rel for e in replaced for rel in e.files.values()} | {new.files["plan"]}
    with staged_directory(artifact) as stage:
        for rel in manifest.files:
            if rel in dropped:
                continue
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(artifact / rel, dst)
            except OSError:
                shutil.copy2(artifact / rel, dst)
        os.replace(plan, stage / new.files["plan"])
        kept = [e for e in manifest.engines if e not in replaced]
        files = file_checksums(stage)
        if set(files) != (set(manifest.files) - dropped) | {new.files["plan"]}:
            raise ArtifactError(f"{artifact}: files changed while adding an engine; nothing written")
        write_manifest(stage, manifest.model_copy(update={"engines": [*kept, new], "files": files}))
