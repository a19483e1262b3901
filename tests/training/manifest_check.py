"""verify_manifest: re-hash an artifact's files against its manifest (tests of atomic writes,
faults and kills use it to prove that what a reader trusts is intact)."""

import hashlib


def verify_manifest(store, manifest) -> None:
    """Raise AssertionError naming the file whose sha256 or size differs from its manifest entry."""
    for name, entry in manifest.files.items():
        key = manifest.key(name)
        digest, size = hashlib.sha256(), 0
        with store.open(key) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
                size += len(chunk)
        assert digest.hexdigest() == entry["sha256"], f"{store.url(key)}: sha256 differs from its manifest"
        assert size == entry["bytes"], f"{store.url(key)}: {size} bytes, the manifest says {entry['size']}"
