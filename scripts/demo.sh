#!/usr/bin/env bash
# Run the whole transplant end to end on the demo photographs (sets up .venv first).
#
# No pretrained tokenizer can be downloaded offline. Step 1 therefore trains a small tokenizer of the VAR family
# from scratch as a stand-in for the pre-trained one, and steps 2-5 run the real job on it. Everything lands in
# demo_runs/ (override with VQT_DEMO_DIR); rerunning starts over.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"

out="${VQT_DEMO_DIR:-$root/demo_runs}"
rm -rf "$out"
mkdir -p "$out"
train="$out/data/train/demo-train.json"
eval="$out/data/eval/demo-eval.json"
# One decoding worker per stage keeps up with 64-px crops; more would only compete with the model for the cores.
common=(--workers 1)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
started=$SECONDS

step "0/5 demo shards: crops of scikit-image's public-domain and CC0 photographs"
python -m shards.demo "$out/data"

step "1/5 stand-in tokenizer: the demo preset trained from scratch (encoder + VAR quantizer + decoder)"
python adapt/run.py --from-scratch --preset demo --shards "$train" --out "$out/tokenizer" \
    --steps "${VQT_DEMO_TOKENIZER_STEPS:-400}" "${common[@]}"
tokenizer="$out/tokenizer/tokenizer.safetensors"

step "2/5 latent cache: encode every image once with the frozen encoder"
python cache/build.py --shards "$train" --tokenizer "$tokenizer" --out "$out/latents-train.zarr" --hflip "${common[@]}"
python cache/build.py --shards "$eval" --tokenizer "$tokenizer" --out "$out/latents-eval.zarr" "${common[@]}"

step "3/5 substitution: MMD-VQ (multi-scale) trained on the cached latents only"
# Constant learning rates of 5e-3 (codebook) and 1e-3 (φ) suit a run of a few hundred steps. The default
# linear 1e-4 -> 1e-5 schedule is meant for epochs over ImageNet.
python substitute/run.py --cache "$out/latents-train.zarr" --eval-cache "$out/latents-eval.zarr" \
    --quantizer mmd --layout multiscale --codebook-size 1024 --batch-size 8 --preload \
    --steps "${VQT_DEMO_SUBSTITUTE_STEPS:-300}" --codebook-lr 5e-3 --phi-lr 1e-3 --out "$out/substitute" "${common[@]}"

step "4/5 adaptation: fine-tune the decoder on images + cached latents"
# LPIPS and the GAN term need VGG-16 and DINO weights. Where a file is missing, the run leaves that term out
# and prints which file to put where.
python adapt/run.py --shards "$train" --cache "$out/latents-train.zarr" --tokenizer "$tokenizer" \
    --quantizer "$out/substitute" --steps "${VQT_DEMO_ADAPT_STEPS:-200}" --batch-size 16 --lr 1e-4 \
    --skip-missing-losses --out "$out/adapt" "${common[@]}"

step "5/5 evaluation on held-out crops: base tokenizer, after substitution, after adaptation"
python evaluate/run.py --shards "$eval" --tokenizer "$tokenizer" --quantizer native \
    --name "(a) base tokenizer" --out "$out/eval-base" "${common[@]}"
python evaluate/run.py --shards "$eval" --tokenizer "$tokenizer" --quantizer "$out/substitute" \
    --name "(b) after substitution" --out "$out/eval-substituted" "${common[@]}"
python evaluate/run.py --shards "$eval" --tokenizer "$tokenizer" --quantizer "$out/substitute" \
    --decoder "$out/adapt" --name "(c) after adaptation" --out "$out/eval-adapted" "${common[@]}"
python -m evaluate.compare "$out/eval-base" "$out/eval-substituted" "$out/eval-adapted" \
    --grid "$out/comparison.png" --out "$out/comparison.md"

echo
echo "demo finished in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s; picture: $out/comparison.png"
