#!/usr/bin/env bash
# Generates a test video with ffmpeg's lavfi sources: testsrc2 (a moving pattern with a frame
# clock) and a 440 Hz tone, H.264 (yuv420p, B-frames, a keyframe exactly every 2 s: closed
# GOPs, no scene-cut keyframes) and AAC in MP4: what the transcoding job expects of a source.
#
#   examples/transcode/make-input.sh OUT_PATH [SECONDS] [SIZE]
#   examples/transcode/make-input.sh /tmp/input.mp4                   # 20 s, 1280x720
#   examples/transcode/make-input.sh /tmp/input.mp4 21.5 1920x1080    # a short last segment
#
# SECONDS may be fractional (default 20); SIZE is WxH (default 1280x720). Environment:
# RATE (frame rate, default 30; 30000/1001 works), KEYINT (keyframe interval in frames,
# default two seconds' worth), AUDIO_RATE (default 48000), CHANNELS (default 2).
# Needs ffmpeg (Debian's has libx264). A 20 s 1080p input takes about 10 s on 2 cores.
set -euo pipefail
out="${1:?usage: make-input.sh OUT_PATH [SECONDS] [SIZE]}"
seconds="${2:-20}"
size="${3:-1280x720}"
rate="${RATE:-30}"
keyint="${KEYINT:-$(awk "BEGIN { printf \"%d\", 2 * ($rate) + 0.5 }")}"
audio_rate="${AUDIO_RATE:-48000}"
channels="${CHANNELS:-2}"

ffmpeg -nostdin -hide_banner -loglevel error -y \
  -f lavfi -i "testsrc2=size=$size:rate=$rate" \
  -f lavfi -i "sine=frequency=440:sample_rate=$audio_rate" \
  -t "$seconds" \
  -c:v libx264 -preset veryfast -pix_fmt yuv420p -g "$keyint" -keyint_min "$keyint" -sc_threshold 0 \
  -c:a aac -b:a 128k -ac "$channels" \
  -movflags +faststart "$out"
echo "$out: ${seconds} s, $size at $rate fps, a keyframe every $keyint frames"
