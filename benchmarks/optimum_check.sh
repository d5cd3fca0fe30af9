#!/usr/bin/env bash
# Does gaq's quantized UNet run in Hugging Face Optimum's ORTDiffusionPipeline?
# Reproduces: docs/benchmarks.md, "Deployment: OpenVINO, Optimum's pipeline, the GPU kit".
#
#   bash benchmarks/optimum_check.sh [WORK_DIR]        # default runs/optimum-check; gaq's venv active
#
# 1. A deployment environment in WORK_DIR/venv-deploy, pinned (optimum-onnx 0.1.0 cannot share gaq's
#    environment: it needs transformers < 4.58, hence huggingface_hub < 1.0, hence diffusers <= 0.39).
#    No [onnxruntime] extra: it would add the plain onnxruntime wheel, which shadows onnxruntime-gpu.
# 2. The tiny StableDiffusionPipeline the tests build (random CLIP, VAE and UNet; nothing downloaded),
#    exported by optimum-cli export onnx --task text-to-image.
# 3. Its UNet quantized by gaq (W8A8 and W4A8 minmax, from the pipeline) and swapped in with
#    gaq export --optimum-from.
# 4. ORTDiffusionPipeline (CPU provider) on the FP and both quantized folders, and diffusers' pipeline
#    with gaq's fake-quant UNet, from the same prompt and initial latents; a table of the differences.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/optimum-check}
mkdir -p "$WORK"
DEPLOY="$WORK/venv-deploy"
if [ ! -x "$DEPLOY/bin/optimum-cli" ]; then
    python -m venv "$DEPLOY"
    "$DEPLOY/bin/pip" install -q torch==2.13.0 onnxruntime-gpu==1.31.1 optimum-onnx==0.1.0 optimum==2.1.0 \
        transformers==4.57.6 huggingface_hub==0.36.2 diffusers==0.39.0
fi
rm -rf "$WORK/tiny-sd" "$WORK/optimum-fp"
# built where Optimum runs: transformers 4.57 cannot read a CLIP model that gaq's transformers 5 saved
"$DEPLOY/bin/python" benchmarks/optimum_check.py build --out "$WORK/tiny-sd" --latents "$WORK/latents.npy"
"$DEPLOY/bin/optimum-cli" export onnx --model "$WORK/tiny-sd" --task text-to-image "$WORK/optimum-fp" > "$WORK/optimum-export.log" 2>&1
printf 'a red cat\nthe blue sea\na green tree\n' > "$WORK/prompts.txt"
cat > "$WORK/recipe.yaml" <<YAML
model: $WORK/tiny-sd
algorithm: minmax
sampler: {kind: pipeline, num_inference_steps: 10}
calibration: {n_per_step: 8, interval: 2, n_groups: 5, val_fraction: 0.25, batch_size: 8, prompts: $WORK/prompts.txt,
              guidance_scale: 5.0, cache_dir: $WORK/cache}
quantization: {w_bits: 8, a_bits: 8, keep_fp: [conv_in, conv_out]}
report: {num_samples: 2, grid: 2, batch_size: 2}
YAML
for bits in w8a8 w4a8; do
    gaq quantize "$WORK/recipe.yaml" --set quantization.w_bits="${bits:1:1}" --out "$WORK/q-$bits" --overwrite --quiet
    gaq export "$WORK/q-$bits" --optimum-from "$WORK/optimum-fp" --out "$WORK/optimum-$bits" --quiet
done
for name in fp w8a8 w4a8; do
    "$DEPLOY/bin/python" benchmarks/optimum_check.py ort --pipeline "$WORK/optimum-$name" --latents "$WORK/latents.npy" \
        --out "$WORK/ort-$name.npy"
done
python benchmarks/optimum_check.py torch --pipeline "$WORK/tiny-sd" --latents "$WORK/latents.npy" --out "$WORK/torch-fp.npy"
for bits in w8a8 w4a8; do
    python benchmarks/optimum_check.py torch --pipeline "$WORK/tiny-sd" --quantized "$WORK/q-$bits" \
        --latents "$WORK/latents.npy" --out "$WORK/torch-$bits.npy"
done
python benchmarks/optimum_check.py compare \
    --images ort-fp="$WORK/ort-fp.npy" ort-w8a8="$WORK/ort-w8a8.npy" ort-w4a8="$WORK/ort-w4a8.npy" \
             torch-fp="$WORK/torch-fp.npy" torch-w8a8="$WORK/torch-w8a8.npy" torch-w4a8="$WORK/torch-w4a8.npy" \
    --pairs ort-fp:torch-fp ort-w8a8:torch-w8a8 ort-w4a8:torch-w4a8 ort-w8a8:ort-fp ort-w4a8:ort-fp | tee "$WORK/optimum_check.md"
