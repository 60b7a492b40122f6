"""``edgekit package`` / ``inspect`` / ``verify`` / ``keygen``: bundles for devices."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekit.cli._output import console, print_json


def package(
    paths: list[Path] = typer.Argument(..., help="Build folders (edgekit build) and/or export folders of one model."),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle to write: FILE.edgepkg."),
    sign: Path = typer.Option(None, "--sign", help="Sign the manifest with this ed25519 private key (edgekit keygen)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Package builds (and exports) of one model into one file for devices."""
    from edgekit.bundle import pack_bundle

    with console.status(f"Packaging {len(paths)} folder(s) into {escape(str(out))}..."):
        info = pack_bundle(paths, out, sign_with=sign, force=force)
    if json_out:
        print_json(info.to_dict())
        return
    engines = ", ".join(f"{e['id']} ({e['runtime']})" for e in info.engines)
    console.print(f"[green]packaged[/] {escape(str(out))}  ({_mb(info.bytes)}, {escape(info.signature)}): "
                  f"{escape(engines)}", soft_wrap=True)


def inspect(
    path: Path = typer.Argument(..., help="A bundle (.edgepkg)."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a bundle's engines, what hardware each needs, and its signature state.

    Every member's header is read (a truncated or incomplete bundle fails); nothing is hashed:
    `edgekit verify` does that."""
    from edgekit.bundle import inspect_bundle

    info = inspect_bundle(path)
    if json_out:
        print_json(info.to_dict())
        return
    out, manifest, model = Console(highlight=False), info.manifest, info.manifest.get("model", {})
    out.print(f"[bold]{escape(str(path))}[/]  {_mb(info.bytes)} · schema {manifest['schema_version']} · "
              f"made by edgekit {escape(str(manifest.get('created_by', {}).get('edgekit')))} · {info.signature}",
              soft_wrap=True)
    out.print(f"model {escape(info.name)}: {escape(str(model.get('architecture')))}, {model.get('num_layers')} layers, "
              f"vocab {model.get('vocab_size')} · manifest sha256 {info.manifest_sha256}", soft_wrap=True)
    out.print(_engine_table(manifest))
    for e in manifest["engines"]:
        needs = "; ".join(f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in e["requirements"].items())
        figures = "".join(f" · {k} {json.dumps(e[k], separators=(',', ':'))}" for k in ("quality", "bench") if k in e)
        out.print(f"  [bold]{escape(e['id'])}[/] needs {escape(needs)} · made by edgekit "
                  f"{escape(str(e.get('edgekit_version')))}{escape(figures)}", soft_wrap=True)


def _engine_table(manifest: dict) -> Table:
    from edgekit.bundle.manifest import engine_bytes

    table = Table(box=None, padding=(0, 2), header_style="bold")
    for column in ("engine", "profile", "runtime", "precision", "quantization", "size"):
        table.add_column(column, no_wrap=True)
    for e in manifest["engines"]:
        table.add_row(*(escape(str(x)) for x in (
            e["id"], e.get("profile") or "(export)", e["runtime"], e.get("precision"), e.get("quantization"),
            _mb(engine_bytes(e, manifest)))))
    return table


def verify(
    path: Path = typer.Argument(..., help="A bundle (.edgepkg)."),
    pubkey: Path = typer.Option(None, "--pubkey", help="Check the signature with this public key (KEYFILE.pub)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every member's size and sha256, the manifest schema and, with --pubkey, the signature."""
    from edgekit.bundle import verify_bundle

    with console.status(f"Verifying {escape(str(path))}..."):
        info = verify_bundle(path, pubkey)
    members = sum(len(e["files"]) for e in info.engines) + len(info.manifest["shared"])
    if json_out:
        print_json({"path": str(path), "ok": True, "members": members, "bytes": info.bytes,
                    "manifest_sha256": info.manifest_sha256, "signature": info.signature})
        return
    console.print(f"[green]verified[/] {escape(str(path))}: {members} files, {_mb(info.bytes)}, "
                  f"{len(info.engines)} engine(s) · {escape(info.signature)}", soft_wrap=True)


def keygen(
    out: Path = typer.Option(..., "--out", "-o", help="Private key file to write (the public key goes to OUT.pub)."),
    force: bool = typer.Option(False, "--force", help="Replace existing key files."),
) -> None:
    """Create an ed25519 key pair for signing bundles (private key mode 0600)."""
    from edgekit.bundle import keygen as make_keys

    private, public = make_keys(out, force=force)
    console.print(f"[green]wrote[/] private key {escape(str(private))} (keep it secret) and public key "
                  f"{escape(str(public))} (give it to devices: edgekit verify FILE --pubkey {escape(str(public))})",
                  soft_wrap=True)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
