#!/usr/bin/env bash
# Checks a transcoded video against its source with ffprobe: the reference implementation of
# the checks the transcoding job tests make natively (keep the two in step).
#
#   examples/transcode/check.sh SOURCE OUTPUT HEIGHT
#
# OUTPUT must have, compared with SOURCE:
#   video  codec h264, pix_fmt yuv420p, height HEIGHT, an even width within 1 pixel of the
#          source's aspect (HEIGHT * src_w / src_h), the same frame rate (r_frame_rate and
#          avg_frame_rate), the same number of frames (decoded and counted) and a duration
#          within one frame period of the source's;
#   audio  a stream, with the same sample rate and channel count, and a duration within
#          AUDIO_TOLERANCE seconds (default 0.05) of the source's (skipped when the source
#          has no audio).
# Prints one line per check and exits 1 on any mismatch (2 on bad usage or unreadable files).
set -euo pipefail
[[ $# -eq 3 ]] || { echo "usage: check.sh SOURCE OUTPUT HEIGHT" >&2; exit 2; }
src="$1" out="$2" height="$3"
audio_tol="${AUDIO_TOLERANCE:-0.05}"
for f in "$src" "$out"; do
  [[ -r "$f" ]] || { echo "check.sh: cannot read $f" >&2; exit 2; }
done
if ! ffprobe -v error -show_entries format=format_name -of csv=p=0 "$src" >/dev/null; then
  echo "check.sh: ffprobe cannot read the source $src" >&2
  exit 2
fi
if ! ffprobe -v error -show_entries format=format_name -of csv=p=0 "$out" >/dev/null; then
  echo "FAIL  readable     ffprobe cannot read $out"
  echo "check.sh: $out is not a readable media file" >&2
  exit 1
fi

# probe FILE STREAM ENTRIES: the entries' values, one per line, in the order ffprobe prints
# them (that of its own field list, not of ENTRIES), as KEY=VALUE.
probe() {
  ffprobe -v error -select_streams "$2" -show_entries "stream=$3" -of default=noprint_wrappers=1 "$1"
}
# field KEY: the value of KEY in the last probe's output ($p).
field() { sed -n "s/^$1=//p" <<<"$p" | head -n1; }
# duration FILE STREAM: the stream's duration, or the container's when the stream has none
# (Matroska, MPEG-TS).
duration() {
  local d
  d="$(ffprobe -v error -select_streams "$2" -show_entries stream=duration -of csv=p=0 "$1" | head -n1)"
  if [[ -z "$d" || "$d" == N/A ]]; then
    d="$(ffprobe -v error -show_entries format=duration -of csv=p=0 "$1")"
  fi
  echo "$d"
}
frames() { # decoded video frames
  ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames -of csv=p=0 "$1" | head -n1
}

failed=0
check() { # NAME OK(0|1) DETAIL
  if [[ "$2" == 1 ]]; then
    printf 'ok    %-12s %s\n' "$1" "$3"
  else
    printf 'FAIL  %-12s %s\n' "$1" "$3"
    failed=1
  fi
}
# awk arithmetic on decimal and rational (30000/1001) values; prints 1 or 0.
calc() { awk "BEGIN { print (($1) ? 1 : 0) }"; }

vfields=codec_name,width,height,pix_fmt,r_frame_rate,avg_frame_rate
p="$(probe "$src" v:0 "$vfields")"
[[ -n "$p" ]] || { echo "check.sh: $src has no video stream" >&2; exit 2; }
s_w="$(field width)" s_h="$(field height)" s_r="$(field r_frame_rate)" s_avg="$(field avg_frame_rate)"
p="$(probe "$out" v:0 "$vfields")"
if [[ -z "$p" ]]; then
  echo "FAIL  video        $out has no video stream"
  echo "check.sh: $out does not match $src (see FAIL lines above)" >&2
  exit 1
fi
o_codec="$(field codec_name)" o_pix="$(field pix_fmt)" o_w="$(field width)" o_h="$(field height)"
o_r="$(field r_frame_rate)" o_avg="$(field avg_frame_rate)"

check codec "$([[ "$o_codec" == h264 ]] && echo 1 || echo 0)" "$o_codec (want h264)"
check pix_fmt "$([[ "$o_pix" == yuv420p ]] && echo 1 || echo 0)" "$o_pix (want yuv420p)"
check height "$([[ "$o_h" == "$height" ]] && echo 1 || echo 0)" "$o_h (want $height)"
want_w="$(awk "BEGIN { printf \"%.2f\", $height * $s_w / $s_h }")"
check width "$(calc "$o_w % 2 == 0 && ($o_w - $want_w <= 1) && ($want_w - $o_w <= 1)")" \
  "$o_w (want even, within 1 of $want_w for the source's ${s_w}x${s_h})"
check frame_rate "$([[ "$o_r" == "$s_r" && "$o_avg" == "$s_avg" ]] && echo 1 || echo 0)" \
  "r=$o_r avg=$o_avg (source r=$s_r avg=$s_avg)"

s_n="$(frames "$src")" o_n="$(frames "$out")"
check frames "$([[ "$o_n" == "$s_n" ]] && echo 1 || echo 0)" "$o_n (source $s_n)"

s_d="$(duration "$src" v:0)" o_d="$(duration "$out" v:0)"
check video_dur "$(calc "($o_d - $s_d) * ($o_d - $s_d) <= (1 / ($s_r)) * (1 / ($s_r)) + 1e-9")" \
  "$o_d s (source $s_d s, tolerance one frame: $(awk "BEGIN { printf \"%.4f\", 1 / ($s_r) }") s)"

afields=codec_name,sample_rate,channels
p="$(probe "$src" a:0 "$afields")"
s_rate="$(field sample_rate)" s_ch="$(field channels)"
p="$(probe "$out" a:0 "$afields")"
if [[ -z "$s_rate" ]]; then
  echo "skip  audio        the source has no audio stream"
elif [[ -z "$p" ]]; then
  check audio 0 "no audio stream in $out"
else
  o_rate="$(field sample_rate)" o_ch="$(field channels)"
  check audio "$([[ "$o_rate" == "$s_rate" && "$o_ch" == "$s_ch" ]] && echo 1 || echo 0)" \
    "$(field codec_name) ${o_rate} Hz ${o_ch} ch (source ${s_rate} Hz ${s_ch} ch)"
  s_ad="$(duration "$src" a:0)" o_ad="$(duration "$out" a:0)"
  check audio_dur "$(calc "($o_ad - $s_ad) * ($o_ad - $s_ad) <= $audio_tol * $audio_tol + 1e-12")" \
    "$o_ad s (source $s_ad s, tolerance $audio_tol s)"
fi

if ((failed)); then
  echo "check.sh: $out does not match $src (see FAIL lines above)" >&2
  exit 1
fi
echo "check.sh: $out matches $src at ${height}p"
