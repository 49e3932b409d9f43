#!/usr/bin/env bash
# A first run that works offline: what muselab will use, then an image and a clip made with the
# tiny random-weight models (their output is noise; use the real models once downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
muselab=.venv/bin/muselab
out=outputs
mkdir -p "$out"
$muselab doctor
$muselab image "a red fox in snow, watercolor" --preset tiny --seed 7 -o "$out/"
$muselab music "lo-fi beat with warm piano" --preset tiny --duration 4 --seed 7 -o "$out/"
latest=$(ls -t "$out"/*.png | head -1)
$muselab info "$latest"
echo
echo "Files are in $out/. Next: muselab models download facebook/musicgen-small, then drop --preset tiny."
