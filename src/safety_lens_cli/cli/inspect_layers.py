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
    TrustRemoteCodeOption,
    err_console,
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
    as_json: JsonOption = False,
) -> None:
    """List the decoder blocks that layer indices refer to."""
    from safety_lens_cli.layers import describe_blocks
    from safety_lens_cli.models import load_model

    lm = load_model(model_request(model, revision, device, dtype, trust_remote_code, layers_path))
    header = model_header(lm)
    blocks = [dataclasses.asdict(b) for b in describe_blocks(lm.layers)]
    if as_json:
        print_json({**header, "blocks": blocks})
        return
    err_console.print(
        f"[bold]{header['model_id']}[/]  fingerprint {header['fingerprint']}\n"
        f"{header['num_layers']} blocks at {header['layers_path']}, hidden size {header['hidden_size']}, "
        f"{header['dtype']} on {header['device']}"
    )
    table = Table("layer", "module path", "block class", "parameters", "hidden size")
    for b in blocks:
        table.add_row(str(b["index"]), b["module_path"], b["block_class"], f"{b['parameters']:,}", str(b["hidden_size"]))
    out_console.print(table)


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
