#!/usr/bin/env bash
# The README's GPU speed table in one run (about 8 minutes on one H200): bench.py's training paths against the
# official loop with their speed, memory and quality over 300 steps, inference ×real time, then the real entry
# points on real recordings: train.py (fp32 with TF32, and bf16 for the discriminators only) and inference.py (with
# and without CUDA graphs).
#
#     bash bench_gpu.sh WAV_DIR GENERATOR [OUT_DIR]
#
# WAV_DIR: LJSpeech recordings (LJSpeech-1.1/wavs; the first 16 are used), GENERATOR: the authors' LJSpeech V2
# generator (their generator_v2 file) for inference on real speech with real weights. Everything it prints, and
# bench.json, go to OUT_DIR (default bench_gpu). PYTHON=echo prints the commands instead of running them.
set -uo pipefail  # (a failed section is reported, and the next one still runs)
if [ $# -lt 2 ]; then
    sed -n '7p' "$0" | sed 's/^# *//' >&2
    exit 2
fi
wavs=$1
generator=$2
out=${3:-bench_gpu}
python=${PYTHON:-python}
mkdir -p "$out"
first_wav=$(find "$wavs" -maxdepth 1 -name '*.wav' | sort | head -1)
[ -n "$first_wav" ] || { echo "error: no .wav files in $wavs" >&2; exit 1; }

echo "== bench.py: training (V1, 16 x 8192) and inference (V1, V2), one run"
$python bench.py --device cuda --rounds 4 --train_steps 10 --presets v1,v2 --no_onnx \
    --training_paths "plain fp32,fast tf32 + CUDA graph,fast tf32 channels-last + CUDA graph,fast bf16 channels-last + CUDA graph,fast bf16 discriminators + CUDA graph,fast bf16 generator + CUDA graph" \
    --quality_steps 300 --quality_path "fast tf32 + CUDA graph,fast bf16 discriminators + CUDA graph" \
    --profile "$out/profile.md" --checkpoint "v2=$generator" --wav "$first_wav" --output "$out/bench.json" 2>&1 \
    | tee "$out/bench.txt"

echo "== train.py, the real entry point: 16 clips x 64 copies (an epoch of 64 steps at batch 16), 200 steps"
corpus=$out/corpus
$python - "$wavs" "$corpus" <<'PY'
import shutil, sys
from pathlib import Path
wavs, corpus = sorted(Path(sys.argv[1]).glob("*.wav"))[:16], Path(sys.argv[2])
(corpus / "wavs").mkdir(parents=True, exist_ok=True)
rows = []
for wav in wavs:
    for copy in range(64):  # distinct file names: the manifest check refuses duplicate rows
        target = corpus / "wavs" / f"{wav.stem}_{copy:02d}.wav"
        if not target.exists():
            shutil.copy(wav, target)
        rows.append(str(target.resolve()))
(corpus / "train.csv").write_text("file_path\n" + "\n".join(rows) + "\n")
(corpus / "val.csv").write_text(f"file_path\n{wavs[0].resolve()}\n")
(corpus / "inference.csv").write_text("file_path\n" + "\n".join(rows[::4]) + "\n")  # 256 clips, 16 batches
PY
for precision in "no" "bf16 --mixed_precision_networks discriminators"; do
    name=speed_${precision%% *}
    # shellcheck disable=SC2086  # $precision is a flag and its option
    $python train.py --experiment_name "$name" --working_directory "$out/runs" --config v1 --batch_size 16 \
        --num_workers 8 --path_to_train_manifest "$corpus/train.csv" --path_to_val_manifest "$corpus/val.csv" \
        --max_steps 200 --console_out_iters 50 --validation_steps 100000 --checkpoint_epochs 1000 \
        --report_to none --mixed_precision $precision 2>&1 | tr '\r' '\n' | grep -E "^(HiFi-GAN|step [0-9]+ epoch)" \
        | tee "$out/train_${name}.txt"
    echo "(exit ${PIPESTATUS[0]})"
done

echo "== inference.py, V2 on 256 recordings (16 batches of 16): CUDA graphs (the default), then without"
for graphs in --cuda_graphs --no-cuda_graphs; do
    $python inference.py --checkpoint "$generator" --config v2 --input "$corpus/inference.csv" \
        --output_dir "$out/audio${graphs#--}" --batch_size 16 --device cuda "$graphs" 2>&1 | grep "^wrote" \
        | tee "$out/inference${graphs#--}.txt"
    echo "(exit ${PIPESTATUS[0]})"
done
echo "== done: $out"
