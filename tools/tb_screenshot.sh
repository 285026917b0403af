#!/usr/bin/env bash
# What a person sees in TensorBoard's Custom Scalars tab for a run, as a PNG (headless Chromium, Debian's
# `chromium` package: apt-get install chromium).
#   tools/tb_screenshot.sh RUN_DIR OUT.png [PORT]
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
timeout 120 chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,2400 \
    --virtual-time-budget=20000 --screenshot="$out" "http://127.0.0.1:$port/#custom_scalars" 2>/dev/null
echo "wrote $out"
