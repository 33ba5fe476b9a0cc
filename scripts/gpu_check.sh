#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA GPU: the GPU-marked tests, then the digits job on the GPU with 16-mixed.
# Assumes the environment is set up (bash scripts/setup.sh with a CUDA build of torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -m pytest -m gpu -q -p no:cacheprovider tests
lightning-bnsgd fit --config src/lightning_bnsgd/configs/digits.yaml \
    --trainer.accelerator=gpu --trainer.devices=1 --trainer.precision=16-mixed \
    --trainer.enable_progress_bar=false --trainer.logger.init_args.save_dir="${OUT:-/tmp}/runs"
