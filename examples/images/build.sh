#!/usr/bin/env bash
# Builds the example container images from this machine's own Debian packages (no image
# registry is reachable here) into OCI image archives:
#
#   examples/images/build.sh busybox [OUT_DIR]   # busybox-static: a shell and coreutils, ~1 MB
#   examples/images/build.sh ffmpeg  [OUT_DIR]   # ffmpeg and the libraries it links, a one-shot
#
#   stellar run OUT_DIR/busybox.tar --arg sh --arg -c --arg 'echo hello from $(hostname)'
#   stellar run OUT_DIR/ffmpeg.tar --dir /tmp/media::/media \
#       --arg -i --arg /media/in.mp4 --arg -vf --arg scale=320:-2 --arg /media/out.mp4
#
# Needs python3 and, per image, the package it packs (installed when missing).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="${1:?usage: build.sh busybox|ffmpeg [OUT_DIR]}"
out="${2:-$here/out}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

need() { # command package
  command -v "$1" >/dev/null 2>&1 && return
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2"
}

skeleton() { # a root with the directories programs expect and a root user
  mkdir -p "$1"/{bin,etc,tmp,proc,dev,usr/bin,root,media}
  echo 'root:x:0:0:root:/root:/bin/sh' >"$1/etc/passwd"
  echo 'root:x:0:' >"$1/etc/group"
}

case "$image" in
  busybox)
    need busybox busybox-static
    root="$work/rootfs"
    skeleton "$root"
    cp "$(command -v busybox)" "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
      [[ -e "$root/bin/$applet" ]] || ln -s busybox "$root/bin/$applet"
    done
    python3 "$here/oci_archive.py" "$root" "$out/busybox.tar" --cmd '["sh"]' --gzip
    ;;
  ffmpeg)
    need ffmpeg ffmpeg
    root="$work/rootfs"
    skeleton "$root"
    cp "$(command -v ffmpeg)" "$root/usr/bin/ffmpeg"
    # The binary's shared libraries (and the loader) at their own paths, as a distroless
    # image does: nothing else of the host.
    ldd "$(command -v ffmpeg)" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
    python3 "$here/oci_archive.py" "$root" "$out/ffmpeg.tar" \
      --entrypoint '["/usr/bin/ffmpeg", "-hide_banner", "-nostdin"]' --cmd '["-version"]' --gzip
    ;;
  *)
    echo "unknown image $image (busybox or ffmpeg)" >&2
    exit 2
    ;;
esac
