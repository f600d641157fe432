#!/usr/bin/env python3
"""Packs a root filesystem directory into an OCI image archive (the `oci-layout` tar that
skopeo, buildah and `docker buildx --output type=oci` write), reproducibly: entries sorted,
owned by 0:0, mtime 0, so the same tree always gives the same digests.

    oci_archive.py ROOTFS_DIR OUT.tar [--layer DIR]... [--entrypoint JSON] [--cmd JSON]
                   [--env K=V]... [--workdir DIR] [--gzip]

Each --layer is one more layer on top, in order; OCI whiteouts in it (`.wh.NAME` deletes NAME
below, `.wh..wh..opq` hides everything below in its directory) are packed as they are.

No registry is needed (none is reachable here): `stellar run OUT.tar` and
`stellar deploy --image OUT.tar` read the archive directly.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import sys
import tarfile


def layer_tar(rootfs: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        paths = []
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                paths.append(os.path.join(dirpath, name))
        for path in sorted(paths, key=lambda p: os.path.relpath(p, rootfs)):
            info = tar.gettarinfo(path, arcname=os.path.relpath(path, rootfs))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rootfs")
    ap.add_argument("out")
    ap.add_argument("--layer", action="append", default=[], help="a directory: one more layer")
    ap.add_argument("--entrypoint", default="[]", help="JSON list")
    ap.add_argument("--cmd", default="[]", help="JSON list")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--gzip", action="store_true", help="compress the layer (tar+gzip)")
    a = ap.parse_args()
    if not os.path.isdir(a.rootfs):
        print(f"{a.rootfs} is not a directory", file=sys.stderr)
        return 2

    blobs = {}

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if a.gzip else "")
    diff_ids, layers = [], []
    for tree in [a.rootfs] + a.layer:
        raw = layer_tar(tree)
        diff_ids.append(f"sha256:{hashlib.sha256(raw).hexdigest()}")
        layer = gzip.compress(raw, mtime=0) if a.gzip else raw
        layers.append({"mediaType": media, "digest": f"sha256:{blob(layer)}", "size": len(layer)})
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + a.env
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": json.loads(a.entrypoint) or None,
            "Cmd": json.loads(a.cmd) or None,
            "Env": env,
            "WorkingDir": a.workdir,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = blob(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": f"sha256:{config_digest}",
            "size": len(config_bytes),
        },
        "layers": layers,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = blob(manifest_bytes)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{manifest_digest}",
                "size": len(manifest_bytes),
                "platform": {"architecture": arch, "os": "linux"},
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
    }
    for digest, data in sorted(blobs.items()):
        files[f"blobs/sha256/{digest}"] = data
    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ["blobs", "blobs/sha256"]:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, a.out)
    print(f"{a.out}: manifest sha256:{manifest_digest}, {len(layers)} layer(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
