"""Ed25519 keys and signatures over a bundle's manifest bytes (``manifest.sig``).

The manifest holds the sha256 of every member, so signing it signs the whole bundle. Keys are
PEM files: the private key PKCS#8 (mode 0600), the public key SubjectPublicKeyInfo (``KEY.pub``).
``cryptography`` comes with ``edgekit-llm[cpu]`` and ``[gpu]``; it is imported only here, lazily.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgekit.bundle.manifest import BundleError
from edgekit.errors import OutputExistsError, require


def _crypto():
    require("cryptography", "cpu")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def public_key_path(keyfile: str | Path) -> Path:
    """Where ``keygen`` puts the public key of ``keyfile``: ``KEYFILE.pub``."""
    keyfile = Path(keyfile)
    return keyfile.with_name(keyfile.name + ".pub")


def keygen(keyfile: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Write a new ed25519 private key to ``keyfile`` (PEM, 0600) and its public key to ``keyfile.pub``."""
    serialization, ed25519 = _crypto()
    keyfile, pubfile = Path(keyfile), public_key_path(keyfile)
    for path, marker in ((keyfile, b"-----BEGIN PRIVATE KEY-----"), (pubfile, b"-----BEGIN PUBLIC KEY-----")):
        if path.exists() and not force:
            raise OutputExistsError(f"key file {path} already exists",
                                    "pass --force to replace it, or choose another -o")
        if path.exists() and not _is_pem(path, marker):
            raise OutputExistsError(f"--force replaces only a PEM key file, and {path} is not one",
                                    "choose another -o (edgekit never deletes what it did not write)")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    keyfile.parent.mkdir(parents=True, exist_ok=True)
    _write(keyfile, private, 0o600)
    _write(pubfile, public, 0o644)
    return keyfile, pubfile


def _is_pem(path: Path, marker: bytes) -> bool:
    """Whether ``path`` is a file that starts like the PEM key ``keygen`` writes there."""
    try:
        with path.open("rb") as f:
            return path.is_file() and not path.is_symlink() and f.read(len(marker)) == marker
    except OSError:
        return False


def _write(path: Path, data: bytes, mode: int) -> None:
    path.unlink(missing_ok=True)  # O_EXCL below: the mode is set at creation, no window with wider access
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have narrowed it; never widened
        f.write(data)


def _read_key(path: Path, private: bool):
    serialization, ed25519 = _crypto()
    what = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {what} key {path} ({exc.strerror})",
                          "create a key pair with `edgekit keygen -o KEYFILE`") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not an unencrypted PEM {what} key ({exc})",
                          "use the files `edgekit keygen` writes: KEYFILE to sign, KEYFILE.pub to verify") from None
    kind = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, kind):
        raise BundleError(f"{path} is not an ed25519 {what} key", "create one with `edgekit keygen -o KEYFILE`")
    return key


def sign(manifest: bytes, keyfile: str | Path) -> bytes:
    """The 64-byte ed25519 signature of ``manifest`` with the private key in ``keyfile``."""
    return _read_key(Path(keyfile), private=True).sign(manifest)


def check_signature(manifest: bytes, signature: bytes | None, pubkey: str | Path, bundle: Path) -> None:
    """Raise BundleError unless ``signature`` is ``manifest`` signed by the key in ``pubkey``."""
    key = _read_key(Path(pubkey), private=False)
    if signature is None:
        raise BundleError(f"{bundle} is unsigned, but a signature was asked for (--pubkey {pubkey})",
                          "package it with --sign KEYFILE, or verify without --pubkey")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        raise BundleError(f"{bundle}: the signature does not match {pubkey}: the manifest was modified, "
                          "or it was signed with another key",
                          "get the bundle and the public key from their source again") from None
