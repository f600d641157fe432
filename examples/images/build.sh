#!/usr/bin/env bash
# Builds the example container images from this machine's own Debian packages (no image
# registry is reachable here) into OCI image archives:
#
#   examples/images/build.sh busybox   [OUT_DIR]   # busybox-static: a shell and coreutils, ~1 MB
#   examples/images/build.sh ffmpeg    [OUT_DIR]   # ffmpeg and the libraries it links, a one-shot
#   examples/images/build.sh transcode [OUT_DIR]   # ffmpeg, ffprobe, their libraries and busybox:
#                                                  # the steps of a transcoding job (../transcode)
#
#   stellar run OUT_DIR/busybox.tar --arg sh --arg -c --arg 'echo hello from $(hostname)'
#   stellar run OUT_DIR/ffmpeg.tar --dir /tmp/media::/media \
#       --arg -i --arg /media/in.mp4 --arg -vf --arg scale=320:-2 --arg /media/out.mp4
#   stellar run OUT_DIR/transcode.tar --arg sh --arg -c --arg 'ffprobe -version; ls /usr/bin'
#
# transcode.tar has no entrypoint (each task gives its whole argv: `ffmpeg ...`, `ffprobe ...`
# or `sh -c ...`) and `sh` as its command.
#
# Needs python3 and, per image, the package it packs (installed when missing).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="${1:?usage: build.sh busybox|ffmpeg|transcode [OUT_DIR]}"
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

busybox_into() { # ROOT: the static busybox and a link per applet in ROOT/bin
  cp "$(command -v busybox)" "$1/bin/busybox"
  for applet in $("$1/bin/busybox" --list); do
    [[ -e "$1/bin/$applet" ]] || ln -s busybox "$1/bin/$applet"
  done
}

binaries_into() { # ROOT PROGRAM...: the programs in ROOT/usr/bin, with their libraries
  local root="$1" bin
  shift
  for bin in "$@"; do
    cp "$(command -v "$bin")" "$root/usr/bin/$bin"
  done
  # The binaries' shared libraries (and the loader) at their own paths, as a distroless
  # image does: nothing else of the host.
  for bin in "$@"; do
    ldd "$(command -v "$bin")"
  done | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

case "$image" in
  busybox)
    need busybox busybox-static
    root="$work/rootfs"
    skeleton "$root"
    busybox_into "$root"
    python3 "$here/oci_archive.py" "$root" "$out/busybox.tar" --cmd '["sh"]' --gzip
    ;;
  ffmpeg)
    need ffmpeg ffmpeg
    root="$work/rootfs"
    skeleton "$root"
    binaries_into "$root" ffmpeg
    python3 "$here/oci_archive.py" "$root" "$out/ffmpeg.tar" \
      --entrypoint '["/usr/bin/ffmpeg", "-hide_banner", "-nostdin"]' --cmd '["-version"]' --gzip
    ;;
  transcode)
    # The steps of a job (examples/transcode): ffmpeg, ffprobe to inspect a file, and
    # busybox's sh and applets (ls, sed, sort...) for steps that are `sh -c` scripts, as
    # the join is (it writes the concat demuxer's list to /tmp).
    need ffmpeg ffmpeg
    need ffprobe ffmpeg
    need busybox busybox-static
    root="$work/rootfs"
    skeleton "$root"
    mkdir -p "$root"/{in,out}
    busybox_into "$root"
    binaries_into "$root" ffmpeg ffprobe
    python3 "$here/oci_archive.py" "$root" "$out/transcode.tar" --cmd '["sh"]' --gzip
    ;;
  *)
    echo "unknown image $image (busybox, ffmpeg or transcode)" >&2
    exit 2
    ;;
esac
