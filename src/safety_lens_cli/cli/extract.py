"""`safety-lens extract`: persona vectors into the registry, with their quality figures."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from safety_lens_cli.cli.common import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    LayerOption,
    LayersPathOption,
    ModelOption,
    PersonaOption,
    RegistryOption,
    RevisionOption,
    TrustRemoteCodeOption,
    err_console,
    format_number,
    handle_errors,
    model_request,
    out_console,
    print_json,
)
from safety_lens_cli.errors import UsageError

MethodOption = Annotated[
    str, typer.Option("--method", help="mean-diff (difference of means) or pca (first component of paired differences).")
]
PositionOption = Annotated[
    Optional[str],
    typer.Option(
        "--position",
        help="Token positions read: last, mean or response-mean. Default: response-mean for role pairs, last for plain text.",
        show_default=False,
    ),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Stimuli per forward pass.")]
FoldsOption = Annotated[int, typer.Option("--folds", min=2, help="Folds for cross-validated AUROC and accuracy.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for fold assignment and the random baseline.")]


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)



@handle_errors
def extract(
    persona: PersonaOption = None,
    layer: LayerOption = None,
    method: MethodOption = "mean-diff",
    position: PositionOption = None,
    batch_size: BatchSizeOption = 16,
    folds: FoldsOption = 5,
    seed: SeedOption = 0,
    force: Annotated[bool, typer.Option("--force", help="Extract again even when the registry has the vector.")] = False,
    registry: RegistryOption = None,
    model: ModelOption = None,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustRemoteCodeOption = False,
    layers_path: LayersPathOption = None,
    as_json: JsonOption = False,
) -> None:
    """Extract persona vectors and store them in the registry (reused when already there).

    With no --layer, or --layer auto, every layer is evaluated and the one with
    the best cross-validated separation is stored for each persona.
    """
    from safety_lens_cli.models import load_model
    from safety_lens_cli.personas import available_persona_names
    from safety_lens_cli.vector_lookup import VectorRequest, resolve_personas

    if not persona:
        raise UsageError(
            "No persona given: pass --persona NAME (available: "
            + ", ".join(available_persona_names())
            + ") or --persona path/to/file.yaml."
        )
    lm = load_model(model_request(model, revision, device, dtype, trust_remote_code, layers_path))
    request = VectorRequest(
        personas=tuple(persona),
        layers=tuple(layer or ()),
        method=method,
        position=position,
        registry=registry,
        batch_size=batch_size,
        folds=folds,
        seed=seed,
        force=force,
    )
    resolved = resolve_personas(lm, request, notify=lambda m: err_console.print(m, markup=False))

    rows = []
    for item in resolved:
        for vector in item.vectors:
            quality = vector.metadata.get("quality") or {}
            rows.append(
                {
                    "persona": item.persona,
                    "layer": vector.layer,
                    "auto": item.auto_layer is not None,
                    "object_id": vector.object_id,
                    "stored": "extracted" if vector.layer in item.extracted_layers else "reused",
                    "method": vector.metadata.get("method"),
                    "position": vector.metadata.get("position"),
                    "raw_norm": vector.raw_norm,
                    "residual_norm": vector.residual_norm,
                    "calibration": vector.calibration.as_dict(),
                    "quality": quality,
                }
            )
    if as_json:
        print_json({"model_id": lm.model_id, "fingerprint": lm.fingerprint, "vectors": rows})
        return
    table = Table(
        "persona", "layer", "vector id", "CV AUROC", "CV acc", "Cohen's d", "random AUROC", "eval AUROC", "",
        title=f"{lm.model_id}  ({lm.fingerprint[:19]})",
    )
    for row in rows:
        q = row["quality"]
        table.add_row(
            row["persona"],
            f"{row['layer']}{' (auto)' if row['auto'] else ''}",
            str(row["object_id"])[:12],
            format_number(q.get("cv_auroc")),
            format_number(q.get("cv_accuracy")),
            format_number(q.get("cohens_d"), 2),
            format_number(q.get("random_cv_auroc")),
            format_number(q.get("eval_auroc")),
            row["stored"],
        )
    out_console.print(table)
