"""`safety-lens inspect-layers`: the decoder blocks of a model, and optionally their separation quality."""

from __future__ import annotations

import dataclasses
from typing import Any

import typer
from rich.table import Table

from safety_lens_cli.cli.common import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    LayersPathOption,
    ModelOption,
    RevisionOption,
    PersonaOption,
    TrustRemoteCodeOption,
    err_console,
    format_number,
    handle_errors,
    model_request,
    out_console,
    print_json,
)


def register(app: typer.Typer) -> None:
    app.command("inspect-layers")(inspect_layers)


@handle_errors
def inspect_layers(
    model: ModelOption = None,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustRemoteCodeOption = False,
    layers_path: LayersPathOption = None,
    persona: PersonaOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the decoder blocks that layer indices refer to.

    With --persona, every layer is also scored on how well the persona's
    stimuli separate there (cross-validated), next to a random direction, and
    the layer that `--layer auto` picks is marked.
    """
    from safety_lens_cli.layers import describe_blocks
    from safety_lens_cli.models import load_model

    lm = load_model(model_request(model, revision, device, dtype, trust_remote_code, layers_path))
    header = model_header(lm)
    blocks = [dataclasses.asdict(b) for b in describe_blocks(lm.layers)]
    separation = layer_separation(lm, persona) if persona else {}
    if as_json:
        document: dict[str, Any] = {**header, "blocks": blocks}
        if separation:
            document["personas"] = separation
        print_json(document)
        return
    err_console.print(
        f"[bold]{header['model_id']}[/]  fingerprint {header['fingerprint']}\n"
        f"{header['num_layers']} blocks at {header['layers_path']}, hidden size {header['hidden_size']}, "
        f"{header['dtype']} on {header['device']}"
    )
    columns = ["layer", "module path", "block class", "parameters", "hidden size"]
    for name in separation:
        columns += [f"{name} CV AUROC", "d", "random AUROC", "random d"]
    table = Table(*columns)
    for b in blocks:
        row = [str(b["index"]), b["module_path"], b["block_class"], f"{b['parameters']:,}", str(b["hidden_size"])]
        for info in separation.values():
            q = info["layers"][b["index"]]
            mark = " *" if info["auto_layer"] == b["index"] else ""
            row += [
                format_number(q["cv_auroc"]) + mark,
                format_number(q["cohens_d"], 2),
                format_number(q["random_cv_auroc"]),
                format_number(q["random_cohens_d"], 2),
            ]
        table.add_row(*row)
    out_console.print(table)
    if separation:
        from safety_lens_cli.extraction import AUTO_RULE

        err_console.print(f"* marks the layer --layer auto picks: {AUTO_RULE}.", markup=False)



def layer_separation(lm: Any, personas: list[str]) -> dict[str, Any]:
    """Per-persona quality figures at every layer, and the auto choice, from one batched read."""
    from safety_lens_cli.extraction import choose_auto_layer, extract
    from safety_lens_cli.personas import load_persona

    loaded = [load_persona(p) for p in personas]
    err_console.print(f"Scoring {len(loaded)} persona(s) at all {lm.num_layers} layers ...", markup=False)
    result = {}
    for extraction in extract(lm, loaded, list(range(lm.num_layers))):
        qualities = {layer: r.quality for layer, r in extraction.layers.items()}
        keys = ("cv_auroc", "cv_accuracy", "cohens_d", "random_cv_auroc", "random_cohens_d", "eval_auroc")
        result[extraction.persona.name] = {
            "auto_layer": choose_auto_layer(qualities),
            "layers": [{"layer": layer, **{k: qualities[layer].get(k) for k in keys}} for layer in sorted(qualities)],
        }
    return result


def model_header(lm: Any) -> dict[str, Any]:
    """Identity of a loaded model, printed above tables and stored in JSON output."""
    return {
        "model_id": lm.model_id,
        "fingerprint": lm.fingerprint,
        "revision": lm.revision,
        "architecture": type(lm.model).__name__,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "layers_path": lm.layers.path,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
    }
