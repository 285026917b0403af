#!/usr/bin/env bash
# What a person sees in TensorBoard for a run, as PNGs (headless Chromium, Debian's `chromium` package:
# apt-get install chromium): the tab TensorBoard opens on (Time Series) and the Custom Scalars tab.
#   tools/tb_screenshot.sh RUN_DIR OUT_PREFIX [PORT]    # writes OUT_PREFIX_timeseries.png, OUT_PREFIX_custom_scalars.png
set -euo pipefail
run_dir=$1 out=$2 port=${3:-6123}
here=$(cd "$(dirname "$0")/.." && pwd)
tb=${TENSORBOARD:-$here/.venv/bin/tensorboard}
command -v chromium >/dev/null || { echo "chromium not found: apt-get install chromium" >&2; exit 2; }
"$tb" --logdir "$run_dir/tb" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
tb_pid=$!
trap 'kill $tb_pid 2>/dev/null || true' EXIT
for _ in $(seq 60); do  # TensorBoard is up once its plugin list answers
    curl -sf "http://127.0.0.1:$port/data/plugins_listing" >/dev/null && break
    sleep 1
done
# the layout the run wrote, as TensorBoard serves it once it has read the events (fails when the run has none)
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$port/data/plugin/custom_scalars/layout" | grep -q '"category"' && break
    sleep 1
done
curl -sf "http://127.0.0.1:$port/data/plugin/custom_scalars/layout" | grep -q '"category"' \
    || { echo "no custom-scalars layout in $run_dir/tb" >&2; exit 1; }
for view in timeseries custom_scalars; do
    # the flags keep Chromium from reaching out (a closed network refuses it, many times over)
    timeout 120 chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,2000 \
        --disable-background-networking --disable-component-update --disable-sync --no-first-run \
        --virtual-time-budget=60000 --screenshot="${out}_$view.png" "http://127.0.0.1:$port/#$view" 2>/dev/null
    echo "wrote ${out}_$view.png"
done
